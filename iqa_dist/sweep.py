"""`iqa-dist sweep`: phase one's next steps as one command each, run as many at once as the node has GPUs.

- ablation: each regulariser alone (dropout, drop_path, weight decay, ColorJitter), none, and all
  together, from one base preset;
- splits: N seeded random splits (the HyperIQA protocol uses 10): median and mean +- std;
- cross: a trained run evaluated on every other dataset (all of its images).

Members of a group share one folder `runs/<YYYYmmdd-HHMMSS>-sweep-<kind>/`, each a normal run
directory. On a node they run concurrently, each on its own GPU (or --gpus-per-member GPUs) with
its own rendezvous port and log; `--slurm array` submits one job per member, `--slurm node` one
node-sized job that runs them in parallel; `sweep --resume GROUP` finishes what a group lacks,
and `sweep collect GROUP` rebuilds the combined table.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from .config import load_config
from .errors import UserError
from .output import console, fmt, fmt_epoch, print_table
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
SLURM_NODE_SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "slurm_sweep_node.sbatch"
MEMBERS = "members.jsonl"  # a group's plan: one line per member, {"name", "args"}


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


def run_sweep(kind: str, preset: str, base_overrides: list[str], n: int, launcher: str, slurm: str = "",
              gpus_per_member: int = 0, parallel: int = 0) -> Path:
    """Creates a group and runs its members on this node, several at once (run_members), or
    submits them to SLURM: `slurm="array"` one job per member, `slurm="node"` one node-sized job
    that runs them in parallel on its GPUs. Returns the group folder."""
    script = {"array": SLURM_SCRIPT, "node": SLURM_NODE_SCRIPT}.get(slurm)
    if slurm and not script.is_file():  # launch/ ships with the source tree, not in the package
        raise UserError(f"sweep --slurm needs {script}: install from a source checkout (pip install -e .)")
    cfg = load_config(preset, base_overrides)  # fail early on a bad base config
    specs = members(kind, base_overrides, n)
    for overrides in specs.values():
        load_config(preset, overrides)
    group = new_group(cfg.run.root, kind)
    plan = [{"name": name, "args": ["--preset", preset, *[f"--{o}" for o in overrides],
                                    f"--run.root={group}", f"--run.name={name}"]} for name, overrides in specs.items()]
    (group / MEMBERS).write_text("".join(json.dumps(p) + "\n" for p in plan))
    (group / "sweep.json").write_text(json.dumps({"kind": kind, "preset": preset, "overrides": base_overrides}))
    if slurm:
        submit(group, slurm, len(plan), gpus_per_member)
        return group
    return resume(group, launcher, gpus_per_member, parallel)


def submit(group: Path, how: str, count: int, gpus_per_member: int) -> None:
    err = console(stderr=True)
    if how == "array":
        cmd = ["sbatch", f"--array=0-{count - 1}", str(SLURM_SCRIPT), str(group / MEMBERS)]
    else:
        cmd = ["sbatch", str(SLURM_NODE_SCRIPT), str(group), str(gpus_per_member or 1)]
    err.print(f"submitting: {shlex.join(cmd)}", highlight=False)
    subprocess.run(cmd, check=True)
    err.print(f"when it is done: iqa-dist sweep collect {group} (or continue it: iqa-dist sweep --resume {group})",
              highlight=False)


def resume(group: Path, launcher: str = "", gpus_per_member: int = 0, parallel: int = 0) -> Path:
    """Runs what a group still lacks: finished members are kept, unfinished ones continue from
    their checkpoints (--resume auto), missing ones start; then the combined table."""
    group = Path(group)
    if not (group / MEMBERS).is_file():
        raise UserError(f"{group}: not a sweep group (no {MEMBERS})")
    plan = [json.loads(line) for line in (group / MEMBERS).read_text().splitlines() if line.strip()]
    todo = [m for m in plan if not _finished(group, m["name"])]
    console(stderr=True).print(f"sweep {group.name}: {len(plan) - len(todo)} of {len(plan)} member(s) finished; "
                               f"running {len(todo)}", highlight=False)
    run_members(group, todo, launcher, gpus_per_member, parallel)
    collect(group)
    return group


def _finished(group: Path, name: str) -> bool:
    return any(RunDir(p).finished for p in RunDir.named(group, name) if RunDir.is_run(p))


def slots(gpus_per_member: int, parallel: int) -> list[dict[str, str]]:
    """The member slots of this node, each as its environment: GPU groups of gpus_per_member
    (CUDA_VISIBLE_DEVICES) when there are GPUs, else `parallel` CPU slots sharing the cores."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = ([g for g in visible.split(",") if g.strip()] if visible is not None
            else [str(i) for i in range(torch.cuda.device_count())])
    if gpus:
        k = gpus_per_member or 1
        if k > len(gpus):
            raise UserError(f"sweep: --gpus-per-member {k}, but this node has {len(gpus)} GPU(s)")
        groups = [gpus[i:i + k] for i in range(0, len(gpus) - k + 1, k)][:parallel or None]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]
    n = parallel or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)} for _ in range(n)]


def member_command(member: dict, launcher: str, gpus: int, port: int) -> list[str]:
    """How one member starts: the user's --launcher, `accelerate launch` over its GPUs, or this Python."""
    if launcher:
        prefix = shlex.split(launcher)
    elif gpus > 1:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
                  "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no"]
    else:
        prefix = [sys.executable]
    # --resume auto: a member interrupted before (preempted, a killed sweep) continues from its checkpoint
    return [*prefix, "-m", "iqa_dist", "train", *member["args"], "--resume", "auto"]


def run_members(group: Path, todo: list[dict], launcher: str, gpus_per_member: int, parallel: int) -> dict[str, int]:
    """Runs the members, as many at once as there are slots, each pinned to its slot's GPUs with
    its own rendezvous port and log (group/NAME.log). A failing member is recorded (status
    in group/status.json) and the others go on. SIGTERM/SIGINT stop the running members (they
    checkpoint) and then the sweep; `sweep --resume` continues it."""
    err = console(stderr=True)
    free = list(enumerate(slots(gpus_per_member, parallel)))
    status_file = group / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    queue, running = list(todo), {}
    base_port = int(os.environ.get("IQA_DIST_SWEEP_PORT", "29600"))
    stop, stopped = [], False
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and free and not stop:
                (index, env), member = free.pop(0), queue.pop(0)
                gpus = len(env["CUDA_VISIBLE_DEVICES"].split(",")) if env["CUDA_VISIBLE_DEVICES"] else 1
                log = open(group / f"{member['name']}.log", "a")
                cmd = member_command(member, launcher, gpus, base_port + 10 * index)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
                running[proc.pid] = (proc, member, (index, env), log)
                err.print(f"started {member['name']} in slot {index} ({env['CUDA_VISIBLE_DEVICES'] or 'CPU'}); "
                          f"log {log.name}", highlight=False)
            if stop:
                for proc, *_ in running.values():
                    proc.send_signal(signal.SIGTERM)  # members checkpoint and exit 124
                stop.clear()
                queue.clear()
                stopped = True
            for pid, (proc, member, slot, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                status[member["name"]] = proc.returncode
                status_file.write_text(json.dumps(status, indent=1))
                free.append(slot)
                del running[pid]
                word = {0: "finished", 124: "[yellow]stopped (resumable)[/]"}.get(
                    proc.returncode, f"[red]failed (exit {proc.returncode}): {last_error(Path(log.name))}[/]")
                err.print(f"{member['name']} {word}; log {log.name}", highlight=False)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        raise Stopped(f"sweep stopped: running members checkpointed; continue with iqa-dist sweep --resume {group}")
    return status


class Stopped(UserError):
    """The sweep was asked to stop (SIGTERM/SIGINT); its members checkpointed."""

    exit_code = 124


def collect(group: Path) -> dict:
    """The combined table of a group: per member val/test SRCC and PLCC, plus summary statistics."""
    group = Path(group)
    if not (group / "sweep.json").is_file():
        raise UserError(f"{group}: not a sweep group (no sweep.json)")
    info = json.loads((group / "sweep.json").read_text())
    status = json.loads((group / "status.json").read_text()) if (group / "status.json").exists() else {}
    planned = [json.loads(line)["name"] for line in (group / MEMBERS).read_text().splitlines() if line.strip()] \
        if (group / MEMBERS).exists() else []
    results = []
    for name in planned:
        runs = [p for p in RunDir.named(group, name) if RunDir.is_run(p)]
        summary = RunDir(runs[-1]).summary() if runs else None
        code = status.get(name)
        state = ("finished" if summary else "stopped (resumable)" if code == 124 else
                 f"failed (exit {code}): {last_error(group / f'{name}.log')}" if code else "not finished")
        results.append({"member": name, "run": runs[-1].name if runs else None, "finished": summary is not None,
                        "state": state,
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


def last_error(log: Path) -> str:
    """A failed member's one-line error (the last `error:` line of its log), or where to look."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    return errors[-1][len("error:"):].strip()[:200] if errors else f"see {log.name}"


def show(table: dict, group: Path) -> None:
    t = Table()
    columns = ["member", "test_srcc", "test_plcc", "val_srcc", "val_plcc", "best_epoch"]
    if table["kind"] == "cross":
        columns = ["dataset", "test_srcc", "test_plcc", "n"]
    for c in columns:
        t.add_column(c.replace("_", " "), justify="left" if c in ("member", "dataset") else "right")
    for r in table["members"]:
        if not r.get("finished", True):  # its state in one cell: stopped (resumable) or failed, with why
            t.add_row(r.get("member") or r.get("dataset"), r.get("state", "not finished"), *[""] * (len(columns) - 2))
            continue
        t.add_row(*(fmt_epoch(r.get(c)) if c == "best_epoch" else fmt(r.get(c)) for c in columns))
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
