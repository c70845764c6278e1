"""`iqa-dist sweep`."""

from __future__ import annotations

import argparse

from ..errors import UserError
from . import COMMON, add_config_arguments, add_preset, config_from, overrides

NAME = "sweep"
USAGE = "iqa-dist sweep {ablation,splits,cross,collect} [GROUP] [options] [--SECTION.FIELD=VALUE ...]"
HELP = "ablations, random splits and cross-dataset evaluation from one preset"
DESCRIPTION = """\
Many runs from one preset, in one group folder with a combined table: `ablation` (each
regulariser alone, none, all), `splits` (N seeded random splits, the HyperIQA protocol),
`cross` (a trained run evaluated on other datasets), `collect` (rebuild a group's table)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["ablation", "splits", "cross", "collect"],
                   help="ablation: each regulariser alone, none, all; splits: N seeded random splits; "
                        "cross: evaluate a run on other datasets; collect: rebuild a group's table")
    p.add_argument("group", nargs="?", default="", help="collect: the sweep group folder")
    p.add_argument("--n", type=int, default=10, help="splits: how many seeded random splits [10]")
    p.add_argument("--run", default="", help="cross: the trained run")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=ROOT",
                   help="cross: a dataset to evaluate on (repeat)")
    p.add_argument("--scale", default="", metavar="DATASET|normalized",
                   help="cross: the scale scores are reported on [a jointly trained run: normalized]")
    p.add_argument("--launcher", default="", help="how to start members, e.g. 'accelerate launch --multi_gpu' "
                   "[default: this Python, one process]")
    p.add_argument("--slurm", action="store_true", help="submit the members as a SLURM job array")
    add_preset(p, "koniq-swin-t")
    add_config_arguments(p, common=COMMON)


def run(args: argparse.Namespace) -> int:
    from .. import sweep

    if args.kind == "collect":
        if not args.group:
            raise UserError("sweep collect: give the sweep group folder")
        sweep.collect(args.group)
    elif args.kind == "cross":
        if not args.run or not args.dataset:
            raise UserError("sweep cross: give --run RUN_DIR and at least one --dataset NAME=ROOT")
        cfg = config_from(args)
        sweep.cross(args.run, args.dataset, cfg.run.root, overrides(args), args.launcher, args.scale)
    else:
        sweep.run_sweep(args.kind, args.preset, overrides(args), args.n, args.launcher, args.slurm)
    return 0
