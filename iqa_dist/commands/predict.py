"""`iqa-dist predict`."""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import UserError
from ..output import console, print_table
from .options import positive, writable

NAME = "predict"
HELP = "score your own images with a trained model"
DESCRIPTION = """\
Score image files, folders (searched recursively), globs or a --list of paths with a trained
model, on its training dataset's scale. With the defaults each image gets the score `iqa-dist
evaluate` gives it (the model's test protocol and patch count); --crops and --flip are explicit
extras. Rows are written as images are scored; --resume skips the images an --output file
already holds. Under `accelerate launch` the images are spread over the processes (each with
its own decoding workers), and the output is the one a single process writes.

examples:
  iqa-dist predict runs/my-run photos/ --format csv --output scores.csv
  iqa-dist predict runs/my-run --list paths.txt --format jsonl --output scores.jsonl --resume
  iqa-dist predict runs/a photos/ --ensemble runs/b --ensemble runs/c   # the mean of three models
  accelerate launch --multi_gpu --num_processes 8 -m iqa_dist predict runs/my-run --list paths.txt \\
      --format csv --output scores.csv --resume"""
HEADER = ["path", "score", "error"]  # --format csv; error: why a file could not be scored ("" when it was)
LOG_EVERY_S = 30.0  # a progress line this often when stderr is not a terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory, a run directory, or a Hugging Face Hub repo id of a model "
                                 "(org/name[@revision])")
    p.add_argument("paths", nargs="*", help="image files, folders (searched recursively) or globs")
    p.add_argument("--ensemble", action="append", default=[], metavar="MODEL",
                   help="another model (repeatable): each image's score is then the mean of every model's, on one "
                        "scale, each model preparing and scoring it as it does alone")
    p.add_argument("--list", default="", metavar="FILE",
                   help="a text file of image paths, one a line (no shell globbing: millions of files)")
    p.add_argument("--crops", type=int, default=None,
                   help="patches per image, laid out by the model's test protocol [default: the model's count]")
    p.add_argument("--flip", action="store_true", help="also score the mirrored patches (test-time augmentation)")
    p.add_argument("--map", default="", metavar="DIR",
                   help="also draw each image's quality map into DIR (NAME.png): its patch scores on a regular grid "
                        "of --crops patches [48 for the map], overlapping patches averaged per pixel, as a heat map "
                        "over the image with a colour bar in score units")
    p.add_argument("--format", choices=["table", "csv", "jsonl"], default="table",
                   help="table: printed at the end; csv (path,score,error) or jsonl ({path, score, error}): rows streamed "
                        "as images are scored [table]")
    p.add_argument("--output", default="", help="write the results to this file instead of stdout")
    p.add_argument("--resume", action="store_true", help="keep the rows --output already holds; score the rest")
    p.add_argument("--batch-images", type=int, default=16, help="images decoded and scored together [16]")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes per scoring process [default: on a GPU the cores, shared by the "
                        "launch's processes on this machine, at most 8; on the CPU 0: the model uses every core]")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto: JPEGs on the GPU where that keeps every image's crops (grid protocol), else PIL "
                        "in the workers; gpu: JPEGs on the GPU always (under the random protocol an image then gets "
                        "other crops than evaluate gives it); cpu: PIL always [auto]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda when available; "
                                                  "each process's own GPU under accelerate launch]")
    p.add_argument("--scale", default=None, metavar="DATASET|normalized",
                   help="the scale of the scores: a dataset the model trained on, or normalized (a jointly trained "
                        "model needs it) [default: the only training dataset's]")
    p.add_argument("--resize-as", default=None, metavar="DATASET",
                   help="resize the images as this training dataset's were [default: the scale's dataset; on the "
                        "normalized scale a joint model whose datasets were resized differently needs it]")


def run(args: argparse.Namespace) -> int:
    from ..distributed.accelerators import scoring_accelerator
    from ..data.feed import default_workers, read_list
    from ..scoring.predict import EnsembleScorer, expand, load_model, score_files, score_files_ensemble
    from ..distributed.shards import shard

    _check(args)
    acc = scoring_accelerator()
    world, main = acc.num_processes, acc.is_main_process
    if world > 1 and not args.output:
        raise UserError(f"{world} processes write one --output file together: give --output")
    if args.format == "table" and (args.resume or world > 1):
        raise UserError("--format table prints once at the end: use --format csv or jsonl to stream, resume, "
                        "or score on several processes")
    err = console(stderr=True, quiet=not main)
    scorer = load_model([args.model, *args.ensemble], args.device or (acc.device if world > 1 else None), args.scale,
                        args.resize_as)
    files, missing = expand(args.paths)
    given = [*map(str, files), *(read_list(args.list) if args.list else [])]
    paths = list(dict.fromkeys(given))  # one row a path
    if main and len(paths) < len(given):
        err.print(f"{len(given) - len(paths)} path(s) given more than once: each is scored once (one row)",
                  highlight=False)
    out = Output(args.output, args.format, world, acc.process_index)
    # a file that failed before is tried again (a mount that was away, a copy still being written)
    done = {path: row for path, row in out.read().items() if row[0] is not None} if args.resume else {}
    if main and not args.resume:
        out.clear()
    acc.wait_for_everyone()  # every process reads what is done before anything is rewritten
    todo = [(p, path) for p, path in enumerate(paths) if path not in done]
    mine = [todo[i] for i in shard(len(todo), world, acc.process_index)]
    ensemble = isinstance(scorer, EnsembleScorer)  # --ensemble, or a sweep group's folder
    if ensemble and args.map:
        raise UserError("--map draws one model's patch scores: give one model, not an ensemble")
    by = f"an ensemble of {len(scorer.members)} models" if ensemble else str(scorer.folder)
    workers = args.workers if args.workers is not None else default_workers(
        (scorer.members[0] if ensemble else scorer).device)
    if main and done:
        err.print(f"--resume: {len(done)} image(s) already in {args.output}; {len(todo)} to score", highlight=False)
    rows = (score_files_ensemble if ensemble else score_files)(
        scorer, [path for _, path in mine], [p for p, _ in mine], crops=args.crops, flip=args.flip,
        batch_images=args.batch_images, workers=workers, decoder=args.decode)
    if args.map:
        rows = _with_maps(rows, scorer, paths, Path(args.map), args.crops, args.flip, err)
    results = out.write(((paths[p], score, why) for p, score, why, _ in _progress(rows, len(mine), world, err)))
    acc.wait_for_everyone()
    if not main:
        return 0
    if args.output and args.format != "table":
        final = out.merge(paths, done)
        scored, unseen = sum(score is not None for score, _ in final.values()), [p for p in paths if p not in final]
    else:  # one process, every row just written: the table's rows and the failures are all it kept
        final, scored, unseen = results, out.scored, []
    return _report(args, final, scored, unseen, missing, err, by)


def _check(args: argparse.Namespace) -> None:
    """The options that can be refused before anything is loaded."""
    positive("--crops", args.crops)
    positive("--batch-images", args.batch_images)
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 (decode in the scoring process) or more")
    writable("--output", args.output)
    writable("--map", args.map, folder=True)
    if not args.paths and not args.list:
        raise UserError("nothing to score: give image paths, folders or globs, or --list FILE")
    if args.resume and not args.output:
        raise UserError("--resume continues an --output file: give --output")
    if args.map and args.ensemble:
        raise UserError("--map draws one model's patch scores: give it without --ensemble")


def _report(args: argparse.Namespace, final: dict, scored: int, unseen: list[str], missing: list[tuple[str, str]],
            err, by: str) -> int:
    """The table (--format table), every file that could not be scored, the exit status. final:
    path -> (score or None, problem), the failed rows at least (every row for the table)."""
    failed = [*missing, *((path, why) for path, (score, why) in final.items() if score is None)]
    if unseen:  # rows another process wrote where this one cannot read them: never a silent gap
        failed += [(path, f"no row: its process wrote {args.output}.part-R where the main process cannot see it "
                          "(give --output on a file system every process shares, then --resume)") for path in unseen]
    if args.format == "table":
        table = Table()
        table.add_column("image")
        table.add_column("score", justify="right")
        for path, (score, _) in final.items():
            if score is not None:
                table.add_row(path, f"{score:.3f}")
        with open(args.output or os.devnull, "w") as f:
            print_table(console(file=f) if args.output else console(), f"{scored} image(s) scored by {by}", table)
    for path, why in failed:
        err.print(f"[red]skipped[/] {path}: {why}", highlight=False)
    if failed:
        err.print(f"{len(failed)} file(s) could not be scored; {scored} scored", highlight=False)
    return 1 if failed else 0


def _with_maps(rows, scorer, paths: list[str], folder: Path, crops: int | None, flip: bool, err):
    """The rows, passed through; each scored image's quality map drawn into `folder` on the way
    (decoded again: maps are for looking at, a few images at a time). Files of the same name in
    different folders get their list position in the name, on every process alike."""
    from ..scoring.maps import DEFAULT_CROPS, render

    n = crops or DEFAULT_CROPS
    stems = [Path(path).stem for path in paths]
    twice = {s for s, k in Counter(stems).items() if k > 1}
    for row in rows:
        p, score, _, _ = row
        if score is not None:
            name = f"{stems[p]}-{p}.png" if stems[p] in twice else f"{stems[p]}.png"
            try:
                image = scorer.prepare(paths[p])
            except UserError as e:  # it decoded a moment ago: changed since
                err.print(f"[yellow]no map[/] for {paths[p]}: {e}", highlight=False)
            else:
                [qmap] = scorer.map_arrays([image], n, flip)
                render(qmap, image, folder / name, f"{Path(paths[p]).name}: {score:.2f}; map of {n} grid patches, "
                       f"mean {qmap.score:.2f}", scorer.units)
        yield row


def _progress(rows, total: int, world: int, err):
    """The rows, passed through, with a progress bar (images/s, ETA) on a terminal and a plain line
    every LOG_EVERY_S seconds in logs; the main process's share stands for every process's."""
    label = f"scoring ({world} processes, process 0's share)" if world > 1 else "scoring"
    live = err.is_terminal and not err.quiet and total >= 20
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), console=err, disable=not live)
    start = last = time.perf_counter()
    with bar:
        task = bar.add_task("score", total=total, rate="")
        for n, row in enumerate(rows, 1):
            yield row
            now = time.perf_counter()
            rate = n / max(now - start, 1e-9)
            bar.update(task, completed=n, rate=f"{rate:.1f} images/s")
            if not live and not err.quiet and (now - last >= LOG_EVERY_S or n == total) and total >= 20:
                eta = (total - n) / rate if rate else 0.0
                err.print(f"scored {n}/{total} images, {rate:.1f} images/s, eta {eta / 60:.1f} min", highlight=False)
                last = now


class Output:
    """The results file, written as images are scored. CSV: path,score,error (a file that could not
    be scored has an empty score and says why); JSONL: {"path", "score"}, plus "error" for such a
    file. Files of an earlier predict (path,score) are still read by --resume. One
    process writes the file itself (appending with --resume); with several, each appends to its
    own part file beside it (FILE.part-R), merged into FILE in the list's order at the end, so a
    killed launch loses nothing already scored and --resume reads the parts too."""

    def __init__(self, path: str, fmt: str, world: int, rank: int) -> None:
        self.path = Path(path) if path else None
        self.fmt, self.world, self.rank = fmt, world, rank
        self.scored = 0  # rows with a score this process wrote

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{glob.escape(self.path.name)}.part-*")) if self.path else []

    def read(self) -> dict[str, tuple[float | None, str]]:
        """path -> (score or None, problem) of every row in the file and its parts."""
        rows: dict[str, tuple[float | None, str]] = {}
        for f in [self.path, *self.parts()]:
            if f.is_file():
                rows.update(self._parse(f))
        return rows

    def clear(self) -> None:
        """A fresh start (no --resume): the file and any parts from an earlier launch go."""
        for f in [self.path, *self.parts()] if self.path else []:
            f.unlink(missing_ok=True)

    def write(self, rows) -> dict[str, tuple[float | None, str]]:
        """Streams the rows (path, score or None, problem) out, counting the scored ones (`scored`).
        Returns the failed rows, and every row for the table format: millions of scores streamed
        to a file are not held in memory."""
        kept = {}
        target = self._open()
        try:
            for path, score, why in rows:
                self.scored += score is not None
                if score is None or self.fmt == "table":
                    kept[path] = (score, why)
                if self.fmt != "table":
                    target.write(self._line(path, score, why))
                    target.flush()  # a killed job keeps every row written so far
        finally:
            if target is not sys.stdout:
                target.close()
        return kept

    def merge(self, paths: list[str], done: dict) -> dict[str, tuple[float | None, str]]:
        """The file and the parts as one file in the list's order (rows of paths not in the list
        after them, as they were), replaced atomically; the parts removed. Returns its rows."""
        rows = {**done, **self.read()}
        order = {path: i for i, path in enumerate(paths)}
        ranked = sorted(rows, key=lambda path: order.get(path, len(order)))
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            if self.fmt == "csv":
                f.write(",".join(HEADER) + "\n")
            f.writelines(self._line(path, *rows[path]) for path in ranked)
        os.replace(tmp, self.path)
        for part in self.parts():
            part.unlink()
        return rows

    def _open(self):
        if self.fmt == "table":
            return open(os.devnull, "w")  # the table is printed at the end
        if self.path is None:
            if self.fmt == "csv":
                sys.stdout.write(",".join(HEADER) + "\n")
            return sys.stdout
        target = self.path if self.world == 1 else self.path.with_name(f"{self.path.name}.part-{self.rank}")
        fresh = not target.is_file() or target.stat().st_size == 0
        if not fresh:
            _drop_cut_line(target)
        f = open(target, "a", newline="")
        if fresh and self.fmt == "csv" and self.world == 1:
            f.write(",".join(HEADER) + "\n")
        return f

    def _line(self, path: str, score: float | None, why: str) -> str:
        if self.fmt == "jsonl":
            row = {"path": path, "score": None if score is None else round(score, 4)}
            return json.dumps({**row, **({"error": why} if score is None else {})}) + "\n"
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerow([path, "" if score is None else f"{score:.4f}", why])
        return text.getvalue()

    def _parse(self, f: Path) -> dict[str, tuple[float | None, str]]:
        rows = {}
        with io.StringIO(_whole_lines(f.read_text())) as handle:
            if self.fmt == "jsonl":
                for n, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                        rows[r["path"]] = (r["score"], r.get("error", ""))
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{f}: line {n} is not a predict result row ({line.strip()[:80]!r}); "
                                            "--resume needs the file predict wrote, in the same --format") from None
                return rows
            for n, r in enumerate(csv.reader(handle), 1):
                if n == 1 and r in (["path", "score"], HEADER):
                    continue
                if len(r) not in (2, 3):  # files of predict before the error column had two
                    raise UserError(f"{f}: row {n} is not a predict result row ({','.join(r)[:80]!r}); --resume "
                                    "needs the file predict wrote, in the same --format")
                try:
                    why = r[2] if len(r) == 3 else "" if r[1] else "could not be scored (the file holds no reason)"
                    rows[r[0]] = (float(r[1]) if r[1] else None, why)
                except ValueError:
                    raise UserError(f"{f}: row {n}: score {r[1]!r} is not a number") from None
        return rows


def _whole_lines(text: str) -> str:
    """The text without a last line cut short (a kill during a write): that image is scored again."""
    return text if text.endswith("\n") or not text else text[:text.rfind("\n") + 1]


def _drop_cut_line(path: Path) -> None:
    """Before appending: a last line cut short by a kill is removed, not continued."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
