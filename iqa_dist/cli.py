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

from .config import SECTIONS, all_keys, field_docs, load_config, preset_names
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
    return load_config(args.preset, [*extra, *_overrides(args)])


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
        return 124  # what the SLURM script checks to requeue
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    demo(_config_from(args))
    return 0


def not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        Console(stderr=True).print(f"iqa-dist {name}: not built yet (see the project's open issues)")
        return 2

    return run


COMMANDS: dict[str, tuple[str, Callable]] = {
    "prepare": ("build the dataset cache (decode, resize, split, patches) once", cmd_prepare),
    "train": ("train a preset (run under `accelerate launch` for several GPUs or nodes)", cmd_train),
    "evaluate": ("evaluate a trained model on a prepared dataset", not_built("evaluate")),
    "predict": ("score your own images with a trained model", not_built("predict")),
    "report": ("compare runs in a table (and plots)", not_built("report")),
    "bench": ("measure the data pipeline and training throughput", not_built("bench")),
    "sweep": ("ablations, random splits and cross-dataset evaluation from one preset", not_built("sweep")),
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
        if name in ("train", "demo", "prepare"):
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
        if name in ("train", "demo", "prepare"):
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
