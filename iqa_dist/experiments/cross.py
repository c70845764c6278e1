"""Cross-dataset evaluation: a trained run scored on every image of other datasets."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import UserError
from ..output import console
from .collect import collect
from .grid import safe_name
from .group import INFO, new_group


def dataset_labels(specs: list[str]) -> list[tuple[str, str, str]]:
    """(label, kind, root) for each --dataset KIND=ROOT, in order; the label names its row and its
    files (LABEL.json, LABEL.predictions.csv). A kind given once is labelled by itself ("spaq"); a
    kind given several times (two CSV datasets) by the kind and its root folder's name
    ("csv-livefb", "csv-mine"), or by its place among them ("csv-1", "csv-2") where those repeat too.
    The same dataset given twice is refused: its second row would say nothing new."""
    parsed = []
    for spec in specs:
        kind, _, root = spec.partition("=")
        if not kind:
            raise UserError(f"sweep cross: --dataset expects NAME=ROOT, got {spec!r}")
        parsed.append((kind, root))
    seen = {}
    for spec, (kind, root) in zip(specs, parsed):
        key = (kind, str(Path(root).resolve()) if root else "")
        if key in seen:
            raise UserError(f"sweep cross: --dataset {spec!r} is the same dataset as --dataset {seen[key]!r}: give "
                            "each once")
        seen[key] = spec
    kinds = [kind for kind, _ in parsed]
    folders = {kind: [safe_name(Path(root).resolve().name if root else "default") for k, root in parsed if k == kind]
               for kind in kinds}
    out, place = [], {}
    for kind, root in parsed:
        place[kind] = place.get(kind, 0) + 1
        names = folders[kind]
        if len(names) == 1:
            label = kind
        elif len(set(names)) == len(names):
            label = f"{kind}-{names[place[kind] - 1]}"
        else:
            label = f"{kind}-{place[kind]}"
        out.append((label, kind, root))
    return out


def cross(run: str, datasets: list[str], root: str, base_overrides: list[str], launcher: str, scale: str = "") -> Path:
    """Evaluates a trained run on each NAME=ROOT dataset (all images). A jointly trained run is
    scored on the normalized scale unless `scale` names another (the correlations tabulated here
    do not depend on it)."""
    from ..artifacts.card import NORMALIZED, ModelCard, model_dir

    labelled = dataset_labels(datasets)  # before the group is made: a bad --dataset leaves nothing behind
    scale = scale or (NORMALIZED if len(ModelCard.read(model_dir(run)).datasets) > 1 else "")
    group = new_group(root, "cross")
    results = []
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    err = console(stderr=True)
    for label, kind, data_root in labelled:
        out = group / f"{label}.json"
        args = [*prefix, "-m", "iqa_dist", "evaluate", "--run", run, "--dataset", kind, "--split", "all",
                "--output", str(out), *([f"--root={data_root}"] if data_root else []), *([f"--scale={scale}"] if scale else []),
                *[f"--{o}" for o in base_overrides]]
        err.rule(f"cross-dataset: {label}" + (f" ({kind} at {data_root})" if label != kind else ""))
        row = {"dataset": label, "kind": kind, "root": data_root}
        if subprocess.run(args).returncode or not out.exists():
            results.append({**row, "finished": False})
            continue
        m = json.loads(out.read_text())["metrics"]
        results.append({**row, "finished": True, "test_srcc": m["srcc"], "test_plcc": m["plcc"], "n": m["n"]})
    (group / INFO).write_text(json.dumps({"kind": "cross", "run": run, "results": results}))
    collect(group)
    return group
