"""`iqa-dist evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import DATASETS
from ..errors import UserError
from ..output import console, print_table
from ..scoring.metrics import metrics_table
from .options import add_config_arguments, overrides, writable

NAME = "evaluate"
USAGE = ("iqa-dist evaluate (--run RUN_DIR | --weights MODEL_DIR|ORG/NAME)... --dataset NAME [--root DIR] "
         "[--split test|val|all] [options]")
HELP = "evaluate a trained model on a dataset (its own test split, or cross-dataset)"
DESCRIPTION = """\
Score a trained model on a dataset with the model's own test protocol. On the dataset it trained
on, the run's own data settings are used (split, seeds, resize), so `--split test` is the images
it held out; images it trained on are refused unless --allow-train-overlap. On another dataset
(`--split all`: every image) it is a cross-dataset evaluation: the correlations compare the
model's scores (on its training dataset's scale, or --scale) with that dataset's own scores.
Runs under `accelerate launch` too. Several models (--run or --weights given more than once, or
--run of a sweep group's folder: its members' finished runs) are scored as an ensemble: each image's prediction is the mean of theirs, on one scale; the table and
the JSON give each member's metrics and the ensemble's, and every member's training images are
checked against the images scored.

examples:
  iqa-dist evaluate --run runs/RUN --dataset koniq10k                            # its test split
  iqa-dist evaluate --run runs/RUN --dataset spaq --root /data/spaq --split all  # cross-dataset
  iqa-dist evaluate --run runs/A --run runs/B --dataset koniq10k                 # an ensemble"""

# What evaluation reads of the config: the dataset's files and split (the patch size, protocol
# and patch count come from the model).
KEYS = ["data.root", "data.cache_dir", "data.score_column", "data.csv_file", "data.image_column", "data.image_dir",
        "data.resize", "data.split", "data.split_seed", "data.test_fraction", "data.val_fraction",
        "data.synthetic_size", "data.skip_bad", "data.workers", "train.eval_batch_size"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="models", action="append", default=[], help="a run directory (its selected model); more than "
                                                              "one model: an ensemble")
    p.add_argument("--weights", dest="models", action="append", default=[],
                   help="a model directory (model.safetensors + config.json), or a Hugging Face Hub repo id of one "
                        "(org/name[@revision]); more than one model: an ensemble")
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="NAME", help=" | ".join(DATASETS))
    p.add_argument("--root", default="", help="its folder [default: the training run's, on its own dataset]")
    p.add_argument("--split", default="test", choices=["val", "test", "all"],
                   help="which images: the split's test or val part, or all of them (cross-dataset)")
    p.add_argument("--allow-train-overlap", action="store_true",
                   help="score images the model trained on (or of the same content) anyway; said in the title "
                        "and recorded in the JSON")
    p.add_argument("--scale", default=None, metavar="DATASET|normalized",
                   help="report scores on this scale: a dataset the model trained on, or normalized (the shared "
                        "training-target scale) [default: the evaluated dataset's when the model trained on it, "
                        "else the only training dataset's; a jointly trained model needs it]")
    p.add_argument("--preset", default=None, help="take the data settings from this preset instead of the run's")
    p.add_argument("--output", default="", help="JSON file [default beside the model: eval-DATASET-SPLIT.json; "
                                                "an ensemble's: eval-ensemble-DATASET-SPLIT.json here]")
    add_config_arguments(p, KEYS)


def run(args: argparse.Namespace) -> int:
    from ..scoring.evaluate import evaluate_model, write_predictions

    from ..experiments.group import models_of

    models = models_of(args.models)  # in the order given; a sweep group: its members
    if not models:
        raise UserError("evaluate: give a model: --run RUN_DIR or --weights MODEL_DIR (several for an ensemble)")
    writable("--output", args.output)
    extra = [f"data.root={args.root}"] if args.root else []
    report = evaluate_model(models, args.dataset, args.split,
                            [*extra, *overrides(args)], args.preset, args.allow_train_overlap, args.scale,
                            console=console(stderr=True))
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    per_image = report.pop("per_image")
    trained_on = report["trained_on"].split("+")
    usual = report["dataset"] if report["dataset"] in trained_on else trained_on[0]  # the scale without --scale
    suffix = f"-{report['scale']}" if report["scale"] != usual else ""  # another scale: another file
    if len(models) > 1:
        target = Path(args.output) if args.output else Path(f"eval-ensemble-{report['dataset']}-{args.split}{suffix}.json")
        title = f"an ensemble of {len(models)} models"
        rows = {f"{i + 1}: {m['model']}": m["metrics"] for i, m in enumerate(report["members"])}
        rows["ensemble (mean)"] = report["metrics"]
    else:
        folder, given = Path(report["model"]), str(models[0])
        # beside the model; a Hub model's folder is the hub cache's: the report then goes to the current folder
        beside = folder.parent if Path(given).exists() else Path(".")
        prefix = "" if Path(given).exists() else given.replace("/", "--").replace("@", "-") + "-"
        target = Path(args.output) if args.output else beside / f"eval-{prefix}{report['dataset']}-{args.split}{suffix}.json"
        title, rows = str(folder), {args.split: report["metrics"]}
    target.write_text(json.dumps(report, indent=1))
    predictions = target.with_suffix(".predictions.csv")
    write_predictions(predictions, per_image["names"], per_image["targets"], per_image["preds"])
    overlap = report["train_overlap"]
    note = (f"; INCLUDES {overlap['images']} TRAINING IMAGES and {overlap['same_content']} of their content "
            "(--allow-train-overlap)") if overlap["images"] or overlap["same_content"] else ""
    if not overlap["checkable"]:
        note += f"; OVERLAP WITH ITS TRAINING IMAGES CANNOT BE CHECKED ({overlap['unknown']})"
    print_table(console(), f"{title} on {report['dataset']} ({args.split}, {report['protocol']} protocol, "
                           f"{report['patches']} patches, scores on the {report['scale']} scale){note}",
                metrics_table(rows))
    console(stderr=True).print(f"wrote {target} and {predictions.name}", highlight=False)
    return 0
