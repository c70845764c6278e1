"""Decoding and resizing one image file: the only work the cache build does per image.

Kept apart from cache.py (and this package's __init__ imports nothing), with only PIL and numpy, so that the decode worker processes start
in a fraction of a second (they never import torch).
"""

from __future__ import annotations

import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def decode(path: str | IO[bytes], resize: str, min_side: int, exif: bool = True) -> tuple[bytes, int, int, str]:
    """File (a path, or an open binary file: an upload) -> (uint8 HWC bytes, height, width,
    problem). Any mode becomes 8-bit RGB; with `exif`, a photo's EXIF orientation tag is applied (a
    phone's portrait photo stored sideways comes out upright, as a viewer shows it)."""
    try:
        with warnings.catch_warnings():
            # a dataset's own large photo (PIL warns above 89 Mpx, printing a raw warning per file) is
            # decoded; above twice that PIL refuses it as a decompression bomb: a row problem below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # truncated files fail here, not later
                im = to_rgb(upright(im) if exif else im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return b"", 0, 0, f"unreadable image: {type(e).__name__}: {e}"
    im, problem = fit(im, resize, min_side)
    return (b"", 0, 0, problem) if problem else (im.tobytes(), im.height, im.width, "")


def upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (unchanged without a tag)."""
    return ImageOps.exif_transpose(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit grayscale keeps its top 8 bits (PIL would clip)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.uint32)
        im = Image.fromarray((a >> 8 if a.max() > 255 else a).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def fit(im: Image.Image, resize: str, min_side: int) -> tuple[Image.Image, str]:
    """The resize policy applied to an RGB image, and a problem when it is smaller than a patch."""
    size = target_size(im.width, im.height, resize)
    if size != im.size:
        im = im.resize(size, Image.BILINEAR)  # PIL's antialiased bilinear, as torchvision's Resize
    return im, too_small(im.width, im.height, resize, min_side)


def too_small(width: int, height: int, resize: str, min_side: int) -> str:
    """Why an image of width x height after the resize policy cannot be scored ("" when it can)."""
    if min(width, height) < min_side:
        return f"image is {width}x{height} after resize ({resize}), smaller than the {min_side}-px patch"
    return ""


def target_size(width: int, height: int, resize: str) -> tuple[int, int]:
    """(W, H) after the resize policy: none | short:N | WxH | WxH!. A fixed WxH follows the image's
    orientation (512x384 makes a portrait photo 384x512), so no image is squashed; WxH! is exactly
    W x H whatever the orientation (the original HyperIQA's 384 wide x 512 high squash of KonIQ)."""
    if resize == "none":
        return width, height
    if resize.startswith("short:"):
        n = int(resize[6:])
        scale = n / min(width, height)
        return max(n, round(width * scale)), max(n, round(height * scale))
    w, h = (int(v) for v in resize.removesuffix("!").split("x"))
    if resize.endswith("!"):
        return w, h
    return (h, w) if (width < height) != (w < h) else (w, h)


def decode_job(args: tuple[str, str, int, bool]) -> tuple[bytes, int, int, str]:
    """decode() for Pool.imap."""
    return decode(*args)
