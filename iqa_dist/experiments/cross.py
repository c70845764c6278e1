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
from .group import INFO, new_group


def cross(run: str, datasets: list[str], root: str, base_overrides: list[str], launcher: str, scale: str = "") -> Path:
    """Evaluates a trained run on each NAME=ROOT dataset (all images). A jointly trained run is
    scored on the normalized scale unless `scale` names another (the correlations tabulated here
    do not depend on it)."""
    from ..artifacts.card import NORMALIZED, ModelCard, model_dir

    scale = scale or (NORMALIZED if len(ModelCard.read(model_dir(run)).datasets) > 1 else "")
    group = new_group(root, "cross")
    results = []
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    err = console(stderr=True)
    for spec in datasets:
        name, _, data_root = spec.partition("=")
        if not name:
            raise UserError(f"sweep cross: --dataset expects NAME=ROOT, got {spec!r}")
        out = group / f"{name}.json"
        args = [*prefix, "-m", "iqa_dist", "evaluate", "--run", run, "--dataset", name, "--split", "all",
                "--output", str(out), *([f"--root={data_root}"] if data_root else []), *([f"--scale={scale}"] if scale else []),
                *[f"--{o}" for o in base_overrides]]
        err.rule(f"cross-dataset: {name}")
        if subprocess.run(args).returncode or not out.exists():
            results.append({"dataset": name, "finished": False})
            continue
        m = json.loads(out.read_text())["metrics"]
        results.append({"dataset": name, "finished": True, "test_srcc": m["srcc"], "test_plcc": m["plcc"], "n": m["n"]})
    (group / INFO).write_text(json.dumps({"kind": "cross", "run": run, "results": results}))
    collect(group)
    return group
