"""What the benchmarks measure on: KonIQ-size source JPEGs made once, the backbones, phase
one's CPU pipeline as a baseline, and the reference numbers (GPU peaks, a KonIQ epoch).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import Config, load_config
from ..data.cache import prepare

# Dense bf16 peak FLOP/s of the GPUs people train on (datasheets; H100/H200 SXM).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}
KONIQ_EPOCH = 7046 * 20  # training patches of a KonIQ epoch (Q-Align split x 20 patches per image)
TINY_SWIN = load_config("demo").model.backbone_kwargs  # the demo's tiny Swin: its one home is the demo preset
BACKBONES = {
    "tiny": ("swin_tiny_patch4_window7_224", TINY_SWIN, 112),
    "swin-t": ("swin_tiny_patch4_window7_224", {}, 224),
    "swin-s": ("swin_small_patch4_window7_224", {}, 224),
    "swin-b": ("swin_base_patch4_window7_224", {}, 224),
}


def recipe_options(cfg: Config) -> list[str]:
    """The user's recipe choices that `bench train` and `bench kernels` measure on top of the
    koniq-swin-t recipe: the weight EMA and self-distillation from it."""
    return [f"train.ema_decay={cfg.train.ema_decay}", f"optim.distill_weight={cfg.optim.distill_weight}"]


def koniq_step(cfg: Config, backbone: str, n_images: int, work: Path, device: torch.device, *extra: str):
    """The koniq-swin-t recipe with `backbone` (BACKBONES), randomly initialised, on `n_images`
    KonIQ-size sources in `work`, with the bench's recipe options: (config, training store on `device`)."""
    name, kwargs, size = BACKBONES[backbone]
    root = source_images(work / "koniq", n_images)
    c = load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"model.img_size={size}",
                                     f"data.cache_dir={work / 'cache'}", f"model.backbone={name}", "model.pretrained=none",
                                     *extra, *recipe_options(cfg)])
    c = replace(c, model=replace(c.model, backbone_kwargs=kwargs))
    return c, prepare(c, Console(quiet=True)).image_store("train").to(device)


def source_images(folder: Path, n: int) -> Path:
    """n KonIQ-size 1024x768 JPEGs (quality 90) plus a KonIQ-format CSV, made once."""
    from ..sources.synthetic import PHOTOS, photo

    img_dir = folder / "1024x768"
    if (folder / "koniq10k_scores_and_distributions.csv").is_file() and len(list(img_dir.glob("*.jpg"))) == n:
        return folder
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = ["image_name,MOS,MOS_zscore"]
    for i in range(n):
        image = Image.fromarray(photo(PHOTOS[i % len(PHOTOS)])[..., :3]).resize((1024, 768), Image.BICUBIC)
        if i // len(PHOTOS) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(img_dir / f"{i:05d}.jpg", quality=90)
        rows.append(f"{i:05d}.jpg,3.0,{20 + 60 * i / max(1, n - 1):.3f}")
    (folder / "koniq10k_scores_and_distributions.csv").write_text("\n".join(rows) + "\n")
    return folder


def cpu_transforms(size: int, resize: tuple[int, int] | None = None):
    """torchvision's per-image CPU pipeline, as phase one ran it (resize: (H, W) first)."""
    import torchvision.transforms as T

    return T.Compose([*([T.Resize(resize)] if resize else []), T.RandomCrop(size), T.RandomHorizontalFlip(),
                      T.ColorJitter(0.1, 0.1, 0.1, 0.05), T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


class PhaseOneDataset(torch.utils.data.Dataset):
    """Phase one's loader: every patch decodes and resizes the full JPEG again, then CPU transforms."""

    def __init__(self, files: list[Path], patches_per_image: int, size: int) -> None:
        self.files, self.per = files, patches_per_image
        self.transform = cpu_transforms(size, resize=(384, 512))  # the corrected landscape geometry, same cost

    def __len__(self) -> int:
        return len(self.files) * self.per

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i // self.per]) as im:
            return self.transform(im.convert("RGB"))


class DecodedPatches(torch.utils.data.Dataset):
    """torchvision's CPU pipeline on already decoded images (no JPEG work): the augmentation alone."""

    def __init__(self, images: list[Image.Image], per: int, size: int) -> None:
        self.images, self.per = images, per
        self.transform = cpu_transforms(size)

    def __len__(self) -> int:
        return len(self.images) * self.per

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i // self.per])
