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

from rich.text import Text

from ..artifacts import lock
from ..config import load_config
from ..errors import UserError
from ..output import console
from .collect import collect
from .grid import equal_configs, equal_hint, members
from .group import (INFO, MEMBERS, SLURM_JOB, exit_state, finished, member_runs, new_group, read_members, read_status,
                    write_members, write_status)

LAUNCH = Path(__file__).resolve().parents[2] / "launch"  # the source tree's launch/ (not installed with the package)
SLURM_SCRIPT = LAUNCH / "slurm_sweep.sbatch"
SLURM_NODE_SCRIPT = LAUNCH / "slurm_sweep_node.sbatch"

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
    equal = equal_configs(preset, specs)
    if equal and len(equal) == len(configs) - 1:
        raise UserError(f"sweep {kind}: {', '.join(equal)} would train the same config as {configs[0]}: nothing to "
                        f"compare; {equal_hint(kind)}")
    err = console(stderr=True)
    for config, (other, why) in equal.items():  # trained again, it would differ from `other` by 0 by construction
        err.print(f"sweep {kind}: {config} skipped: it equals {other} ({why}); {equal_hint(kind)}", highlight=False,
                  markup=False)
    if baseline in equal:
        err.print(f"sweep {kind}: the baseline is {equal[baseline][0]}, which --baseline {baseline} equals",
                  highlight=False, markup=False)
        baseline = equal[baseline][0]
    specs = [m for m in specs if m["config"] not in equal]
    configs = [c for c in configs if c not in equal]
    group = new_group(cfg.run.root, kind)
    lines = [{"name": m["name"], "config": m["config"], "repeat": m["repeat"],
              "args": ["--preset", preset, *[f"--{o}" for o in m["overrides"]], f"--run.root={group}",
                       f"--run.name={m['name']}"]} for m in specs]
    write_members(group, lines)
    (group / INFO).write_text(json.dumps({"kind": kind, "preset": preset, "overrides": base_overrides,
                                                  "configs": configs, "baseline": baseline or configs[0],
                                                  "repeats": {"by": "splits" if kind == "splits" else by, "n": n}}))
    if slurm:
        submit(group, slurm, len(specs), gpus_per_member)
        return group
    return resume(group, launcher, gpus_per_member, parallel)


def submit(group: Path, how: str, count: int, gpus_per_member: int) -> None:
    err = console(stderr=True)
    if how == "array":
        cmd = ["sbatch", f"--array=0-{count - 1}", str(SLURM_SCRIPT), str(group / MEMBERS)]
    else:
        cmd = ["sbatch", str(SLURM_NODE_SCRIPT), str(group), str(gpus_per_member or 1)]
    try:
        out = subprocess.run([cmd[0], "--parsable", *cmd[1:]], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise UserError("sweep --slurm: sbatch is not on PATH (run it where SLURM jobs are submitted)") from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"sweep --slurm: sbatch refused the job: {e.stderr.strip() or e.stdout.strip()} "
                        f"({shlex.join(cmd)}); the group {group} is kept: submit it again or run it here with "
                        f"iqa-dist sweep --resume {group}") from None
    job = out.stdout.strip().split(";")[0]
    (group / SLURM_JOB).write_text(job + "\n")
    err.print(f"submitted job {job}: {shlex.join(cmd)}", highlight=False)
    err.print(f"when it is done: iqa-dist sweep collect {group} (or continue it: iqa-dist sweep --resume {group})",
              highlight=False)


def resume(group: Path, launcher: str = "", gpus_per_member: int = 0, parallel: int = 0) -> Path:
    """Runs what a group still lacks: finished members are kept, unfinished ones continue from
    their checkpoints (--resume auto), missing ones start; then the combined table."""
    group = Path(group)
    planned = read_members(group)
    todo = [m for m in planned if not finished(group, m["name"])]
    console(stderr=True).print(f"sweep {group.name}: {len(planned) - len(todo)} of {len(planned)} member(s) finished; "
                               f"running {len(todo)}", highlight=False)
    run_members(group, todo, launcher, gpus_per_member, parallel)
    collect(group)
    return group


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
    """How one member starts: the user's --launcher, `accelerate launch` over its GPUs (through
    distributed.launcher, so that its exit status is the workers': 124 when they stopped on
    request, as a one-process member's), or this Python."""
    if launcher:
        prefix = shlex.split(launcher)
    elif gpus > 1:  # accelerate launch in-process, ending with the workers' own exit status (not torchrun's 1)
        prefix = [sys.executable, "-m", "iqa_dist.distributed.launcher", "--multi_gpu", "--num_processes", str(gpus),
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
    status = read_status(group)
    queue, running = list(todo), {}
    base_port = int(os.environ.get("IQA_DIST_SWEEP_PORT", "29600"))
    stop, stopped = [], False
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and free and not stop:
                member = queue.pop(0)
                runs = member_runs(group, member["name"])
                held = lock.holder(runs[-1]) if runs else None
                if held:  # a member another sweep (or a killed one's orphan) still trains: never a second writer
                    err.print(f"{member['name']} is still running ({held}); not started again", highlight=False)
                    continue
                index, env = free.pop(0)
                gpus = len(env["CUDA_VISIBLE_DEVICES"].split(",")) if env["CUDA_VISIBLE_DEVICES"] else 1
                log = open(group / f"{member['name']}.log", "a")
                cmd = member_command(member, launcher, gpus, base_port + 10 * index)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                        preexec_fn=_die_with_parent)
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
                write_status(group, status)
                free.append(slot)
                del running[pid]
                state = exit_state(proc.returncode, Path(log.name))
                style = "" if proc.returncode == 0 else "red" if state.startswith("failed") else "yellow"
                err.print(Text.assemble(member["name"] + " ", (state, style), f"; log {log.name}"), highlight=False)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        raise Stopped(f"sweep stopped: running members checkpointed; continue with iqa-dist sweep --resume {group}")
    return status


def _die_with_parent() -> None:
    """In a member, before it starts: SIGTERM when the sweep dies, however it dies (even SIGKILL),
    so it checkpoints and exits instead of training on, orphaned (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Stopped(UserError):
    """The sweep was asked to stop (SIGTERM/SIGINT); its members checkpointed."""

    exit_code = 124
