"""`iqa-dist` (also `python -m iqa_dist`): prepare, train, evaluate, predict, report, bench, demo, sweep.

Config overrides are `--section.field=value` or `--section.field value`; `iqa-dist train --help`
lists every field with its documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from typing import Callable, Sequence

from rich.console import Console
from rich.markup import escape

from .config import SECTIONS, all_keys, field_docs, load_config_for, preset_names
from .errors import UserError


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --section.field option per config field, documented from the config's comments."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.strip()})")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs = dict(nargs="?", const="true") if f.type in ("bool", bool) else {}
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", metavar="V",
                               default=argparse.SUPPRESS, help=f"{docs.get(f.name, '')} [default {default!r}]",
                               **kwargs)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [f"{k}={v}" for k, v in vars(args).items() if "." in k]


def _reject_unknown(unknown: list[str]) -> None:
    for item in unknown:
        if item.startswith("--"):
            key = item[2:].split("=")[0]
            hint = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
            more = f"; did you mean --{hint[0]}?" if hint else ""
            raise UserError(f"unknown option --{key}{more}")
        raise UserError(f"unexpected argument {item!r}")


def _config_from(args: argparse.Namespace, extra: Sequence[str] = ()):
    return load_config_for(args.preset, [*extra, *_overrides(args)])


# ---------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> int:
    from .cache import describe, prepare

    extra = [f"data.dataset={args.dataset}"]
    if args.root:
        extra.append(f"data.root={args.root}")
    if args.cache_dir:
        extra.append(f"data.cache_dir={args.cache_dir}")
    if args.skip_bad:
        extra.append("data.skip_bad=true")
    if args.preset is None:  # the patch settings come from the preset that will train on it
        args.preset = "demo" if args.dataset == "synthetic" else "koniq-swin-t"
    cfg = _config_from(args, extra)
    console = Console(stderr=True)
    view = prepare(cfg, console)
    console.print(describe(view))
    for note in view.meta["notes"]:
        console.print(f"  note: {note}")
    if view.image_meta["skipped"]:
        console.print(f"  {len(view.image_meta['skipped'])} bad row(s) were skipped (see the cache's meta.json)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Preempted, train

    cfg = _config_from(args)
    try:
        train(cfg, resume=args.resume)
    except Preempted as e:
        Console(stderr=True).print(f"[yellow]{e}[/]")
        return 124  # a distinct status for "checkpointed on request; relaunch to resume"
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    demo(_config_from(args))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command

    if bool(args.run) == bool(args.weights):
        raise UserError("evaluate: give exactly one of --run RUN_DIR or --weights MODEL_DIR")
    extra = [f"data.dataset={args.dataset}"] + ([f"data.root={args.root}"] if args.root else [])
    if args.split == "all":
        extra.append("data.split=all")
    cfg = _config_from(args, extra)
    evaluate_command(args.run or args.weights, cfg, "test" if args.split == "all" else args.split, args.output)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_command

    return predict_command(args.model, args.paths, args.crops, args.flip, args.format, args.output,
                           args.batch_images, args.device)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report_command

    return report_command(args.runs, args.markdown, args.plot)


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep

    if args.kind == "collect":
        if not args.group:
            raise UserError("sweep collect: give the sweep group folder")
        sweep.collect(args.group)
    elif args.kind == "cross":
        if not args.run or not args.dataset:
            raise UserError("sweep cross: give --run RUN_DIR and at least one --dataset NAME=ROOT")
        cfg = _config_from(args)
        sweep.cross(args.run, args.dataset, cfg.run.root, _overrides(args), args.launcher)
    else:
        sweep.run_sweep(args.kind, args.preset, _overrides(args), args.n, args.launcher, args.slurm)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    bench_command(args.what, _config_from(args), args)
    return 0


COMMANDS: dict[str, tuple[str, Callable]] = {
    "prepare": ("build the dataset cache (decode, resize, split, patches) once", cmd_prepare),
    "train": ("train a preset (run under `accelerate launch` for several GPUs or nodes)", cmd_train),
    "evaluate": ("evaluate a trained model on a dataset (cross-dataset too)", cmd_evaluate),
    "predict": ("score your own images with a trained model", cmd_predict),
    "report": ("compare runs in a table (and plots)", cmd_report),
    "bench": ("measure the data pipeline, training and evaluation throughput", cmd_bench),
    "sweep": ("ablations, random splits and cross-dataset evaluation from one preset", cmd_sweep),
    "demo": ("prepare the synthetic dataset, train the demo preset, evaluate it", cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iqa-dist", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    presets = ", ".join(preset_names())
    for name, (help_text, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.set_defaults(fn=fn)
        if name == "sweep":
            p.add_argument("kind", choices=["ablation", "splits", "cross", "collect"],
                           help="ablation: each regulariser alone, none, all; splits: N seeded random splits; "
                                "cross: evaluate a run on other datasets; collect: rebuild a group's table")
            p.add_argument("group", nargs="?", default="", help="collect: the sweep group folder")
            p.add_argument("--n", type=int, default=10, help="splits: how many seeded random splits [10]")
            p.add_argument("--run", default="", help="cross: the trained run")
            p.add_argument("--dataset", action="append", default=[], metavar="NAME=ROOT",
                           help="cross: a dataset to evaluate on (repeat)")
            p.add_argument("--launcher", default="", help="how to start members, e.g. 'accelerate launch --multi_gpu' "
                           "[default: this Python, one process]")
            p.add_argument("--slurm", action="store_true", help="submit the members as a SLURM job array")
        if name == "bench":
            p.add_argument("what", choices=["augment", "data", "train", "eval", "all"], help="which figures")
            p.add_argument("--images", type=int, default=24, help="data: KonIQ-size source JPEGs [24]")
            p.add_argument("--batch", type=int, default=32, help="patches per batch [32; use 96 on a GPU]")
            p.add_argument("--steps", type=int, default=6, help="timed batches per figure, after warm-up [6]")
            p.add_argument("--workers", type=int, default=2, help="data: DataLoader workers of phase one's pipeline [2]")
            p.add_argument("--backbones", default="", help="train: comma list of tiny,swin-t,swin-s,swin-b "
                           "[tiny on CPU, swin-t,swin-s,swin-b on GPU]")
            p.add_argument("--precisions", default="", help="train: comma list of fp32,bf16 [fp32 on CPU, both on GPU]")
            p.add_argument("--compile", action="store_true", help="train: also measure torch.compile")
            p.add_argument("--device", default=None, help="cuda, cpu [default: cuda when available]")
            p.add_argument("--output", default="", help="JSON file [default runs/bench-WHAT-TIME.json]")
            p.add_argument("--work-dir", default="", help="where source JPEGs and caches go [a temporary folder]")
        if name in ("train", "demo", "prepare", "evaluate", "sweep", "bench"):
            default = None if name == "prepare" else ("demo" if name == "demo" else "koniq-swin-t")
            p.add_argument("--preset", default=default, help=f"a shipped preset ({presets}) or a YAML file "
                           f"[default {default or 'demo for synthetic, else koniq-swin-t'}]")
        if name == "prepare":
            p.add_argument("--dataset", required=True, help="koniq10k | spaq | kadid10k | agiqa3k | livec | csv | synthetic")
            p.add_argument("--root", default="", help="folder holding the dataset's published files")
            p.add_argument("--cache-dir", default="", help="cache root [default $IQA_DIST_CACHE or ~/.cache/iqa_dist]")
            p.add_argument("--skip-bad", action="store_true", help="drop bad rows (listed in the cache metadata)")
        if name == "train":
            p.add_argument("--resume", default="", metavar="RUN_DIR|auto",
                           help="continue a run from its latest checkpoint (auto: the newest unfinished run of this name)")
        if name == "evaluate":
            p.add_argument("--run", default="", help="a run directory (its selected model)")
            p.add_argument("--weights", default="", help="a model directory (model.safetensors + config.json)")
            p.add_argument("--dataset", required=True, help="the dataset to evaluate on (prepared or not)")
            p.add_argument("--root", default="", help="its folder")
            p.add_argument("--split", default="test", choices=["val", "test", "all"],
                           help="which images: the split's test/val part, or all of them (cross-dataset)")
            p.add_argument("--output", default="", help="JSON file [default beside the model: eval-DATASET-SPLIT.json]")
        if name == "predict":
            p.add_argument("model", help="a model directory or a run directory")
            p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or globs")
            p.add_argument("--crops", type=int, default=None, help="patches per image on a fixed grid [default: the model's test_patch_num]")
            p.add_argument("--flip", action="store_true", help="also score the mirrored patches (test-time augmentation)")
            p.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
            p.add_argument("--output", default="", help="write the results to this file instead of stdout")
            p.add_argument("--batch-images", type=int, default=16, help="images decoded and scored together")
            p.add_argument("--device", default=None, help="cuda, cpu, ... [default: cuda when available]")
        if name == "report":
            p.add_argument("runs", nargs="*", help="run directories or folders of runs [default: runs/]")
            p.add_argument("--markdown", action="store_true", help="print Markdown tables")
            p.add_argument("--plot", default="", metavar="DIR", help="write train_loss.png and val_srcc.png there")
        if name in ("train", "demo", "prepare", "evaluate", "sweep", "bench"):
            _add_config_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    console = Console(stderr=True)
    try:
        args, unknown = parser.parse_known_args(argv)
        _reject_unknown(unknown)
        code = args.fn(args)
    except UserError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        code = 130
    sys.exit(code)
