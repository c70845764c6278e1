"""`iqa-dist sweep`: phase one's next steps as one command each.

- ablation: each regulariser alone (dropout, drop_path, weight decay, ColorJitter), none, and all
  together, from one base preset;
- splits: N seeded random splits (the HyperIQA protocol uses 10): median and mean +- std;
- cross: a trained run evaluated on every other dataset (all of its images).

Members of a group share one folder `runs/<YYYYmmdd-HHMMSS>-sweep-<kind>/`, each a normal run
directory. Locally they run one after another (through `--launcher`, e.g. `accelerate launch
--multi_gpu`); with `--slurm` they are submitted as one job array (launch/slurm_sweep.sbatch), and
`iqa-dist sweep collect GROUP` builds the combined table once they are done.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from .config import load_config
from .errors import UserError
from .output import console, fmt, print_table
from .rundir import RunDir

# Phase one's regularisers, each as the overrides that switch it off.
REGULARISERS = {
    "dropout": ["model.dropout=0"],
    "drop_path": ["model.drop_path=0"],
    "weight_decay": ["optim.weight_decay=0"],
    "jitter": ["augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0"],
}
# none, each regulariser alone (the others off), all: the base preset's values where one is on
ABLATION = {
    "none": [o for off in REGULARISERS.values() for o in off],
    **{f"{name}-only": [o for other, off in REGULARISERS.items() if other != name for o in off]
       for name in REGULARISERS},
    "all": [],
}
SLURM_SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "slurm_sweep.sbatch"


def members(kind: str, base_overrides: list[str], n: int) -> dict[str, list[str]]:
    """Member name -> its overrides (on top of the base preset and overrides)."""
    if kind == "ablation":
        return {name: [*base_overrides, *extra] for name, extra in ABLATION.items()}
    if kind == "splits":
        return {f"split{i:02d}": [*base_overrides, "data.split=random", f"data.split_seed={i}", f"train.seed={i}"]
                for i in range(n)}
    raise UserError(f"sweep: unknown kind {kind!r} (ablation, splits, cross, collect)")


def new_group(root: str, kind: str) -> Path:
    group = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-sweep-{kind}"
    group.mkdir(parents=True)
    return group


def run_sweep(kind: str, preset: str, base_overrides: list[str], n: int, launcher: str, slurm: bool) -> Path:
    """Runs (or submits) every member; returns the group folder."""
    if slurm and not SLURM_SCRIPT.is_file():  # launch/ ships with the source tree, not in the package
        raise UserError(f"sweep --slurm needs {SLURM_SCRIPT}: install from a source checkout (pip install -e .)")
    cfg = load_config(preset, base_overrides)  # fail early on a bad base config
    specs = members(kind, base_overrides, n)
    for overrides in specs.values():
        load_config(preset, overrides)
    group = new_group(cfg.run.root, kind)
    plan = [{"name": name, "args": ["--preset", preset, *[f"--{o}" for o in overrides],
                                    f"--run.root={group}", f"--run.name={name}"]} for name, overrides in specs.items()]
    (group / "members.jsonl").write_text("".join(json.dumps(p) + "\n" for p in plan))
    (group / "sweep.json").write_text(json.dumps({"kind": kind, "preset": preset, "overrides": base_overrides}))
    err = console(stderr=True)
    if slurm:
        cmd = ["sbatch", f"--array=0-{len(plan) - 1}", str(SLURM_SCRIPT), str(group / "members.jsonl")]
        err.print(f"submitting: {shlex.join(cmd)}")
        subprocess.run(cmd, check=True)
        err.print(f"when the array is done: iqa-dist sweep collect {group}")
        return group
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    for i, member in enumerate(plan):
        err.rule(f"sweep {kind}: {member['name']} ({i + 1}/{len(plan)})")
        # --resume auto: a member interrupted inside this call (e.g. preempted) continues when rerun
        code = subprocess.run([*prefix, "-m", "iqa_dist", "train", *member["args"], "--resume", "auto"]).returncode
        if code:
            err.print(f"[red]member {member['name']} failed (exit {code})[/]; continuing")
    collect(group)
    return group


def collect(group: Path) -> dict:
    """The combined table of a group: per member val/test SRCC and PLCC, plus summary statistics."""
    group = Path(group)
    if not (group / "sweep.json").is_file():
        raise UserError(f"{group}: not a sweep group (no sweep.json)")
    info = json.loads((group / "sweep.json").read_text())
    results = []
    for run in sorted(p for p in group.iterdir() if RunDir.is_run(p)):
        summary = RunDir(run).summary()
        name = run.name.split("-", 2)[-1]
        results.append({"member": name, "run": run.name, "finished": summary is not None,
                        **({f"{s}_{m}": summary[s].get(m) for s in ("val", "test") for m in ("srcc", "plcc")}
                           if summary else {}),
                        "best_epoch": summary and summary["best_epoch"]})
    if info["kind"] == "cross":
        results = info["results"]
    stats = {}
    done = [r for r in results if r.get("finished", True) and r.get("test_srcc") is not None]
    for key in ("test_srcc", "test_plcc", "val_srcc", "val_plcc"):
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            stats[key] = {"median": statistics.median(values), "mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    table = {**info, "members": results, "statistics": stats}
    (group / "results.json").write_text(json.dumps(table, indent=1))
    show(table, group)
    return table


def show(table: dict, group: Path) -> None:
    t = Table()
    columns = ["member", "test_srcc", "test_plcc", "val_srcc", "val_plcc", "best_epoch"]
    if table["kind"] == "cross":
        columns = ["dataset", "test_srcc", "test_plcc", "n"]
    for c in columns:
        t.add_column(c.replace("_", " "), justify="left" if c in ("member", "dataset") else "right")
    for r in table["members"]:
        t.add_row(*(fmt(r.get(c)) if r.get("finished", True) else "running" for c in columns))
    for key, label in (("median", "median"), ("mean", "mean")):
        if table["statistics"]:
            cells = []
            for c in columns[1:]:
                s = table["statistics"].get(c)
                cells.append("" if not s else f"{s[key]:.4f}" + (f" ± {s['std']:.4f}" if key == "mean" else ""))
            t.add_row(f"[bold]{label}[/]", *cells)
    print_table(console(), f"sweep {table['kind']} ({group})", t)


def cross(run: str, datasets: list[str], root: str, base_overrides: list[str], launcher: str, scale: str = "") -> Path:
    """Evaluates a trained run on each NAME=ROOT dataset (all images). A jointly trained run is
    scored on the normalized scale unless `scale` names another (the correlations tabulated here
    do not depend on it)."""
    from .card import NORMALIZED, ModelCard, model_dir

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
    (group / "sweep.json").write_text(json.dumps({"kind": "cross", "run": run, "results": results}))
    collect(group)
    return group
