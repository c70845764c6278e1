"""`iqa-dist sweep`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..output import console
from .evaluate import KEYS as EVAL_KEYS
from .options import COMMON, add_config_arguments, add_preset, config_from, overrides, positive

NAME = "sweep"
USAGE = ("iqa-dist sweep {grid,ablation,splits,cross,collect} [GROUP] [options] [--SECTION.FIELD=VALUE ...] | "
         "sweep --resume GROUP")
HELP = "grids of recipes over splits or seeds with paired statistics; ablations; cross-dataset evaluation"
DESCRIPTION = """\
Many runs from one preset, in one group folder with a combined table: `grid` (config fields,
each with a list of values, crossed: --set KEY=V1,V2), `ablation` (phase one's regularisers:
each alone, none, all), `splits` (one config over N seeded random splits, the HyperIQA
protocol), each times --splits N (seeded random splits) or --seeds N (the preset's split, N
training seeds); `cross` (a trained run evaluated on other datasets); `collect` (rebuild a
group's table). Members of two configs on the same split (or seed) are paired: against the
baseline config (--baseline, default the first) the table gives the paired test-SRCC
difference with a 95% bootstrap interval, a Wilcoxon p-value and a verdict at 5% (5 pairs at
least; 6 or more can show a difference). On a node with several GPUs the members run
concurrently, one per GPU (--gpus-per-member K for more); a failed member is reported and the
others go on; --resume GROUP finishes a group.

examples:
  iqa-dist sweep grid --set optim.lr=1e-5,2e-5 --set model.drop_path=0.1,0.2 --splits 10 --preset koniq-swin-t \\
      --data.root /data/koniq10k                                                      # 40 runs, 8 at once on 8 GPUs
  iqa-dist sweep ablation --splits 10 --preset koniq-swin-t --data.root /data/koniq10k --slurm node
  iqa-dist sweep splits --n 10 --preset koniq-swin-t --data.root /data/koniq10k
  iqa-dist sweep --resume runs/20261127-120000-sweep-grid"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", choices=["grid", "ablation", "splits", "cross", "collect"],
                   help="grid: --set axes crossed; ablation: each regulariser alone, none, all; splits: N seeded "
                        "random splits; cross: evaluate a run on other datasets; collect: rebuild a group's table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="grid: a config field and its values (repeat for more axes, crossed)")
    p.add_argument("--splits", type=int, default=0, metavar="N",
                   help="grid, ablation: run every config on N seeded random splits (paired by split)")
    p.add_argument("--seeds", type=int, default=0, metavar="N",
                   help="grid, ablation: run every config with N training seeds on the preset's split (paired by seed)")
    p.add_argument("--baseline", default="", metavar="CONFIG",
                   help="the config the others are compared with [the first: e.g. lr=1e-5,drop_path=0.1]")
    p.add_argument("--resume", default="", metavar="GROUP", help="continue a group: keep finished members, "
                   "resume unfinished ones from their checkpoints, start missing ones")
    p.add_argument("--gpus-per-member", type=int, default=0, metavar="K",
                   help="GPUs each member trains on (accelerate launch over K GPUs); members run concurrently, "
                        "GPUs / K at a time [1]")
    p.add_argument("--parallel", type=int, default=0, metavar="N",
                   help="at most N members at once [GPUs / K; without GPUs: 1 (CPU slots share the cores)]")
    p.add_argument("group", nargs="?", default="", help="collect: the sweep group folder")
    p.add_argument("--n", type=int, default=10, help="splits: how many seeded random splits [10]")
    p.add_argument("--run", default="", help="cross: the trained run")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=ROOT",
                   help="cross: a dataset to evaluate on (repeat); a kind given twice is labelled by its folder "
                        "(csv=/d/mine: csv-mine) and has its own row and files")
    p.add_argument("--scale", default="", metavar="DATASET|normalized",
                   help="cross: the scale scores are reported on [a jointly trained run: normalized]")
    p.add_argument("--launcher", default="", help="how to start members, e.g. 'accelerate launch --multi_gpu' "
                   "[default: this Python, one process]")
    p.add_argument("--slurm", nargs="?", const="array", default="", choices=["array", "node"],
                   help="submit to SLURM: array = one job per member (launch/slurm_sweep.sbatch); node = one "
                        "node-sized job running the members in parallel on its GPUs (launch/slurm_sweep_node.sbatch)")
    add_preset(p, "koniq-swin-t")
    add_config_arguments(p, common=COMMON)


def run(args: argparse.Namespace) -> int:
    from ..experiments.collect import collect
    from ..experiments.cross import cross
    from ..experiments.sweep import resume, run_sweep

    positive("--gpus-per-member", args.gpus_per_member or None)
    positive("--parallel", args.parallel or None)
    if args.resume:
        return _outcome(resume(args.resume, args.launcher, args.gpus_per_member, args.parallel))
    elif args.kind is None:
        raise UserError("sweep: give a kind (grid, ablation, splits, cross, collect) or --resume GROUP")
    elif args.kind == "collect":
        if not args.group:
            raise UserError("sweep collect: give the sweep group folder")
        collect(args.group)
        return _outcome(Path(args.group))
    elif args.kind == "cross":
        if not args.run or not args.dataset:
            raise UserError("sweep cross: give --run RUN_DIR and at least one --dataset NAME=ROOT")
        given = overrides(args)
        unread = [o.split("=")[0] for o in given if o.split("=")[0] not in (*EVAL_KEYS, "run.root")]
        if unread:  # caught here, not once per member after the group is made
            raise UserError(f"sweep cross: --{unread[0]} is not read by evaluation (it reads --run.root and "
                            f"{', '.join('--' + k for k in EVAL_KEYS)})")
        cfg = config_from(args)
        return _outcome(cross(args.run, args.dataset, cfg.run.root,
                                    [o for o in given if o.split("=")[0] in EVAL_KEYS], args.launcher, args.scale))
    else:
        if args.splits and args.seeds:
            raise UserError("sweep: give --splits N or --seeds N, not both (pairs share a split, or a seed)")
        if args.kind == "splits":
            positive("--n", args.n)
            n, by = args.splits or args.n, "splits"
        else:
            n, by = args.splits or args.seeds, "splits" if args.splits else "seeds" if args.seeds else ""
        if args.set and args.kind != "grid":
            raise UserError(f"sweep {args.kind}: --set belongs to sweep grid")
        return _outcome(run_sweep(args.kind, args.preset, overrides(args), n, args.launcher, args.slurm,
                                  args.gpus_per_member, args.parallel, args.set, by, args.baseline))


def _outcome(group: Path) -> int:
    """1 when a member did not finish (the table says which and why), so scripts notice; 0 for a
    complete group or one submitted to SLURM (no table yet)."""
    from ..experiments.group import MEMBERS, RESULTS

    results = Path(group) / RESULTS
    if not results.exists():
        return 0
    members = json.loads(results.read_text())["members"]
    failed = [m.get("member") or m.get("dataset") for m in members if not m.get("finished", True)]
    if failed:
        again = f"; iqa-dist sweep --resume {group} runs them again" if (Path(group) / MEMBERS).exists() else ""
        console(stderr=True).print(f"sweep: {len(failed)} of {len(members)} member(s) did not finish: "
                                   f"{', '.join(failed)} (logs in {group}){again}", highlight=False)
        return 1
    return 0
