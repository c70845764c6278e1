"""`iqa-dist train`."""

from __future__ import annotations

import argparse

from ..output import console
from . import COMMON, add_config_arguments, add_preset, config_from

NAME = "train"
USAGE = "iqa-dist train [--preset NAME] [--resume RUN_DIR|auto] [--extend] [--SECTION.FIELD=VALUE ...]"
HELP = "train a preset (run under `accelerate launch` for several GPUs or nodes)"
DESCRIPTION = """\
Train a preset: one process here, or N GPUs and N nodes under `accelerate launch`. Every config
field is an option --section.field=VALUE (listed below); the batch size is global, so the same
preset trains the same recipe on any number of GPUs. Each run writes runs/<time>-<name>/.

examples:
  iqa-dist train --preset koniq-swin-t --data.root /data/koniq10k
  accelerate launch --multi_gpu --num_processes 8 -m iqa_dist train --preset koniq-swin-t --data.root /data/koniq10k
  iqa-dist train --preset koniq-swin-t --data.root /data/koniq10k --resume auto     # continue after a stop
  iqa-dist train --preset koniq-swin-t --resume runs/RUN --extend --train.epochs 40  # train a finished run longer"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset(p, "koniq-swin-t")
    p.add_argument("--resume", default="", metavar="RUN_DIR|auto",
                   help="continue a run from its latest checkpoint (auto: the newest unfinished run of this name)")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: allow a longer schedule (train.epochs, train.max_steps, train.patience), "
                        "recorded in the run's meta.json")
    add_config_arguments(p, common=COMMON)


def run(args: argparse.Namespace) -> int:
    from ..train import Preempted, train

    try:
        train(config_from(args), resume=args.resume, extend=args.extend)
    except Preempted as e:
        console(stderr=True).print(f"[yellow]{e}[/]")
        return 124  # a distinct status for "checkpointed on request; relaunch to resume"
    return 0
