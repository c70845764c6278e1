"""`iqa-dist bench`: throughput figures measured side by side in one run, with the machine.

- augment: the augmentation alone on the same decoded images: torchvision per image vs ours.
- data:  patches/s delivered ready for the model by (a) phase one's pipeline (PIL decode + resize
         of the source JPEG per patch, torchvision CPU transforms in DataLoader workers), (b) the
         cache + device augmentation with fresh crops, (c) the cache with stored training patches.
- train: per backbone, precision, batch and compile setting, patches/s of (1) the real training
         step end to end (`step.Batches.get` + `step.Trainer.step`, what `iqa-dist train` runs,
         built by rig.StepRig), (2) the same step on a batch already on the device (model
         only), (3) the anchor:
         timm's plain classifier of the same backbone, same batch, precision and optimizer (what
         a user would train instead). Per row: % of the anchor, MFU (on a GPU), peak GPU memory.
         With several batches it projects the time of a KonIQ epoch on 1-8 GPUs at global batch 96.
- eval:  images/s of evaluation (the test protocol's patches per image).
- kernels: the step's kernel budget (budget.py): device kernels and host syncs per step of the
         real step, the model-only step and the anchor, per part, against the targets; counted
         on any device. On a GPU it then runs the real step under
         `torch.cuda.set_sync_debug_mode("error")`, which fails on any synchronisation.

The source images are KonIQ-size (1024x768) JPEGs made from scikit-image's photos, written once
to a temporary folder, so every pipeline reads the same files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console

from .augment import Augmenter
from .budget import step_budget
from .cache import prepare
from .config import Config, load_config
from .scoring import predict_images
from .model import build_model
from .output import console as make_console
from .plan import BatchPlan, Shares
from .rig import AnchorRig, StepRig
from .compile import compile_model
from .optim import allreduce_bytes
from .step import Batches

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


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None, "python": platform.python_version()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Rate(float):
    """Items per second: the median of BLOCKS timed blocks, with their `spread`, (max - min) /
    median: what the machine's noise did to this figure while it was measured."""

    spread: float = 0.0


BLOCKS = 3  # timed blocks per figure (their median is the figure)
NOISY = 0.10  # a spread above this is flagged where the figure is printed


def _rate(fn, n_items: int, repeats: int, device: torch.device, warmup: int = 2) -> Rate:
    """Items per second of fn() (each call handles n_items) over `repeats` calls after warm-up
    calls, timed in up to BLOCKS blocks: their median, and their spread."""
    for _ in range(warmup):
        fn()
    blocks = [repeats // BLOCKS + (b < repeats % BLOCKS) for b in range(min(BLOCKS, repeats))]
    rates = []
    for calls in blocks:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        rates.append(n_items * calls / (time.perf_counter() - t0))
    median = statistics.median(rates)
    rate = Rate(median)
    rate.spread = (max(rates) - min(rates)) / median if median > 0 else math.nan
    return rate


def spreads(report, path: str = "") -> dict[str, float]:
    """Every measured figure's spread in a report, by its place (train.0.end_to_end, ...)."""
    if isinstance(report, Rate):
        return {path: report.spread}
    items = report.items() if isinstance(report, dict) else enumerate(report) if isinstance(report, list) else ()
    return {k: v for key, value in items for k, v in spreads(value, f"{path}.{key}" if path else str(key)).items()}


def source_images(folder: Path, n: int) -> Path:
    """n KonIQ-size 1024x768 JPEGs (quality 90) plus a KonIQ-format CSV, made once."""
    from .synthetic import PHOTOS, _photo

    img_dir = folder / "1024x768"
    if (folder / "koniq10k_scores_and_distributions.csv").is_file() and len(list(img_dir.glob("*.jpg"))) == n:
        return folder
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = ["image_name,MOS,MOS_zscore"]
    for i in range(n):
        photo = Image.fromarray(_photo(PHOTOS[i % len(PHOTOS)])[..., :3]).resize((1024, 768), Image.BICUBIC)
        if i // len(PHOTOS) % 2:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        photo.save(img_dir / f"{i:05d}.jpg", quality=90)
        rows.append(f"{i:05d}.jpg,3.0,{20 + 60 * i / max(1, n - 1):.3f}")
    (folder / "koniq10k_scores_and_distributions.csv").write_text("\n".join(rows) + "\n")
    return folder


def cpu_transforms(size: int, resize: tuple[int, int] | None = None):
    """torchvision's per-image CPU pipeline, as phase one ran it (resize: (H, W) first)."""
    import torchvision.transforms as T

    return T.Compose([*([T.Resize(resize)] if resize else []), T.RandomCrop(size), T.RandomHorizontalFlip(),
                      T.ColorJitter(0.1, 0.1, 0.1, 0.05), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


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
    reference = _rate(lambda: next(batches).to(device), batch, steps, device, warmup=1)
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
    a = _rate(phase_one, batch, steps, device, warmup=1)

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
    jitter/normalise: `step.Batches.get`), and of its host side alone: what the CPU does per
    batch when the pixels are resident on an accelerator and the augmentation runs there."""
    cached = c.data.train_patches == "cached"
    store = (view.patch_store() if cached else view.image_store("train")).to(device)
    plan = BatchPlan(len(store), c.data.train_patch_num, batch, 0, c.data.cached_patch_num if cached else 0)
    aug = Augmenter(c.augment, c.model.img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0).to(device)
    counter = iter(range(10**9))
    batches = Batches(store=store, plan=plan, augmenter=aug, shares=Shares.plan(batch, 0, 1, 0), device=device)

    def step():
        batches.get(next(counter) % plan.steps_per_epoch)

    def host_side():
        rows, k = plan.batch(next(counter) % plan.steps_per_epoch)
        params = aug.draw(len(rows), 0)
        y0, x0 = aug.crop_origin(params, store.heights[rows], store.widths[rows]) if k is None else (k, k)
        aug.upload(store.offsets[rows], store.widths[rows], y0, x0, params, store.scores[rows], torch.device("cpu"))

    return _rate(step, batch, steps, device), _rate(host_side, batch, steps * 10, torch.device("cpu"))


def flops_per_patch(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one patch, counted by torch (about 3x the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_train(cfg: Config, backbones: list[str], precisions: list[str], compiles: list[bool], batches: list[int],
                n_images: int, steps: int, device: torch.device, work: Path, console: Console,
                anchors: bool = True) -> list[dict]:
    """Per setting: the real step end to end, the same step model-only, and the timm anchor."""
    rows = []
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    root = source_images(work / "koniq", n_images)
    for name in backbones:
        backbone, kwargs, size = BACKBONES[name]
        c = load_config("koniq-swin-t", [f"model.backbone={backbone}", "model.pretrained=none", f"model.img_size={size}",
                                         f"data.cache_dir={work / 'cache'}"])
        c = replace(c, model=replace(c.model, backbone_kwargs=kwargs))
        view = prepare(load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"model.img_size={size}",
                                                    f"data.cache_dir={work / 'cache'}"]), Console(quiet=True))
        store = view.image_store("train").to(device)
        for precision in precisions:
            for batch in batches:
                console.print(f"train: {name} {precision} batch {batch}: anchor", highlight=False)
                anchor = _anchor_rate(c, precision, batch, steps, device) if anchors else {"rate": math.nan,
                                                                                          "memory_gib": None}
                for compiled in compiles:
                    console.print(f"train: {name} {precision} batch {batch} compile={compiled}", highlight=False)
                    c_run = replace(c, train=replace(c.train, compile=compiled))
                    row = {"backbone": name, **_train_rates(c_run, view, store, precision, batch, steps, device)}
                    row.update(anchor=anchor["rate"], anchor_memory_gib=anchor["memory_gib"],
                               pct_of_anchor=100 * row["model_only"] / anchor["rate"])
                    if peak:
                        row["mfu_pct"] = 100 * row["end_to_end"] * row["gflop_per_patch"] * 1e9 / peak
                    rows.append(row)
    return rows


def _train_rates(c: Config, view, store, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    """The real step (`Trainer.step`, what `train` runs, compiled as `train` compiles it, with the
    guard, EMA and bookkeeping) on a batch already on the device (model only) and fed by the real
    input path (`Batches.get`: cache -> device augmentation), under a real Accelerator."""
    torch.manual_seed(0)
    size = c.model.img_size
    flops = flops_per_patch(build_model(c.model).to(device).train(), size, device)
    rig = StepRig.build(c, store, precision, batch, device)
    t0 = time.perf_counter()
    rig.model_only()  # the first step compiles when compile is on
    rig.end_to_end()  # ... and the augmentation
    rig.trainer.settle()
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model_only = _rate(rig.model_only, batch, steps, device)
    end_to_end = _rate(rig.end_to_end, batch, steps, device)
    rig.trainer.settle()
    return {"precision": precision, "compile": c.train.compile, "batch": batch, "img_size": size,
            "model_only": model_only, "end_to_end": end_to_end, "overhead_pct": 100 * (1 - end_to_end / model_only),
            "gflop_per_patch": flops / 1e9, "memory_gib": _peak_memory(device), "first_step_s": first,
            **_compiled_graphs(c)}


def _compiled_graphs(c: Config) -> dict:
    """What dynamo compiled so far in this process (with compile on): graphs, breaks, recompiles."""
    if not c.train.compile:
        return {}
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values())}


def _anchor_rate(c: Config, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    """timm's plain classifier of the same backbone (rig.AnchorRig)."""
    anchor = AnchorRig(c, precision, batch, device)
    anchor.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"rate": _rate(anchor.step, batch, steps, device), "memory_gib": _peak_memory(device)}


def projection(rows: list[dict], global_batch: int = 96, patches: int = KONIQ_EPOCH, gpus=(1, 2, 4, 8)) -> list[dict]:
    """Time of a KonIQ epoch on N GPUs at a fixed global batch: each GPU runs the real step at
    batch global/N, at the end-to-end rate measured for that batch on one GPU. Communication is
    not included (it is `bench scaling`'s subject): these are lower bounds."""
    out = []
    for row in rows:
        for n in gpus:
            if row["batch"] * n == global_batch:
                rate = n * row["end_to_end"]
                out.append({"backbone": row["backbone"], "precision": row["precision"], "compile": row["compile"],
                            "gpus": n, "per_gpu_batch": row["batch"], "patches_per_s": rate,
                            "epoch_s": patches / rate})
    return out


# Interconnect bandwidth a ring all-reduce achieves per GPU (NCCL "bus bandwidth"), GB/s:
# NVLink within an H100/H200 node (~360 measured by nccl-tests of all_reduce on 8 GPUs) and one
# 400 Gb/s InfiniBand NIC per GPU across nodes (~45 after protocol overheads).
INTRA_GBPS, INTER_GBPS, GPUS_PER_NODE = 360.0, 45.0, 8


def rate_at(batch: float, rates: dict[int, float]) -> float:
    """Patches/s at a per-process batch, interpolated linearly in log2(batch) between measured
    batches (clamped outside them)."""
    known = sorted(rates)
    if batch <= known[0]:
        return rates[known[0]]
    if batch >= known[-1]:
        return rates[known[-1]]
    hi = next(b for b in known if b >= batch)
    lo = max(b for b in known if b <= batch)
    if hi == lo:
        return rates[lo]
    t = (math.log2(batch) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return rates[lo] + t * (rates[hi] - rates[lo])


def project(rates: dict[int, float], grad_bytes: float, global_batch: int | None, gpus: int,
            intra_gbps: float = INTRA_GBPS, inter_gbps: float = INTER_GBPS, per_node: int = GPUS_PER_NODE,
            patches: int = KONIQ_EPOCH) -> dict:
    """One projected row: N GPUs at a global batch (None: 96 per GPU). Each GPU computes its share
    at the rate measured (interpolated) for that per-GPU batch; then a ring all-reduce moves
    2 (N-1)/N x grad_bytes per GPU at the bus bandwidth (NVLink inside a node, InfiniBand beyond),
    not overlapped with the backward pass: an upper bound on the step time."""
    batch = global_batch or 96 * gpus
    per_gpu = batch / gpus
    compute = per_gpu / rate_at(per_gpu, rates)
    bandwidth = (intra_gbps if gpus <= per_node else inter_gbps) * 1e9
    comm = 2 * (gpus - 1) / gpus * grad_bytes / bandwidth if gpus > 1 else 0.0
    step = compute + comm
    return {"gpus": gpus, "global_batch": batch, "per_gpu_batch": per_gpu, "compute_ms": 1e3 * compute,
            "comm_ms": 1e3 * comm, "step_ms": 1e3 * step, "patches_per_s": batch / step,
            "epoch_s": patches / batch * step}


def bench_scaling(cfg: Config, backbone: str, precision: str, batches: list[int], n_images: int, steps: int,
                  device: torch.device, work: Path, console: Console, global_batch: int, intra_gbps: float,
                  inter_gbps: float) -> dict:
    """Measured: the real step's patches/s per per-process batch on this device. Projected: time
    per KonIQ epoch on 1-64 GPUs at `global_batch` and at 96 per GPU, with the all-reduce of the
    gradients at the stated bandwidths; and what that means for sweeps on one 8-GPU node."""
    rows = bench_train(cfg, [backbone], [precision], [False], batches, n_images, steps, device, work, console,
                       anchors=False)
    rates = {r["batch"]: r["end_to_end"] for r in rows}
    name, kwargs, size = BACKBONES[backbone]
    params = sum(p.numel() for p in build_model(replace(cfg.model, backbone=name, pretrained="none", img_size=size,
                                                              backbone_kwargs=kwargs)).parameters())
    grad = {p: allreduce_bytes(params, replace(cfg, train=replace(cfg.train, grad_compression=c)))
            for p, c in (("fp32", "none"), ("bf16", "bf16"))}
    gpus = (1, 2, 4, 8, 16, 32, 64)
    fixed = [project(rates, grad["fp32"], global_batch, n, intra_gbps, inter_gbps) for n in gpus]
    per_gpu = [project(rates, grad["fp32"], None, n, intra_gbps, inter_gbps) for n in gpus]
    one, eight = fixed[0], fixed[3]  # a run at the recipe's batch on 1 GPU, and on all 8 of a node
    sweep = {"members_per_hour_8_parallel": 8 * 3600 / (30 * one["epoch_s"]),
             "members_per_hour_one_at_a_time_on_8": 3600 / (30 * eight["epoch_s"])}
    sweep["speedup"] = sweep["members_per_hour_8_parallel"] / sweep["members_per_hour_one_at_a_time_on_8"]
    return {"measured": rows, "parameters": params, "grad_bytes": grad, "global_batch": global_batch,
            "intra_gbps": intra_gbps, "inter_gbps": inter_gbps, "fixed_batch": fixed, "per_gpu_96": per_gpu,
            "sweep_30_epochs": sweep, "backbone": backbone, "precision": precision}


def bench_eval(cfg: Config, n_images: int, batch_patches: int, compiles: list[bool], device: torch.device,
               work: Path, repeats: int) -> list[dict]:
    """Images/s of evaluation (`scoring.predict_images`, what training and `evaluate` run): the
    tiny model on a CPU, Swin-T in bf16 on a GPU, over every test image's protocol patches."""
    name = "tiny" if device.type == "cpu" else "swin-t"
    backbone, kwargs, size = BACKBONES[name]
    root = source_images(work / "koniq", n_images)
    c = load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"model.img_size={size}",
                                     f"data.cache_dir={work / 'cache'}", f"model.backbone={backbone}",
                                     "model.pretrained=none", f"data.test_patch_num={cfg.data.test_patch_num}"])
    c = replace(c, model=replace(c.model, backbone_kwargs=kwargs))
    view = prepare(c, Console(quiet=True))
    n = c.data.test_patch_num
    images = view.eval_set("test", c.data.test_protocol, n, size)
    images = replace(images, store=images.store.to(device))
    model = build_model(c.model).to(device)
    aug = Augmenter.evaluation(size, model.mean, model.std).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rows = []
    for compiled in compiles:
        net = compile_model(model, replace(c, train=replace(c.train, compile=compiled)), Console(quiet=True))

        def run():
            with amp:
                predict_images(net, images, aug, batch_patches, device, fixed_shapes=compiled)

        rate = _rate(run, len(images), repeats, device, warmup=1)
        rows.append({"images_per_s": rate, "patches_per_s": rate * n, "images": len(images), "test_patch_num": n,
                     "backbone": name, "img_size": size, "compile": compiled,
                     "precision": "bf16" if device.type == "cuda" else "fp32", "batch_patches": batch_patches})
    return rows


def bench_predict(cfg: Config, n_images: int, workers: int, batch_images: int, device: torch.device, work: Path,
                  console: Console, repeats: int) -> dict:
    """Images/s of `predict` on KonIQ-size JPEGs (resized to 512x384, the test protocol's patches):
    (a) predict's loop before issue 25 (PIL decode in the main thread, then scoring: `Scorer.prepare`
    + `score_arrays`, which now scores through the same `predict_images` as (b)), (b) `predict.score_files` (decoding in `workers` DataLoader workers, JPEGs on
    the GPU where that changes no score, scoring on the same path), side by side; and their parts:
    decoding alone in the main thread and in the workers, the upload, the model alone on images
    already decoded on the device. The tiny model on a CPU, Swin-T on a GPU."""
    from .card import ModelCard, TrainedOn
    from .feed import batches
    from .predict import Scorer, score_files

    name = "tiny" if device.type == "cpu" else "swin-t"
    backbone, kwargs, size = BACKBONES[name]
    model_cfg = replace(cfg.model, backbone=backbone, pretrained="none", img_size=size, backbone_kwargs=kwargs)
    torch.manual_seed(0)
    card = ModelCard(model=asdict(model_cfg), datasets={"koniq10k": TrainedOn({}, [1.0, 5.0], "512x384")},
                     protocol=cfg.data.test_protocol, test_patch_num=cfg.data.test_patch_num)
    scorer = Scorer(build_model(model_cfg), card, device)
    files = sorted(str(f) for f in (source_images(work / "koniq", n_images) / "1024x768").glob("*.jpg"))
    positions = list(range(len(files)))
    console.print(f"predict: {len(files)} KonIQ-size JPEGs, {name} model at {size} px, {card.test_patch_num} "
                  f"patches each, {workers} worker(s)", highlight=False)

    def decode_only(n_workers: int):
        return lambda: [b for b in batches(files, positions, resize=scorer.resize, size=size, exif=scorer.exif,
                                           protocol=card.protocol, patches=card.test_patch_num,
                                           batch_images=batch_images, workers=n_workers, device=device)]

    out = {"decode_main_thread": _rate(decode_only(0), len(files), repeats, device, warmup=1),
           "decode_workers": _rate(decode_only(workers), len(files), repeats, device, warmup=1), "rows": [],
           "images": len(files), "workers": workers, "batch_images": batch_images, "backbone": name,
           "img_size": size, "protocol": card.protocol}
    decoded = decode_only(0)()
    # the protocol's patch count (the default), and one patch an image: where the model is cheap, as
    # on a GPU, the decoder is what bounds the rate
    for patches in dict.fromkeys((card.test_patch_num, 1)):
        def before():
            for start in range(0, len(files), batch_images):
                scorer.score_arrays([scorer.prepare(f) for f in files[start:start + batch_images]], crops=patches)

        timings: dict[str, float] = {}

        def after():
            for *_, t in score_files(scorer, files, positions, crops=patches, batch_images=batch_images,
                                     workers=workers):
                for k, v in t.items():
                    timings[k] = timings.get(k, 0.0) + v

        images = [replace(b.images, origins=b.images.origins[:, :patches]) for b in decoded]
        row = {"patches": patches, "a_before": _rate(before, len(files), repeats, device, warmup=1),
               "b_score_files": _rate(after, len(files), repeats, device, warmup=1),
               "model_only": _rate(lambda: [scorer.score_set(im) for im in images], len(files), repeats, device,
                                   warmup=1)}
        row["b_seconds_per_image"] = {k: v / ((repeats + 1) * len(files)) for k, v in timings.items()}
        if device.type == "cuda":  # JPEGs decoded by nvjpeg and resized on the GPU (other crops: see feed.on_device)
            row["b_decode_gpu"] = _rate(lambda: list(score_files(scorer, files, positions, crops=patches,
                                                                 batch_images=batch_images, workers=workers,
                                                                 decode="gpu")), len(files), repeats, device,
                                        warmup=1)
        row["speedup"] = row["b_score_files"] / row["a_before"]
        out["rows"].append(row)
    return out


def bench_kernels(cfg: Config, backbone: str, compiled: bool, n_images: int, batch: int, steps: int,
                  device: torch.device, work: Path, console: Console) -> dict:
    """The kernel budget of the koniq-swin-t step with `backbone` (counted at batch 2: the counts do
    not depend on the batch), and on a GPU `steps` real steps at `batch` under the sync check."""
    name, kwargs, size = BACKBONES[backbone]
    root = source_images(work / "koniq", n_images)
    c = load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"model.img_size={size}",
                                     f"data.cache_dir={work / 'cache'}", f"model.backbone={name}", "model.pretrained=none",
                                     f"train.compile={str(compiled).lower()}"])
    c = replace(c, model=replace(c.model, backbone_kwargs=kwargs))
    store = prepare(c, Console(quiet=True)).image_store("train")
    console.print(f"kernels: {backbone}, compile={compiled}: counting A, B and C", highlight=False)
    out = step_budget(c, store, 2, device, precision="fp32" if device.type == "cpu" else "bf16")
    out["backbone"] = backbone
    if device.type == "cuda":
        out["sync_debug"] = sync_debug(c, store, batch, steps, device)
    return out


def sync_debug(c: Config, store, batch: int, steps: int, device: torch.device) -> dict:
    """`steps` real steps (`Batches.get` + `Trainer.step`) under torch.cuda.set_sync_debug_mode("error"),
    after two warm-up steps: "passed", or the first synchronisation's error."""
    rig = StepRig.build(replace(c, train=replace(c.train, ema_decay=c.train.ema_decay or 0.999)), store, "bf16",
                        batch, device)
    for _ in range(2):
        rig.end_to_end()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            rig.end_to_end()
        result = {"steps": steps, "batch": batch, "passed": True}
    except RuntimeError as e:
        result = {"steps": steps, "batch": batch, "passed": False, "error": str(e).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rig.trainer.settle()
    return result


def bench_command(what: str, cfg: Config, args) -> dict:
    console = make_console(stderr=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="iqa-bench-"))
    batches = [int(b) for b in str(args.batch).split(",")]
    report = {"machine": machine(), "device": str(device), "settings": vars(args).copy()}
    report["settings"].pop("command_fn", None)
    compiles = [False, True] if args.compile else [False]
    if what in ("augment", "all"):
        report["augment"] = bench_augment(cfg, args.images, batches[0], args.steps, args.workers, device, work, console)
    if what in ("data", "all"):
        report["data"] = bench_data(cfg, args.images, batches[0], args.steps, args.workers, device, work, console)
    if what in ("train", "all"):
        backbones = args.backbones.split(",") if args.backbones else (["tiny"] if device.type == "cpu" else ["swin-t", "swin-s", "swin-b"])
        precisions = args.precisions.split(",") if args.precisions else (["fp32"] if device.type == "cpu" else ["fp32", "bf16"])
        report["train"] = bench_train(cfg, backbones, precisions, compiles, batches, args.images, args.steps, device,
                                      work, console)
        report["projection"] = projection(report["train"])
    if what == "scaling":
        report["scaling"] = bench_scaling(cfg, (args.backbones or ("tiny" if device.type == "cpu" else "swin-t")).split(",")[0],
                                          (args.precisions or ("fp32" if device.type == "cpu" else "bf16")).split(",")[0],
                                          batches, args.images, args.steps, device, work, console, args.global_batch,
                                          args.intra_gbps, args.inter_gbps)
    if what == "kernels":
        backbone = (args.backbones or "swin-t").split(",")[0]  # counted at batch 2: Swin-T is cheap on a CPU too
        report["kernels"] = [bench_kernels(cfg, backbone, compiled, args.images, batches[0], args.steps, device, work,
                                           console) for compiled in compiles]
    if what == "predict":
        report["predict"] = bench_predict(cfg, args.images, args.workers, 16, device, work, console,
                                          max(1, args.steps // 2))
    if what in ("eval", "all"):
        report["eval"] = bench_eval(cfg, args.images, batches[0] * 2, compiles, device, work, max(1, args.steps // 4))
    report["spread"] = spreads(report)  # (max - min) / median of each figure's timed blocks
    out = Path(args.output) if args.output else Path("runs") / f"bench-{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    console.print(f"wrote {out}", highlight=False)
    if not all(math.isfinite(v) and v > 0 for v in _figures(report)):
        raise RuntimeError("a benchmark figure is not a positive number")  # never hide a broken measurement
    return report


def _figures(report: dict):
    for key in ("augment", "data"):
        for v in report.get(key, {}).values():
            if isinstance(v, float):
                yield v
    for row in report.get("train", []):
        yield from (row["model_only"], row["end_to_end"], row["anchor"])
    for row in report.get("eval", []):
        yield row["images_per_s"]
    if "predict" in report:
        yield report["predict"]["decode_main_thread"]
        yield report["predict"]["decode_workers"]
        for row in report["predict"]["rows"]:
            yield from (row["a_before"], row["b_score_files"], row["model_only"])
    for row in report.get("scaling", {}).get("measured", []):
        yield row["end_to_end"]
