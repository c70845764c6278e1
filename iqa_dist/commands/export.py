"""`iqa-dist export`."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..output import console

NAME = "export"
USAGE = "iqa-dist export MODEL (--hub DIR [--push ORG/NAME] | --onnx FILE) [--scale DATASET|normalized]"
HELP = "write a model as a Hugging Face Hub repo folder, or as an ONNX file"
DESCRIPTION = """\
--hub DIR writes what a Hub model repo holds: model.safetensors, config.json (the model card
iqa-dist reads), train_images.json, and README.md: a model card whose YAML header gives
library_name, tags, datasets, base_model (the timm weights it started from) and a model-index of
its test figures (SRCC and PLCC per dataset and split). The licence is yours to add. --push
ORG/NAME uploads the folder with huggingface_hub (a token from `hf auth login` or HF_TOKEN).
predict, evaluate and load_model then take ORG/NAME (@REVISION optional) as a model; with
HF_HUB_OFFLINE=1 they read it from the Hugging Face cache alone.

--onnx FILE writes the model as one ONNX graph: normalised patches (batch dynamic) -> scores on
its scale, with the resize, patch size, normalisation and test protocol in the file's metadata.
onnxruntime's scores of the same patches must equal torch's to 1e-4, else nothing is written.
Needs the [onnx] extra (onnx, onnxscript, onnxruntime).

examples:
  iqa-dist export runs/RUN --hub hub/my-iqa --push my-org/my-iqa
  iqa-dist predict my-org/my-iqa photos/ --format csv --output scores.csv
  iqa-dist export runs/RUN --onnx my-iqa.onnx"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, a model directory or a Hub repo id")
    p.add_argument("--hub", default="", metavar="DIR", help="write a Hugging Face Hub repo folder here")
    p.add_argument("--push", default="", metavar="ORG/NAME", help="with --hub: upload the folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument("--onnx", default="", metavar="FILE", help="write the model as an ONNX file")
    p.add_argument("--scale", default=None, metavar="DATASET|normalized",
                   help="--onnx: the scale of the graph's scores [default: the only training dataset's]")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .options import writable

    if args.push and not args.hub:
        raise UserError("--push uploads the folder --hub writes: give --hub DIR too")
    if not args.hub and not args.onnx:
        raise UserError("export: give --hub DIR, --onnx FILE, or both")
    from ..artifacts.card import model_dir
    from ..artifacts.hub import is_repo_id

    if args.push and not is_repo_id(args.push):
        raise UserError(f"--push {args.push}: not a Hub repo id (ORG/NAME)")
    writable("--hub", args.hub, folder=True)
    writable("--onnx", args.onnx)
    folder = model_dir(args.model)
    out = console()
    if args.hub:
        from ..artifacts.hub import held_out_results, push, write_hub_folder

        hub = Path(args.hub)
        results = held_out_results(folder)
        write_hub_folder(folder, hub, args.push or f"ORG/{hub.name}", results)  # the repo id its README shows
        out.print(f"wrote {hub}: model.safetensors, config.json, train_images.json, README.md ({len(results)} test "
                  "result(s) in its model-index)", highlight=False)
        if args.push:
            out.print(f"pushed to {args.push}: {push(hub, args.push, args.private)}", highlight=False)
    if args.onnx:
        from ..scoring.onnx import export_onnx

        found = export_onnx(folder, Path(args.onnx), args.scale)
        out.print(f"wrote {args.onnx} ({found['bytes'] / 1e6:.1f} MB): onnxruntime's scores of {found['patches']} "
                  f"patches equal torch's to {found['max_rel_diff']:.1e} of the largest score", highlight=False)
    return 0
