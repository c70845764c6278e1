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


def grid_configs(axes: list[str]) -> list[tuple[str, list[str]]]:
    """--set KEY=V1,V2 axes -> [(config name, overrides)], their cartesian product in the order
    given. A name says the settings by the key's last part: "lr=1e-5,drop_path=0.1"."""
    parsed = []
    for axis in axes:
        key, eq, values = axis.partition("=")
        if not eq or not key or not values.strip(","):
            raise UserError(f"sweep grid: --set {axis!r}: expected KEY=V1,V2,... (e.g. --set optim.lr=1e-5,2e-5)")
        parsed.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise UserError(f"sweep grid: --set names {', '.join(k for k in keys if keys.count(k) > 1)} twice")
    short = [k.split(".")[-1] if [x.split(".")[-1] for x in keys].count(k.split(".")[-1]) == 1 else k for k in keys]
    configs = [("", [])]
    for (key, values), label in zip(parsed, short):
        configs = [(f"{name},{label}={v}".lstrip(","), [*overrides, f"{key}={v}"]) for name, overrides in configs
                   for v in values]
    return configs


def repeats(by: str, n: int) -> list[tuple[str, list[str]]]:
    """The repeats every config runs: "splits" (seeded random splits, a training seed each),
    "seeds" (the preset's split, N training seeds), or none (one run)."""
    if by == "splits":
        return [(f"split{i:02d}", ["data.split=random", f"data.split_seed={i}", f"train.seed={i}"]) for i in range(n)]
    if by == "seeds":
        return [(f"seed{i:02d}", [f"train.seed={i}"]) for i in range(n)]
    return [("", [])]


def plan(configs: list[tuple[str, list[str]]], reps: list[tuple[str, list[str]]],
         base_overrides: list[str]) -> list[dict]:
    """Every (config, repeat) member: {"name", "config", "repeat", "overrides"}. A member's name
    says both ("lr=1e-5,split03"), or the one that varies."""
    out = []
    for config, overrides in configs:
        for repeat, extra in reps:
            name = ",".join(x for x in (config, repeat) if x)
            out.append({"name": _safe(name), "config": config, "repeat": repeat,
                        "overrides": [*base_overrides, *overrides, *extra]})
    return out


def _safe(name: str) -> str:
    """A member name as a run name (run.name's characters): anything else, e.g. a path's /, becomes _."""
    return "".join(c if c.isascii() and c.isalnum() or c in "._=,+-" else "_" for c in name)


def members(kind: str, base_overrides: list[str], n: int, axes: list[str] = (), by: str = "") -> list[dict]:
    """The members of a sweep: one grid of configs x repeats. `ablation` is the grid of phase
    one's regularisers (none, each alone, all), `splits` one config over N splits, `grid` the
    --set axes crossed; each times the repeats `by` (splits, seeds) gives."""
    if kind == "ablation":
        return plan(list(ABLATION.items()), repeats(by, n), base_overrides)
    if kind == "splits":
        return plan([("", [])], repeats("splits", n), base_overrides)
    if kind == "grid":
        if not axes:
            raise UserError("sweep grid: give at least one --set KEY=V1,V2 (e.g. --set optim.lr=1e-5,2e-5)")
        return plan(grid_configs(list(axes)), repeats(by, n), base_overrides)
    raise UserError(f"sweep: unknown kind {kind!r} (grid, ablation, splits, cross, collect)")


def new_group(root: str, kind: str) -> Path:
    group = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-sweep-{kind}"
    group.mkdir(parents=True)
    return group


def run_sweep(kind: str, preset: str, base_overrides: list[str], n: int, launcher: str, slurm: str = "",
              gpus_per_member: int = 0, parallel: int = 0, axes: list[str] = (), by: str = "",
              baseline: str = "") -> Path:
    """Creates a group and runs its members on this node, several at once (run_members), or
    submits them to SLURM: `slurm="array"` one job per member, `slurm="node"` one node-sized job
    that runs them in parallel on its GPUs. Returns the group folder."""
    script = {"array": SLURM_SCRIPT, "node": SLURM_NODE_SCRIPT}.get(slurm)
    if slurm and not script.is_file():  # launch/ ships with the source tree, not in the package
        raise UserError(f"sweep --slurm needs {script}: install from a source checkout (pip install -e .)")
    cfg = load_config(preset, base_overrides)  # fail early on a bad base config
    specs = members(kind, base_overrides, n, axes, by)
    for m in specs:
        load_config(preset, m["overrides"])
    configs = list(dict.fromkeys(m["config"] for m in specs))
    if baseline and baseline not in configs:
        raise UserError(f"sweep: --baseline {baseline!r} is not one of the configs: {', '.join(configs)}")
    group = new_group(cfg.run.root, kind)
    lines = [{"name": m["name"], "config": m["config"], "repeat": m["repeat"],
              "args": ["--preset", preset, *[f"--{o}" for o in m["overrides"]], f"--run.root={group}",
                       f"--run.name={m['name']}"]} for m in specs]
    (group / MEMBERS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (group / "sweep.json").write_text(json.dumps({"kind": kind, "preset": preset, "overrides": base_overrides,
                                                  "configs": configs, "baseline": baseline or configs[0],
                                                  "repeats": {"by": "splits" if kind == "splits" else by, "n": n}}))
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


def collect(group: Path, show_table: bool = True) -> dict:
    """The combined table of a group: per member val/test SRCC and PLCC; per config their summary
    over its repeats and the paired comparison with the baseline (compare.py); results.json."""
    from .compare import compare, summary as summarise

    group = Path(group)
    if not (group / "sweep.json").is_file():
        raise UserError(f"{group}: not a sweep group (no sweep.json)")
    info = json.loads((group / "sweep.json").read_text())
    status = json.loads((group / "status.json").read_text()) if (group / "status.json").exists() else {}
    planned = [json.loads(line) for line in (group / MEMBERS).read_text().splitlines() if line.strip()] \
        if (group / MEMBERS).exists() else []
    results = []
    for m in planned:
        name = m["name"]
        runs = [p for p in RunDir.named(group, name) if RunDir.is_run(p)]
        summary = RunDir(runs[-1]).summary() if runs else None
        code = status.get(name)
        state = ("finished" if summary else "stopped (resumable)" if code == 124 else
                 f"failed (exit {code}): {last_error(group / f'{name}.log')}" if code else "not finished")
        on_test = (summary or {}).get("test_selected_on_test") or {}
        results.append({"member": name, "config": m.get("config", name), "repeat": m.get("repeat", ""),
                        "run": runs[-1].name if runs else None, "finished": summary is not None, "state": state,
                        **({f"{s}_{k}": summary[s].get(k) for s in ("val", "test") for k in ("srcc", "plcc")}
                           if summary else {}),
                        "test_on_test_srcc": on_test.get("srcc"), "best_epoch": summary and summary["best_epoch"]})
    if info["kind"] == "cross":
        results = info["results"]
    configs = info.get("configs") or list(dict.fromkeys(r.get("config", r.get("member")) for r in results))
    baseline = info.get("baseline") or (configs[0] if configs else "")
    table = {**info, "members": results, "baseline": baseline}
    if info["kind"] != "cross":
        table["configs"] = compare(results, configs, baseline, seed=0)
        table["bootstrap_seed"] = 0
    done = [r for r in results if r.get("finished", True) and r.get("test_srcc") is not None]
    if len(configs) <= 1 or info["kind"] == "cross":  # one config: the whole group's statistics
        table["statistics"] = {k: st for k in ("test_srcc", "test_plcc", "val_srcc", "val_plcc")
                               if (st := summarise([r[k] for r in done if r.get(k) is not None]))}
    (group / "results.json").write_text(json.dumps(table, indent=1))
    if show_table:
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


def show(table: dict, group: Path, out=None, markdown: bool = False) -> None:
    """The members' table, then (several configs) each config against the baseline."""
    out = out or console()
    columns = ["member", "test_srcc", "test_plcc", "val_srcc", "val_plcc", "best_epoch"]
    if table["kind"] == "cross":
        columns = ["dataset", "test_srcc", "test_plcc", "n"]
    if any(r.get("test_on_test_srcc") is not None for r in table["members"]):
        columns.insert(-1, "test_on_test_srcc")
    labels = {"test_on_test_srcc": "test SRCC selected on test (optimistic)"}
    rows = []
    for r in table["members"]:
        if not r.get("finished", True):  # its state in one cell: stopped (resumable) or failed, with why
            rows.append([r.get("member") or r.get("dataset"), r.get("state", "not finished"), *[""] * (len(columns) - 2)])
        else:
            rows.append([fmt_epoch(r.get(c)) if c == "best_epoch" else fmt(r.get(c)) for c in columns])
    for key in ("median", "mean"):
        if table.get("statistics"):
            cells = []
            for c in columns[1:]:
                st = table["statistics"].get(c)
                cells.append("" if not st else f"{st[key]:.4f}" + (f" ± {st['std']:.4f}" if key == "mean" else ""))
            rows.append([key, *cells])
    _emit(out, f"sweep {table['kind']} ({group})", [labels.get(c, c.replace("_", " ")) for c in columns], rows,
          markdown)
    configs = table.get("configs") or {}
    if len(configs) > 1:
        header = ["config", "n", "test SRCC median", "mean ± std", "val SRCC median",
                  f"paired Δ test SRCC vs {table['baseline']} (median [95% CI])", "Wilcoxon p", "verdict"]
        rows = []
        for name, c in configs.items():
            t, v, d = c.get("test_srcc"), c.get("val_srcc"), c.get("vs_baseline")
            delta = ("baseline" if d is None else "-" if not d.get("pairs") else
                     f"{d['median']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
            rows.append([name or "(base)", str(c["n"]), fmt(t and t["median"]),
                         "" if not t else f"{t['mean']:.4f} ± {t['std']:.4f}", fmt(v and v["median"]), delta,
                         "" if not d or not d.get("pairs") else f"{d['p']:.3g}", "" if d is None else d["verdict"]])
        _emit(out, f"configs against {table['baseline']}: paired by repeat (the same split or seed); verdict at 5% "
                   "(Wilcoxon signed-rank)", header, rows, markdown)


def _emit(out, title: str, header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        out.print("\n".join([title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                              *("| " + " | ".join(r) + " |" for r in rows), ""]), markup=False, highlight=False)
        return
    t = Table()
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    print_table(out, title, t)


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
