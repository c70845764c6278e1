"""A trained model as one ONNX file for deployment, checked against torch when it is written.

The graph is the whole model on normalised patches: (B, 3, S, S) float32 -> (B,) scores on the
model's score scale (its dataset's, or the one chosen), the per-image target net inside and the
batch dynamic. What a deployment needs around it (the resize policy, patch size, normalisation,
test protocol and patch count, the scale) is in the file's metadata (`custom_metadata_map` in
onnxruntime), so that scoring an image needs numpy, PIL and onnxruntime alone (the README shows
how). torch 2.14 exports through torch.export (`dynamo=True`, which needs onnxscript); the file is
kept only when onnxruntime's scores of the same patches equal torch's to 1e-4 (relative to the
largest score), so a graph that computes something else is never shipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError, first_line
from .predict import Scorer, load_model

TOLERANCE = 1e-4  # onnxruntime vs torch, relative to the largest score of the check batch
INPUT, OUTPUT = "patches", "scores"


class Deployed(nn.Module):
    """The model with its score map: normalised patches (B, 3, S, S) -> scores (B,) on the scale."""

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        self.model = scorer.model.eval()
        self.shift, self.scale = float(scorer.scale.shift), float(scorer.scale.scale)

    def forward(self, patches: Tensor) -> Tensor:
        return self.model(patches) * self.scale + self.shift


class OnnxForward(nn.Module):
    """An onnxruntime session as a forward on torch tensors (B, 3, S, S) -> (B,), on the CPU:
    what `predictions.predict_images` calls in place of the torch model (bench predict)."""

    def __init__(self, file: Path, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's choice, every core
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def forward(self, patches: Tensor) -> Tensor:
        out = self.session.run([OUTPUT], {INPUT: patches.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(patches.device)


def metadata(scorer: Scorer, scale_name: str) -> dict[str, str]:
    """What scoring an image takes besides the graph, as the ONNX file's string metadata."""
    card = scorer.card
    return {"iqa_dist_card": json.dumps(asdict(card)), "img_size": str(card.size), "mean": json.dumps(list(card.mean)),
            "std": json.dumps(list(card.std)), "resize": scorer.resize, "exif": json.dumps(scorer.exif),
            "protocol": card.protocol, "patches": str(card.test_patch_num), "scale": scale_name,
            "score_range": json.dumps(list(card.datasets[scale_name].score_range)) if scale_name in card.datasets
            else "[]"}


def export_onnx(model: str | Path, out: Path, scale: str | None = None, check_batch: int = 3) -> dict:
    """Writes `model`'s ONNX file to `out` (replaced atomically once checked) and returns what the
    check found: {"max_rel_diff", "patches", "bytes"}. A graph whose scores differ is refused."""
    try:
        import onnxruntime  # noqa: F401 (the check needs it: refuse before the export's work)
        import onnxscript  # noqa: F401 (torch.export's ONNX translation)
    except ImportError as e:
        raise UserError(f"--onnx: {e.name} is not installed: pip install 'iqa-dist[onnx]'") from None
    scorer = load_model(model, "cpu", scale)
    scale_name = scale or scorer.card.dataset
    deployed = Deployed(scorer).eval()
    size = scorer.card.size
    # a batch other than the check's: the check then also proves the batch dimension dynamic
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        program = torch.onnx.export(deployed, (example,), input_names=[INPUT], output_names=[OUTPUT], dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as e:  # torch.export's many failure types; the first line says which construct
        raise UserError(f"--onnx: torch could not export this model ({type(e).__name__}: {first_line(e)})") from None
    program.model.metadata_props.update(metadata(scorer, scale_name))
    program.save(str(tmp))
    try:
        found = check(tmp, deployed, size, check_batch)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return {**found, "bytes": out.stat().st_size}


def check(file: Path, deployed: nn.Module, size: int, batch: int = 3) -> dict:
    """onnxruntime's scores of `batch` normalised patches against `deployed`'s own; a UserError
    when they differ by more than TOLERANCE of the largest score."""
    patches = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = deployed(patches).double().numpy()
    got = OnnxForward(file)(patches).double().numpy()
    if got.shape != want.shape:
        raise UserError(f"--onnx: the exported graph gives scores of shape {got.shape} for {batch} patches, torch "
                        f"{want.shape}: not written")
    diff = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))
    if not diff <= TOLERANCE:
        raise UserError(f"--onnx: onnxruntime's scores of the same {batch} patches differ from torch's by {diff:.2e} "
                        f"of the largest score (more than {TOLERANCE:g}): the graph computes something else; not written")
    return {"max_rel_diff": diff, "patches": batch}
