"""The input path's figures: phase one's data pipeline against the cache and the device
augmentation, and the augmentation alone against torchvision's per-image CPU transforms.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import Config, load_config
from ..data.augment import Augmenter
from ..data.cache import prepare
from ..data.plan import BatchPlan
from ..distributed.shards import Shares
from ..training.batches import Batches
from .inputs import DecodedPatches, PhaseOneDataset, source_images
from .timing import measure


def bench_augment(cfg: Config, n_images: int, batch: int, steps: int, workers: int, device: torch.device,
                  work: Path, console: Console) -> dict:
    """The same decoded 512x384 images: torchvision per image (CPU, DataLoader workers) vs iqa_dist's
    batched crop/flip/ColorJitter/normalise on `device`."""
    root = source_images(work / "koniq", n_images)
    size = cfg.model.img_size
    c = load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"data.cache_dir={work / 'cache'}",
                                     f"model.img_size={size}"])
    view = prepare(c, Console(quiet=True))
    store = view.image_store("train")
    images = [Image.fromarray(store.pixels[int(o):int(o) + int(h * w * 3)].numpy().reshape(int(h), int(w), 3))
              for o, h, w in zip(store.offsets, store.heights, store.widths)]
    loader = torch.utils.data.DataLoader(DecodedPatches(images, 20, size), batch_size=batch, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0, drop_last=True)
    batches = iter(loader)
    console.print(f"augment: torchvision per image, {workers} worker(s)")
    reference = measure(lambda: next(batches).to(device), batch, steps, device, warmup=1)
    ours, _ = _cache_rate(view, c, batch, steps, device)
    return {"torchvision_cpu": reference, "iqa_dist": ours, "speedup": ours / reference, "img_size": size}


def bench_data(cfg: Config, n_images: int, batch: int, steps: int, workers: int, device: torch.device,
               work: Path, console: Console) -> dict:
    """(a) phase one vs (b) cache + device crops vs (c) cache + stored patches, patches/s."""
    root = source_images(work / "koniq", n_images)
    size = cfg.model.img_size
    files = sorted((root / "1024x768").glob("*.jpg"))
    loader = torch.utils.data.DataLoader(PhaseOneDataset(files, cfg.data.train_patch_num, size), batch_size=batch,
                                         shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                                         drop_last=True)
    batches = iter(loader)

    def phase_one():
        next(batches).to(device)

    console.print(f"(a) phase one: {workers} DataLoader worker(s), {batch} patches a batch")
    a = measure(phase_one, batch, steps, device, warmup=1)

    base = [f"data.root={root}", "data.dataset=koniq10k", "data.split=random", f"data.cache_dir={work / 'cache'}",
            f"model.img_size={size}", "data.workers=" + str(max(1, workers))]
    results = {"phase_one": a}
    for label, mode in (("cache_device_crops", "random"), ("cache_stored_patches", "cached")):
        c = load_config("koniq-swin-t", [*base, f"data.train_patches={mode}", "data.cached_patch_num=20",
                                         f"data.train_patch_num={min(20, cfg.data.train_patch_num)}"])
        view = prepare(c, Console(quiet=True))
        results[label], host = _cache_rate(view, c, batch, steps, device)
        if label == "cache_device_crops":
            results["host_work_device_crops"] = host
            t0 = time.perf_counter()
            split = view.image_store("train")
            results["cache_read_images_per_s"] = len(split) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            images = view.eval_set("test", "random", c.data.test_patch_num, size)
            results["cache_read_eval_images_per_s"] = len(images) / (time.perf_counter() - t0)
            results["cache_mb_per_1000_images"] = round(
                sum(f.stat().st_size for f in view.image_dir.glob("images-*.arrow")) / 1e6
                * 1000 / view.image_meta["count"], 1)
    results["speedup_device_crops"] = results["cache_device_crops"] / a
    results["speedup_host_work"] = results["host_work_device_crops"] / a
    results["speedup_stored_patches"] = results["cache_stored_patches"] / a
    return results


def _cache_rate(view, c: Config, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Patches/s of the training input path (plan -> gather -> one upload -> device crop/flip/
    jitter/normalise: `training.batches.Batches.get`), and of its host side alone: what the CPU does per
    batch when the pixels are resident on an accelerator and the augmentation runs there."""
    cached = c.data.train_patches == "cached"
    store = (view.patch_store() if cached else view.image_store("train")).to(device)
    plan = BatchPlan(len(store), c.data.train_patch_num, batch, 0, c.data.cached_patch_num if cached else 0)
    aug = Augmenter(c.augment, c.model.img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0).to(device)
    counter = iter(range(10**9))
    batches = Batches(store=store, plan=plan, augmenter=aug, shares=Shares.split(batch, 0, 1, 0), device=device)

    def step():
        batches.get(next(counter) % plan.steps_per_epoch)

    def host_side():
        rows, k = plan.batch(next(counter) % plan.steps_per_epoch)
        params = aug.draw(len(rows), 0)
        y0, x0 = aug.crop_origin(params, store.heights[rows], store.widths[rows]) if k is None else (k, k)
        aug.upload(store.offsets[rows], store.widths[rows], y0, x0, params, store.scores[rows], torch.device("cpu"))

    return measure(step, batch, steps, device), measure(host_side, batch, steps * 10, torch.device("cpu"))
