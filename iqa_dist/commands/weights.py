"""`iqa-dist weights fetch`."""

from __future__ import annotations

import argparse

from ..output import console
from .options import add_config_arguments, add_preset, config_from

NAME = "weights"
HELP = "fetch a preset's pretrained weights into the Hugging Face cache (for offline compute nodes)"
DESCRIPTION = """\
Downloads the pretrained weights a preset (or --model.backbone TAG) starts from into the Hugging
Face cache, on a machine with internet (a login node). Compute nodes that share the cache
(HF_HOME) then train with HF_HUB_OFFLINE=1. Prints the file and its sha256, which every run
records in meta.json and in its model card.

examples:
  iqa-dist weights fetch --preset koniq-swin-t
  iqa-dist weights fetch --model.backbone resnet50.tv_in1k"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["fetch"], help="fetch: download (or find) the weights")
    add_preset(p, "koniq-swin-t")
    add_config_arguments(p, ["model.backbone", "model.pretrained"])


def run(args: argparse.Namespace) -> int:
    from ..models.weights import fetch

    cfg = config_from(args)
    found = fetch(cfg.model)
    console().print(f"{found['tag']}: {found['file']}\nsha256 {found['sha256']}", highlight=False)
    return 0
