"""Feeding `iqa-dist predict`: image files -> batches of resized images with their test-protocol
patch origins, as `EvalSet`s for `scoring.predictions.predict_images`.

DataLoader workers decode files with PIL (`decode.decode`, exactly as the dataset cache does) and
compute the patch origins, so the main process only packs and uploads. With the device decoder
(`on_device`: on a GPU under the grid protocol, or when asked for) JPEGs are the exception: the
workers only read their bytes, and the main process decodes a batch of them at once with nvjpeg
and resizes them on the device. A file that cannot be used is reported with its
reason, with the wording of `decode.decode`, and never stops the iteration.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import UserError
from .decode import decode, target_size, too_small
from .protocol import patch_origins
from .store import EvalSet, ImageStore

DECODERS = ("auto", "cpu", "gpu", "tensor")
JPEG_MAGIC = b"\xff\xd8\xff"
# EXIF orientation -> (swap H and W, dims to flip) of a CHW image: ImageOps.exif_transpose's table.
# Applied here because torchvision's nvjpeg decoder ignores apply_exif_orientation (CPU only).
TURNS = {2: (False, (2,)), 3: (False, (1, 2)), 4: (False, (1,)), 5: (True, ()), 6: (True, (2,)),
         7: (True, (1, 2)), 8: (True, (1,))}


def read_list(path: str) -> list[str]:
    """Image paths, one a line, from a list file; blank lines and #-comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{path}: cannot read the list of images ({why})") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def default_workers(device: torch.device) -> int:
    """Decoding workers per scoring process. On a GPU: the machine's cores shared by the launch's
    processes on it, at most 8 (each worker holds prefetched batches in memory). On the CPU: none,
    the scoring process decodes between batches: the model already runs on every core, and a
    worker beside it only takes turns with it (measured with `iqa-dist bench predict`: 2 workers
    on 2 cores are no faster than none, and slower than none at one patch an image)."""
    if device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # SLURM's share
    return max(1, min(8, cores // local))


@dataclass
class FeedBatch:
    """One batch of the caller's list: the images that decoded, ready to score, and the failures."""

    positions: list[int]  # positions (in the caller's full list) of the images that decoded, in order
    images: EvalSet | None  # those images (pixels on the device, ids = positions); None when none decoded
    failed: list[tuple[int, str]]  # (position, reason) of the files that could not be used
    timings: dict[str, float]  # host seconds of this batch's main-process stages: wait, gpu_decode, upload


@dataclass(frozen=True)
class Policy:
    """How every file is prepared: the model's resize, patch size and EXIF choice, its test protocol."""

    resize: str
    size: int
    exif: bool
    protocol: str
    patches: int


def load(position: int, path: str, policy: Policy) -> tuple:
    """One file decoded on the CPU: ("pixels", position, HWC bytes, h, w, origins (n, 2)) or
    ("failed", position, reason)."""
    pixels, h, w, why = decode(path, policy.resize, policy.size, policy.exif)
    if why:
        return "failed", position, why
    return "pixels", position, pixels, h, w, patch_origins(policy.protocol, pixels, h, w, policy.size, policy.patches)


def read_jpeg(path: str, exif: bool) -> tuple[torch.Tensor, int] | None:
    """A JPEG's bytes (uint8 tensor) and EXIF orientation (1 without `exif`); None for any other
    file, or a header PIL cannot parse (the CPU decode then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(JPEG_MAGIC))
            if head != JPEG_MAGIC:
                return None  # not read further: PIL reads it again
            data = head + f.read()
        orientation = 1
        if exif:
            with Image.open(io.BytesIO(data)) as im:  # the header only: no pixels are decoded
                orientation = im.getexif().get(0x0112, 1)  # the Orientation tag
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation


class Files(Dataset):
    """(position, path) items -> ("pixels", ...) or ("failed", ...) from `load`, or, when `raw_jpegs`,
    ("jpeg", position, path, bytes, orientation) for the device decoder."""

    def __init__(self, items: list[tuple[int, str]], policy: Policy, raw_jpegs: bool) -> None:
        self.items, self.policy, self.raw_jpegs = items, policy, raw_jpegs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        position, path = self.items[i]
        if not os.path.exists(path):
            return "failed", position, "no such file"
        try:
            raw = read_jpeg(path, self.policy.exif) if self.raw_jpegs else None
            return ("jpeg", position, path, *raw) if raw else load(position, path, self.policy)
        except Exception as e:  # noqa: BLE001 (a file PIL trips over in a way decode does not name: one failed row, never a dead loader)
            return "failed", position, f"unreadable image: {type(e).__name__}: {e}"


def collate(items: list[tuple]) -> dict:
    """A batch of `Files` items: the decoded images in one flat uint8 buffer (as store_from_rows
    packs cache rows) with their origins (k, n, 2), the JPEGs' bytes, the failures."""
    done = [it for it in items if it[0] == "pixels"]
    store = ImageStore.of_images([np.frombuffer(it[2], np.uint8).reshape(it[3], it[4], 3) for it in done])
    return {"order": [it[1] for it in items], "positions": [it[1] for it in done], "pixels": store.pixels,
            "offsets": store.offsets, "heights": store.heights, "widths": store.widths,
            "origins": torch.from_numpy(np.stack([it[5] for it in done])) if done else None,
            "jpegs": [it[1:] for it in items if it[0] == "jpeg"],
            "failed": [(it[1], it[2]) for it in items if it[0] == "failed"]}


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 images on `device` (None where the decoder fails): one batched call (what
    nvjpeg is fast at), or one call per file when the batch has a bad one, to find it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            out = []
            for data in datas:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    out.append(None)
            return out


def resized(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, height, width) uint8 by antialiased bilinear, as PIL's resize in
    `decode.fit` (PIL computes in fixed point: values differ by at most 1)."""
    if x.shape[1:] == (height, width):
        return x  # decode.fit does not resample either
    y = F.interpolate(x[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8)


def assemble(packed: dict, policy: Policy, device: torch.device, timings: dict[str, float]) -> FeedBatch:
    """A collated batch -> its images in one flat buffer on `device`, JPEGs decoded there, in list order."""
    start = time.perf_counter()
    pixels = packed["pixels"].to(device, non_blocking=True)
    timings["upload"] = time.perf_counter() - start
    positions, failed = list(packed["positions"]), [(int(p), str(why)) for p, why in packed["failed"]]
    if not packed["jpegs"]:  # the workers did everything: their buffer is the batch's
        images = evalset(pixels, packed["offsets"], packed["heights"], packed["widths"], positions, packed["origins"])
        return FeedBatch(positions, images, failed, timings)
    start = time.perf_counter()
    # position -> (flat HWC pixels, or a CHW image still to resize; h; w; origins, or None until known)
    rows = {p: (pixels[o:o + h * w * 3], h, w, packed["origins"][i]) for i, (p, o, h, w) in enumerate(zip(
        positions, packed["offsets"].tolist(), packed["heights"].tolist(), packed["widths"].tolist()))}
    failed += device_rows(packed["jpegs"], policy, device, rows)
    order = [p for p in packed["order"] if p in rows]
    sizes = torch.tensor([rows[p][1] * rows[p][2] * 3 for p in order], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    flat = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=device)
    for p, o, n in zip(order, offsets.tolist(), sizes.tolist()):
        x, h, w, _ = rows[p]
        if x.dim() == 1:
            flat[o:o + n].copy_(x)
        else:  # resized straight into its place, HWC
            flat[o:o + n].view(h, w, 3).copy_(resized(x, h, w).permute(1, 2, 0))
    # The random protocol seeds crops with a CRC of the resized pixels: one copy of the batch to the
    # host (the grid protocol needs no pixels)
    fresh = any(rows[p][3] is None for p in order)
    host = flat.cpu().numpy() if fresh and policy.protocol == "random" else None
    origins = []
    for p, o, n in zip(order, offsets.tolist(), sizes.tolist()):
        _, h, w, known = rows[p]
        origins.append(known if known is not None else torch.from_numpy(patch_origins(
            policy.protocol, b"" if host is None else host[o:o + n], h, w, policy.size, policy.patches)))
    timings["gpu_decode"] = time.perf_counter() - start
    rank = {p: i for i, p in enumerate(packed["order"])}
    images = evalset(flat, offsets, torch.tensor([rows[p][1] for p in order], dtype=torch.int64),
                     torch.tensor([rows[p][2] for p in order], dtype=torch.int64), order,
                     torch.stack(origins) if origins else None)
    return FeedBatch(order, images, sorted(failed, key=lambda f: rank[f[0]]), timings)


def device_rows(jpegs: list[tuple], policy: Policy, device: torch.device, rows: dict) -> list[tuple[int, str]]:
    """Decodes a batch's JPEGs on `device` and turns them upright into `rows` (resized later,
    straight into the batch's buffer); a file the decoder refuses is decoded by PIL instead.
    Returns the failures."""
    failed = []
    for (p, path, _, orientation), x in zip(jpegs, decode_jpegs([j[2] for j in jpegs], device)):
        if x is None:  # corrupt, or a kind nvjpeg refuses: PIL knows best, and says why
            got = load(p, path, policy)
            if got[0] == "failed":
                failed.append(got[1:])
            else:
                rows[p] = (torch.frombuffer(bytearray(got[2]), dtype=torch.uint8).to(device), got[3], got[4],
                           torch.from_numpy(got[5]))
            continue
        swap, flips = TURNS.get(orientation, (False, ()))
        x = x.transpose(1, 2) if swap else x
        x = x.flip(flips) if flips else x
        w, h = target_size(x.shape[2], x.shape[1], policy.resize)
        why = too_small(w, h, policy.resize, policy.size)
        if why:
            failed.append((p, why))
        else:
            rows[p] = (x, h, w, None)
    return failed


def evalset(pixels: torch.Tensor, offsets: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
            positions: list[int], origins: torch.Tensor | None) -> EvalSet | None:
    """The batch as an EvalSet (ids = positions, scores unknown: zeros); None when it is empty."""
    if not positions:
        return None
    store = ImageStore(pixels=pixels, offsets=offsets, heights=heights, widths=widths,
                       scores=torch.zeros(len(positions)), ids=torch.tensor(positions, dtype=torch.int64))
    return EvalSet(store=store, origins=origins)


def on_device(decoder: str, device: torch.device, protocol: str) -> bool:
    """Whether JPEGs are decoded by torchvision on `device` (else by PIL in the workers). "auto"
    does so on a GPU under the grid protocol only: nvjpeg and the torch resize differ from PIL by
    at most 1 in some pixels (a score moves by the model's response to that), and the random
    protocol seeds each image's crops with a CRC of its pixels, so such an image would get other
    crops altogether, and a score as far from `evaluate`'s as another crop's."""
    if decoder not in DECODERS:
        raise UserError(f"decode={decoder!r}: choose one of {', '.join(DECODERS)}")
    if decoder == "gpu" and device.type != "cuda":
        raise UserError(f"decode=gpu decodes JPEGs with nvjpeg on a CUDA GPU, and this run's device is {device}: "
                        "use decode=auto or cpu")
    return decoder in ("gpu", "tensor") or (decoder == "auto" and device.type == "cuda" and protocol == "grid")


def batches(paths: list[str], positions: list[int], *, resize: str, size: int, exif: bool, protocol: str,
            patches: int, batch_images: int, workers: int, device: torch.device,
            decoder: str = "auto") -> Iterator[FeedBatch]:
    """`paths` (at distinct `positions` of the caller's list) in batches of `batch_images` files,
    decoded and resized by the model's policy, with the protocol's `patches` origins each.

    decoder: auto (JPEGs on the GPU when `device` is CUDA and the protocol is grid, see
    `on_device`; else PIL), cpu (PIL always), gpu
    (nvjpeg; needs CUDA), tensor (torchvision's decoder on any device; for tests and benchmarks)."""
    if len(paths) != len(positions):
        raise ValueError(f"{len(paths)} paths but {len(positions)} positions")
    policy = Policy(resize, size, exif, protocol, patches)
    files = Files(list(zip(positions, paths)), policy, raw_jpegs=on_device(decoder, device, protocol))
    loader = DataLoader(files, batch_size=batch_images, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    batches_ = iter(loader)
    while True:
        start = time.perf_counter()
        packed = next(batches_, None)
        if packed is None:
            return
        timings = {"wait": time.perf_counter() - start, "gpu_decode": 0.0, "upload": 0.0}
        yield assemble(packed, policy, device, timings)
