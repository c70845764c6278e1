"""`iqa-dist train`."""

from __future__ import annotations

import argparse

from ..errors import UserError
from .options import COMMON, add_config_arguments, add_preset, config_from, overrides, stopped

NAME = "train"
DEFAULT_PRESET = "koniq-swin-t"
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
  iqa-dist train --resume runs/RUN --extend --train.epochs 40   # a finished run longer (its own config + this)
  iqa-dist train --preset koniq-resnet50 --init-from models/hyperiqa-ssl92 --data.dataset spaq --data.root /data/spaq"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset(p, DEFAULT_PRESET)
    p.add_argument("--resume", default="", metavar="RUN_DIR|auto",
                   help="continue a run from its latest checkpoint (auto: the newest unfinished run of this name)")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: allow a longer schedule (train.epochs, train.max_steps, train.patience), "
                        "recorded in the run's meta.json")
    p.add_argument("--init-from", dest="model.init_from", default=argparse.SUPPRESS, metavar="MODEL",
                   help="start from a trained model's weights: a model or run folder, an imported model, or a Hub "
                        "repo id (org/name[@rev]); the preset gives the recipe, the model its architecture (the same "
                        "as --model.init_from)")
    p.add_argument("--teacher", dest="optim.teachers", action="append", default=argparse.SUPPRESS, metavar="MODEL",
                   help="a trained model that teaches (repeatable: their mean): a model or run folder, a Hub repo id, "
                        "a sweep group; its prediction of each training patch joins the loss at optim.teacher_weight "
                        "[1.0]")
    add_config_arguments(p, common=COMMON)


def run(args: argparse.Namespace) -> int:
    cfg = resumed_config(args) or config_from(args)  # a bad value is reported before torch loads (seconds)
    if cfg.model.init_from:
        from ..config import parse_override
        from ..training.initial import with_start_architecture

        cfg = with_start_architecture(cfg, {parse_override(o)[0] for o in overrides(args)})
    from ..training.loop import Preempted, train

    try:
        train(cfg, resume=args.resume, extend=args.extend)
    except Preempted as e:
        return stopped(str(e))  # 124: "checkpointed on request; relaunch to resume"
    return 0


def resumed_config(args: argparse.Namespace):
    """--resume RUN_DIR: the run's own config plus the options given, so `--resume RUN --extend
    --train.epochs 40` is enough (relaunching the original command gives the same config). A
    --preset other than the run's (and other than the default) is refused rather than ignored."""
    from pathlib import Path

    if args.resume in ("", "auto"):
        return None  # a new run, or auto
    from ..config import with_overrides
    from ..artifacts.rundir import RunDir

    path = Path(args.resume)
    if not RunDir.is_run(path):
        return None  # a path resume.choose reports as not a run
    raw = RunDir(path).raw_config()
    preset = raw.pop("preset", "")
    if args.preset not in (preset, DEFAULT_PRESET):
        raise UserError(f"--preset {args.preset}: {path} was trained from preset {preset or '(none)'}; "
                        "--resume RUN_DIR continues it with its own config (give only what changes)")
    return with_overrides(raw, overrides(args), preset=preset, where=str(path / RunDir.CONFIG))
