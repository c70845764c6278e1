"""`iqa-dist predict`."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from PIL import UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import UserError
from ..output import console, print_table
from . import positive, writable

NAME = "predict"
HELP = "score your own images with a trained model"
DESCRIPTION = """\
Score image files, folders (searched recursively) or globs with a trained model, on its training
dataset's scale. With the defaults each image gets the score `iqa-dist evaluate` gives it (the
model's test protocol and patch count); --crops and --flip are explicit extras."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory or a run directory")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or globs")
    p.add_argument("--crops", type=int, default=None,
                   help="patches per image, laid out by the model's test protocol [default: the model's count]")
    p.add_argument("--flip", action="store_true", help="also score the mirrored patches (test-time augmentation)")
    p.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    p.add_argument("--output", default="", help="write the results to this file instead of stdout")
    p.add_argument("--batch-images", type=int, default=16, help="images decoded and scored together [16]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda when available]")
    p.add_argument("--scale", default=None, metavar="DATASET|normalized",
                   help="the scale of the scores: a dataset the model trained on, or normalized (a jointly trained "
                        "model needs it) [default: the only training dataset's]")
    p.add_argument("--resize-as", default=None, metavar="DATASET",
                   help="resize the images as this training dataset's were [default: the scale's dataset; on the "
                        "normalized scale a joint model whose datasets were resized differently needs it]")


def run(args: argparse.Namespace) -> int:
    from ..card import model_dir
    from ..predict import expand, load_model

    positive("--crops", args.crops)
    positive("--batch-images", args.batch_images)
    writable("--output", args.output)
    err = console(stderr=True)
    scorer = load_model(args.model, args.device, args.scale, args.resize_as)
    files, failed = expand(args.paths)
    results: list[tuple[str, float]] = []
    progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err, disable=len(files) < 20 or not err.is_terminal)
    with progress:
        task = progress.add_task("score", total=len(files))
        for start in range(0, len(files), args.batch_images):
            chunk, arrays = [], []
            for f in files[start:start + args.batch_images]:
                try:
                    arrays.append(scorer.prepare(f))
                    chunk.append(f)
                except (UserError, OSError, UnidentifiedImageError) as e:
                    failed.append((str(f), str(e).removeprefix(f"{f}: ")))
            results += zip(map(str, chunk), scorer.score_arrays(arrays, args.crops, args.flip).tolist())
            progress.advance(task, len(files[start:start + args.batch_images]))
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(["path", "score"])
            writer.writerows((p, f"{s:.4f}") for p, s in results)
        elif args.format == "jsonl":
            for p, s in results:
                out.write(json.dumps({"path": p, "score": round(s, 4)}) + "\n")
        else:
            table = Table()
            table.add_column("image")
            table.add_column("score", justify="right")
            for p, s in results:
                table.add_row(p, f"{s:.3f}")
            target = console() if out is sys.stdout else console(file=out)
            print_table(target, f"{len(results)} image(s) scored by {model_dir(args.model)}", table)
    finally:
        if args.output:
            out.close()
    for path, why in failed:
        err.print(f"[red]skipped[/] {path}: {why}", highlight=False)
    if failed:
        err.print(f"{len(failed)} file(s) could not be scored; {len(results)} scored", highlight=False)
    return 1 if failed else 0
