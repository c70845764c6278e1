"""Tiny datasets written in each dataset's real published format (the README's Data table).

Images are small random-texture JPEG/PNG files; scores are deterministic. Each writer returns
the root folder and the list of (name, score) it wrote.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image


def image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    """A random smooth texture of `size` (W, H) saved in `mode` by the file's extension."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def koniq(root: Path, n: int = 12, size: tuple[int, int] = (256, 192), sets: bool = True) -> list[tuple[str, float]]:
    """KonIQ-10k: 1024x768/<id>.jpg, koniq10k_scores_and_distributions.csv (quoted header),
    koniq10k_distributions_sets.csv (set column; its MOS on the 0-100 scale)."""
    rows = []
    names = [f"{10004473376 + 7919 * i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        image(root / "1024x768" / name, size, seed=i)
        mos_z = round(20 + 60 * i / max(1, n - 1), 3)
        rows.append((name, mos_z))
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    with open(root / "koniq10k_scores_and_distributions.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(header)
        for name, z in rows:
            w.writerow([name, 1, 5, 40, 50, 10, 106, round(1 + 4 * z / 100, 4), 0.7, z])
    if sets:
        split_of = ["training"] * (n - 4) + ["validation"] * 2 + ["test"] * 2
        with open(root / "koniq10k_distributions_sets.csv", "w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
            w.writerow(["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"])
            for (name, z), s in zip(rows, split_of):
                w.writerow([name, 1, 5, 40, 50, 10, 106, z, 7.0, s])
    return rows


def spaq(root: Path, n: int = 6, xlsx: bool = True) -> list[tuple[str, float]]:
    """SPAQ: TestImage/00001.jpg..., Annotations/MOS and Image attribute scores.xlsx."""
    rows = [(f"{i + 1:05d}.jpg", round(10 + 15 * i, 2)) for i in range(n)]
    for i, (name, _) in enumerate(rows):
        size = (400, 300) if i % 2 else (300, 400)  # landscape and portrait phones
        image(root / "TestImage" / name, size, seed=100 + i)
    header = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    if xlsx:
        import openpyxl

        wb = openpyxl.Workbook()
        ws = wb.active
        ws.append(header)
        for name, mos in rows:
            ws.append([name, mos, 50, 50, 50, 50, 50])
        wb.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    else:
        with open(root / "Annotations" / "MOS and Image attribute scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([[name, mos, 50, 50, 50, 50, 50] for name, mos in rows])
    return rows


def kadid(root: Path, refs: int = 4, per_ref: int = 3) -> list[tuple[str, float]]:
    """KADID-10k: images/I01_01_01.png..., dmos.csv (dist_img, ref_img, dmos, var)."""
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "dmos.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dist_img", "ref_img", "dmos", "var"])
        for r in range(refs):
            for d in range(per_ref):
                name, ref = f"I{r + 1:02d}_01_{d + 1:02d}.png", f"I{r + 1:02d}.png"
                image(root / "images" / name, (160, 120), seed=200 + 10 * r + d)
                dmos = round(4.5 - d, 3)
                w.writerow([name, ref, dmos, 0.5])
                rows.append((name, dmos))
    return rows


def agiqa(root: Path, prompts: int = 3, per_prompt: int = 2) -> list[tuple[str, float]]:
    """AGIQA-3K: data.csv (name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
    std_align) and the images beside it in AGIQA-3K/."""
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"])
        for p in range(prompts):
            for g in range(per_prompt):
                name = f"model{g}_normal_{p:03d}.jpg"
                image(root / "AGIQA-3K" / name, (256, 256), seed=300 + 10 * p + g)
                mos = round(1 + p + 0.5 * g, 3)
                w.writerow([name, f"a photo of thing {p}", "", "", "", mos, 0.6, 3.0, 0.5])
                rows.append((name, mos))
    return rows


def livec(root: Path, n: int = 12) -> list[tuple[str, float]]:
    """LIVE Challenge: Data/AllImages_release.mat (1169x1 cell), Data/AllMOS_release.mat (1xN),
    Images/; the first 7 entries are dropped by every loader."""
    import scipy.io

    names = [f"{i + 1}.bmp" if i < 7 else f"{i + 100}.JPG" for i in range(n)]
    mos = [round(20 + 5 * i, 2) for i in range(n)]
    for i, name in enumerate(names):
        if i >= 7:
            image(root / "Images" / name, (200, 200), seed=400 + i)
    (root / "Data").mkdir(parents=True, exist_ok=True)
    cell = np.empty((n, 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = np.array([name])
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos], dtype=float)})
    return list(zip(names, mos))[7:]


def generic_csv(root: Path, n: int = 8, split: bool = False) -> list[tuple[str, float]]:
    """A pyiqa-style meta CSV: name, mos, std (+ split)."""
    rows = [(f"img/{i:03d}.png", round(0.1 * i, 3)) for i in range(n)]
    for i, (name, _) in enumerate(rows):
        image(root / name, (150, 150), seed=500 + i)
    with open(root / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "mos", "std"] + (["split"] if split else []))
        for i, (name, mos) in enumerate(rows):
            w.writerow([name, mos, 0.1] + ([["train", "val", "test", "train"][i % 4]] if split else []))
    return rows


def qalign_split(path: Path, root_rows: list[tuple[str, float]], n_train: int) -> tuple[Path, Path]:
    """Q-Align-style JSON lists: [{"image": "koniq/1024x768/<name>", "score": s}, ...]."""
    train = path / "train_koniq.json"
    test = path / "test_koniq.json"
    path.mkdir(parents=True, exist_ok=True)
    entries = [{"image": f"koniq-10k/1024x768/{n}", "score": s} for n, s in root_rows]
    train.write_text(json.dumps(entries[:n_train]))
    test.write_text(json.dumps(entries[n_train:]))
    return train, test


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: what a decompression bomb shows
    a decoder before it decodes (a real bomb is a few KB of zeros that inflate to gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
