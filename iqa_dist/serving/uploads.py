"""Uploaded images -> the arrays a model scores, through `predict`'s own decode path and wording.

An upload is decoded by `data.decode.decode`, the function the cache and `predict` decode files
with, so an unreadable or too small image is refused with the reason `predict` gives for the same
file. What only a server needs comes first: the image's size is read from its header and checked
against the pixel limit before any pixel is decoded (a decompression bomb: a few KB of PNG that
decode to gigabytes), and PIL's own bomb check (`Image.MAX_IMAGE_PIXELS`) is answered the same way.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.decode import decode
from ..errors import first_line


class UploadError(Exception):
    """An upload that cannot be scored: the HTTP status to answer with, and why (one line)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Upload(io.BytesIO):
    """An uploaded file's bytes, known by its name: PIL quotes the file in its messages (`cannot
    identify image file 'a.jpg'`), as it quotes a path when `predict` reads one."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def quiet_bomb_warnings() -> None:
    """PIL warns (once, on stderr) about images between MAX_IMAGE_PIXELS and twice that; a server
    answers those itself (`check_pixels`), so the warning would only be noise in its log."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """413 for an image whose header declares more than `max_pixels` pixels, or that PIL refuses
    as a decompression bomb; nothing is decoded. A file PIL cannot even open passes: `decode`
    then says why, in predict's words."""
    try:
        with Image.open(Upload(data, name)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"{name}: too many pixels to decode ({first_line(e)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return
    if width * height > max_pixels:
        raise UploadError(413, f"{name}: {width}x{height} is {width * height:,} pixels, over this server's limit of "
                               f"{max_pixels:,} (serve --max-pixels)")


def read_image(data: bytes, name: str, resize: str, size: int, exif: bool, max_pixels: int) -> np.ndarray:
    """An upload as the resized uint8 HWC RGB array a model scores (`Scorer.prepare` of the same
    file gives the same array); UploadError 413 or 400 when it cannot be."""
    check_pixels(data, name, max_pixels)
    pixels, h, w, why = decode(Upload(data, name), resize, size, exif)
    if why:
        raise UploadError(400, f"{name}: {why}")
    return np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
