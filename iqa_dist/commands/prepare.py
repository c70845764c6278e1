"""`iqa-dist prepare`."""

from __future__ import annotations

import argparse

from ..config import DATASETS, all_keys
from ..output import console
from .options import add_config_arguments, config_from

NAME = "prepare"
USAGE = "iqa-dist prepare --dataset NAME [--root DIR] [--cache-dir DIR] [--skip-bad] [--preset NAME] [--data.FIELD=VALUE ...]"
HELP = "build the dataset cache (decode, resize, split) once"
DESCRIPTION = """\
Decode and resize every image of a dataset once into the cache, and split it. `train` calls the
same code, so this is optional; a second prepare with the same inputs is a no-op. The patch size
(the smallest usable image) and the resize policy come from --preset.

examples:
  iqa-dist prepare --dataset koniq10k --root /data/koniq10k
  iqa-dist prepare --dataset csv --root /data/mine --skip-bad --preset koniq-swin-t
  iqa-dist prepare --dataset synthetic    # the demo's dataset, generated into the cache"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="NAME", help=" | ".join(DATASETS))
    p.add_argument("--root", default="", help="folder holding the dataset's published files")
    p.add_argument("--cache-dir", default="", help="cache root [default $IQA_DIST_CACHE or ~/.cache/iqa_dist]")
    p.add_argument("--skip-bad", action="store_true", help="drop bad rows (listed in the cache metadata)")
    p.add_argument("--preset", default=None, help="the preset that will train on it (its patch size and resize) "
                   "[default demo for synthetic, else koniq-swin-t]")
    add_config_arguments(p, [k for k in all_keys() if k.startswith("data.")] + ["model.img_size"])


def run(args: argparse.Namespace) -> int:
    from ..data.cache import describe, prepare

    extra = [f"data.dataset={args.dataset}"]
    if args.root:
        extra.append(f"data.root={args.root}")
    if args.cache_dir:
        extra.append(f"data.cache_dir={args.cache_dir}")
    if args.skip_bad:
        extra.append("data.skip_bad=true")
    if args.preset is None:
        args.preset = "demo" if args.dataset == "synthetic" else "koniq-swin-t"
    cfg = config_from(args, extra)
    out = console(stderr=True)
    view = prepare(cfg, out)
    out.print(describe(view), highlight=False)
    for note in view.meta["notes"]:
        out.print(f"  note: {note}", highlight=False)
    if view.image_meta["skipped"]:
        out.print(f"  {len(view.image_meta['skipped'])} bad row(s) were skipped; they are listed in "
                  f"{view.image_dir / 'meta.json'}", highlight=False)
    return 0
