"""`iqa-dist` (also `python -m iqa_dist`): prepare, train, evaluate, predict, serve, report, bench,
demo, sweep, weights, import, export, launch. Each subcommand lives in `iqa_dist/commands/`; this file parses and dispatches,
and turns every UserError into one line on stderr and its exit status (never a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from rich.markup import escape

from . import __version__
from .commands import (bench, demo, evaluate, export, import_weights, launch, predict, prepare, report, serve, sweep,
                       train, weights)
from .commands.options import Help, dict_overrides, reject_unknown
from .errors import UserError
from .output import console

# name -> (one-line help, the command's module)
COMMANDS = {m.NAME: (m.HELP, m) for m in (prepare, train, evaluate, predict, serve, report, bench, sweep, demo, weights,
                                           import_weights, export, launch)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iqa-dist", description="Blind image quality assessment: HyperIQA with a "
                                     "Swin backbone, trained on one GPU or many nodes.",
                                     formatter_class=Help)
    parser.add_argument("--version", action="version", version=f"iqa-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, module) in COMMANDS.items():
        about = getattr(module, "DESCRIPTION", "")
        p = sub.add_parser(name, help=module.HELP, usage=getattr(module, "USAGE", None),
                           description=f"iqa-dist {name}: {module.HELP}" + (f"\n\n{about}" if about else ""),
                           formatter_class=Help, allow_abbrev=False)
        p.set_defaults(command_fn=module.run)
        module.add_arguments(p)
    return parser


def wait_passively() -> None:
    """OpenMP's threads wait for work by spinning, which takes the cores from whatever else runs
    (the demo fell from 5.4 to 1.7 steps/s beside one CPU-bound process on 2 cores): they sleep
    instead, unless the user chose a policy. OpenMP reads it when torch loads, so this runs first."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    wait_passively()
    err = console(stderr=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == [launch.NAME] and not set(argv[1:2]) & {"-h", "--help"}:
            code = launch.run(argparse.Namespace(rest=argv[1:], commands=list(COMMANDS)))  # accelerate's options
        else:
            args, unknown = build_parser().parse_known_args(argv)
            reject_unknown(dict_overrides(args, unknown))
            code = args.command_fn(args)
    except UserError as e:
        if e.exit_code and str(e):
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        elif str(e):  # not a failure: e.g. resuming a run that has finished (no text: another process says it)
            err.print(escape(str(e)), highlight=False)
        code = e.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        code = 130
    sys.exit(code)
