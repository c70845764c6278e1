"""What the commands share: the config options (--section.field=value) and turning them into a
Config, checks of output paths and counts, and the exit status of a stopped run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import textwrap
from pathlib import Path
from typing import Sequence

from ..config import SECTIONS, all_keys, field_docs, load_config_for, preset_names
# set by `iqa-dist launch` or distributed.launcher: a stop on request exits 0 and leaves this marker
from ..distributed.launcher import LAUNCHED
from ..errors import UserError


class Help(argparse.HelpFormatter):
    """--help at the terminal's width: prose paragraphs re-wrapped to it, option help never broken
    inside a word (a/b/c lists, paths), and the commands (usage, examples) broken between words,
    an example's comment on its own line above it and its continuation marked with a backslash,
    so that each still copies and runs as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines) or block.rstrip().endswith(":") and len(lines) == 1:
                blocks.append("\n".join(_examples([indent + line for line in lines], width)))
            else:
                blocks.append(textwrap.fill(" ".join(line.strip() for line in lines), width, initial_indent=indent,
                                            subsequent_indent=indent, break_long_words=False, break_on_hyphens=False))
        return "\n\n".join(blocks)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        if usage is None:
            return super()._format_usage(usage, actions, groups, prefix)
        usage = usage % dict(prog=self._prog)
        prefix = "usage: " if prefix is None else prefix
        lines = textwrap.wrap(usage, self._width, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                              break_long_words=False, break_on_hyphens=False)
        return "\n".join(lines) + "\n\n"


def _examples(lines: list[str], width: int) -> list[str]:
    """An example block within `width`. A command that does not fit (its continuation lines
    joined) is broken between words with shell continuations, its comment moved above it; a
    word longer than the width stays whole."""
    out: list[str] = []
    command: list[str] = []
    for line in lines:
        command.append(line)
        if line.endswith("\\"):
            continue
        if all(len(part) <= width for part in command):
            out += command
        else:
            indent = command[0][:len(command[0]) - len(command[0].lstrip())]
            words, comments = [], []
            for part in command:
                text, sep, comment = part.strip().removesuffix("\\").partition("  # ")
                words.append(text.strip())
                comments += [comment.strip()] if sep else []
            out += [indent + "# " + c for c in comments]
            parts = textwrap.wrap(" ".join(words), width - 2, initial_indent=indent, subsequent_indent=indent + "    ",
                                  break_long_words=False, break_on_hyphens=False)
            out += [part + " \\" for part in parts[:-1]] + parts[-1:]
        command = []
    return out + command


# The options people change most, shown first in `train --help` (and `demo`, `sweep`).
COMMON = ("data.root", "data.split", "model.backbone", "model.pretrained", "optim.lr", "train.epochs",
          "train.batch_size", "train.mixed_precision", "train.seed", "run.name")


def add_preset(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--preset", default=default, help=f"a shipped preset ({', '.join(preset_names())}) or a "
                        f"YAML file [default {default or 'demo for synthetic, else koniq-swin-t'}]")


def add_config_arguments(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None,
                         common: Sequence[str] = ()) -> None:
    """One --section.field option per config field (or per key in `keys`), documented from the
    config's comments; the `common` ones in a first group of their own."""
    wanted = set(keys) if keys is not None else set(all_keys())
    fields = {f"{s}.{f.name}": (s, cls, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    groups = {}
    if common:
        groups["common"] = parser.add_argument_group("most used options (the other fields follow, by section)")
    for key, (section, cls, f) in fields.items():
        if key not in wanted:
            continue
        if key in common:
            group = groups["common"]
        else:
            group = groups.get(section) or groups.setdefault(
                section, parser.add_argument_group(f"{section} ({cls.__doc__.strip()})"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(nargs="?", const="true") if f.type in ("bool", bool) else {}
        group.add_argument(f"--{key}", dest=key, metavar="V", default=argparse.SUPPRESS,
                           help=f"{field_docs(cls).get(f.name, '')} [default {default!r}]", **kwargs)


def overrides(args: argparse.Namespace) -> list[str]:
    """The --section.field options given, as section.field=value overrides (then the
    --section.dictfield.key ones, e.g. --data.roots.spaq=/data/spaq)."""
    return [f"{k}={v}" for k, v in vars(args).items() if "." in k] + getattr(args, "dict_overrides", [])


def config_from(args: argparse.Namespace, extra: Sequence[str] = ()):
    return load_config_for(args.preset, [*extra, *overrides(args)])


DICT_FIELDS = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if f.default_factory is dict}  # e.g. data.roots, model.backbone_kwargs


def dict_overrides(args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """Takes --section.dictfield.key=value (or `... value`) from the leftover arguments into
    args.dict_overrides; returns what is left."""
    args.dict_overrides, rest, items = [], [], list(unknown)
    while items:
        item = items.pop(0)
        key, sep, value = item[2:].partition("=")
        if item.startswith("--") and key.rsplit(".", 1)[0] in DICT_FIELDS and key.count(".") == 2:
            if not sep:
                if not items or items[0].startswith("--"):
                    raise UserError(f"--{key}: give a value (--{key}=VALUE)")
                value = items.pop(0)
            args.dict_overrides.append(f"{key}={value}")
        else:
            rest.append(item)
    return rest


def reject_unknown(unknown: list[str]) -> None:
    """Leftover arguments: an unknown option names its nearest config key (`--lr`: --optim.lr)."""
    for item in unknown:
        if not item.startswith("--"):
            raise UserError(f"unexpected argument {item!r}")
        key = item[2:].split("=")[0]
        if key in all_keys():
            raise UserError(f"--{key}: this command does not read that setting (its --help lists the ones it does)")
        by_field = [k for k in all_keys() if k.split(".", 1)[1] == key]
        hint = by_field or difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
        more = f"; did you mean --{hint[0]}?" if hint else ""
        raise UserError(f"unknown option --{key}{more}")


def writable(option: str, path: str, folder: bool = False) -> None:
    """Checks an output path before any work is done: its folder (or, with folder=True, the path
    itself) is made if missing; a file in the way or a folder that cannot be made is one error."""
    if not path:
        return
    target = Path(path) if folder else Path(path).parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot make the folder {target} ({e.strerror})") from None
    if not folder and Path(path).is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} {value}: must be at least 1")


def stopped(message: str) -> int:
    """A run checkpointed on request (preemption, time limit, Ctrl-C): one line, from the main
    process only, and the exit status that says "relaunch to resume" (124)."""
    import os

    from accelerate import PartialState

    from ..output import console

    main = PartialState().is_main_process
    if main:
        console(stderr=True).print(f"[yellow]{message}[/]")
    if os.environ.get(LAUNCHED):
        if main:
            Path(os.environ[LAUNCHED]).write_text(message)
        return 0
    return 124
