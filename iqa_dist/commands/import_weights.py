"""`iqa-dist import`."""

from __future__ import annotations

import argparse

from ..output import console

NAME = "import"
USAGE = "iqa-dist import FILE --out MODEL_DIR [--format ssl92|pyiqa]"
HELP = "make a model directory of published HyperIQA weights (SSL92's, pyiqa's)"
DESCRIPTION = """\
Reads published HyperIQA weights: SSL92/hyperIQA's koniq_pretrained.pkl or pyiqa's
HyperIQA-resnet50-koniq10k-*.pth (the format is detected; --format forces one). Every key must
be a weight of HyperNet(16, 112, 224, 112, 56, 28, 14, 7) with its shape, and every weight must be
there. The file is read with torch.load(weights_only=True): a file that needs code to unpickle is
refused, never run. The model directory's card names the file and its sha256, and the resize, test
protocol and score scale the weights were trained and scored with, so predict and evaluate score
as the original did; `evaluate` says that overlap with its (unpublished) training images cannot be
checked. Fine-tune it with `iqa-dist train --init-from MODEL_DIR`.

examples:
  iqa-dist import pretrained/koniq_pretrained.pkl --out models/hyperiqa-ssl92
  iqa-dist predict models/hyperiqa-ssl92 photos/ --format csv --output scores.csv"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the published weights file (.pkl, .pth)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="the model directory to write")
    p.add_argument("--format", choices=["ssl92", "pyiqa"], default=None,
                   help="the file's format [default: detected from its keys]")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..artifacts.imported import import_published
    from .options import writable

    writable("--out", args.out, folder=True)
    card = import_published(Path(args.file), Path(args.out), args.format)
    w = card.weights
    trained = next(iter(card.datasets.values()))
    console().print(f"wrote {args.out}: {w['format']} weights from {w['name']} (sha256 {w['sha256']}); scores on "
                    f"{trained.score_range[0]:g}-{trained.score_range[1]:g}, images resized {trained.resize}, "
                    f"{card.test_patch_num} {card.protocol} patches of {card.size} px", highlight=False)
    return 0
