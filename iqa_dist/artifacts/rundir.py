"""Run directories: each describes itself, and resuming one is relaunching.

runs/<YYYYmmdd-HHMMSS>-<name>/
  config.yaml      resolved config          meta.json     git SHA, launches, weights, groups
  metrics.jsonl    a line per evaluation    summary.json  val/test metrics at the selected step
  model/           the selected model (artifacts/card.py): what `predict` and `evaluate` load
  checkpoints/     step-XXXXXXXX/ (Accelerate save_state), written to a temporary name and
                   renamed when complete, so a kill during a save never leaves one that loads half
  debug-step-N/    the state from before a non-finite step     failure-rankR.txt  a raised error's traceback
This class owns those names, reads them, and writes them (only the main process writes). A
directory is created only once training can start (weights and data are ready), so a failed
start leaves nothing behind; which directory a launch writes to is training/resume.py's choice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import accelerate
import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .. import __version__
from ..config import Config, config_from_yaml
from ..errors import UserError, no_space, out_of_space
from . import lock
from .card import RUN_MODEL_DIR, WEIGHTS_FILE, ModelCard, write_weights

# Set by `iqa-dist launch`: the main process writes the path of a run directory it creates there, so
# that a group restarted after a process died continues that run (commands/launch.py)
RUN_FILE = "IQA_DIST_RUN_FILE"
CHECKPOINT_PREFIX = "step-"
DEBUG_PREFIX = "debug-step-"  # the state kept when a step was non-finite (save_debug)
FAILURE_PREFIX = "failure-rank"  # the traceback of a process that raised (training.failures)


def git_sha() -> str:
    """The commit of the iqa_dist source tree, '+dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        # --no-optional-locks: only look; a plain `git status` rewrites the checkout's index
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Target:
    """Where a launch will write: an existing run to resume, or a new directory to create."""

    path: str
    resuming: bool
    extended: list[str]  # "train.epochs: 6 -> 12" when --extend changed the schedule


class RunDir:
    CONFIG = "config.yaml"
    META = "meta.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    MODEL = RUN_MODEL_DIR
    CHECKPOINTS = "checkpoints"

    def __init__(self, path: Path | str, accelerator: Accelerator | None = None) -> None:
        self.path = Path(path)
        self.accelerator = accelerator  # None: reading only (report, sweep, demo)
        self.checkpoints = self.path / self.CHECKPOINTS
        self.model_dir = self.path / self.MODEL

    # ------------------------------------------------------------ reading

    @classmethod
    def is_run(cls, path: Path) -> bool:
        return (path / cls.CONFIG).is_file()

    def config(self) -> Config:
        return config_from_yaml(self.path / self.CONFIG)

    def raw_config(self) -> dict:
        return yaml.safe_load((self.path / self.CONFIG).read_text()) or {}

    def metrics(self) -> list[dict]:
        """The logged lines; a cut last line (the process was killed while writing it) is left out."""
        path = self.path / self.METRICS
        lines = path.read_text().splitlines() if path.exists() else []
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number < len(lines):
                    raise UserError(f"{path}:{number}: damaged line ({e.msg}); remove it to read the run") from None
        return rows

    def summary(self) -> dict | None:
        path = self.path / self.SUMMARY
        return _read_json(path) if path.exists() else None

    def meta(self) -> dict:
        path = self.path / self.META
        return _read_json(path) if path.exists() else {}

    @property
    def finished(self) -> bool:
        return (self.path / self.SUMMARY).exists()

    def state(self) -> str:
        """What the run is now: finished; running (a live process holds its lock); failed (how its
        last launch said it ended); stopped, resumable from its last checkpoint; or unfinished."""
        if self.finished:
            return "finished"
        holder = lock.holder(self.path)
        if holder:
            return f"running ({holder})"
        ended = ((self.meta().get("launches") or [{}])[-1]).get("ended", "")
        if ended.startswith("failed"):
            return ended
        last = self.latest_checkpoint()
        return (f"stopped, resumable from step {int(last.name[len(CHECKPOINT_PREFIX):])}" if last else
                "stopped before its first checkpoint")

    def record_end(self, how: str) -> None:
        """How this launch ended ("finished", "stopped: ...", "failed: ..."), in its meta.json entry."""
        if self.accelerator.is_main_process:
            meta = self.meta()
            if meta.get("launches"):
                meta["launches"][-1]["ended"] = how
                (self.path / self.META).write_text(json.dumps(meta, indent=1))

    def has_results(self) -> bool:
        """Whether anything in the run is worth keeping: a checkpoint, a debug state, a traceback."""
        return (self.latest_checkpoint() is not None or any(self.path.glob(f"{DEBUG_PREFIX}*"))
                or any(self.path.glob(f"{FAILURE_PREFIX}*")))

    def failure_file(self, rank: int) -> Path:
        """Where a process that raised writes its traceback (its one-line error names the file)."""
        return self.path / f"{FAILURE_PREFIX}{rank}.txt"

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        return done[-1] if done else None

    # ------------------------------------------------------------ naming and creating

    @staticmethod
    def named(root: Path, name: str) -> list[Path]:
        """The run directories of this run name under root, oldest first: DATE-TIME-NAME exactly
        (a run named `res` is not `my-res`)."""
        pattern = re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(name)}")
        return sorted(p for p in Path(root).glob(f"*-{name}") if pattern.fullmatch(p.name) and p.is_dir())

    @classmethod
    def open(cls, cfg: Config, target: Target, accelerator: Accelerator, about: dict,
             legacy_data: dict | None = None) -> "RunDir":
        """The run directory of `target`, created now when new; records this launch in meta.json.
        `about` (weights provenance, the data's cache keys in "data", ...) is stored in meta.json;
        a resumed run's recorded data must be about["data"], or for runs from before files were
        identified by content, `legacy_data`."""
        choice = [target.path]
        if accelerator.is_main_process and not target.resuming:
            root = Path(cfg.run.root)
            path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run_name()}"
            while path.exists():  # two runs started in the same second
                time.sleep(1)
                path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run_name()}"
            (path / cls.CHECKPOINTS).mkdir(parents=True)
            lock.take(path)
            (path / cls.CONFIG).write_text(cfg.to_yaml())
            choice = [str(path)]
            if os.environ.get(RUN_FILE):
                Path(os.environ[RUN_FILE]).write_text(str(path))
        if accelerator.num_processes > 1 and not target.resuming:
            broadcast_object_list(choice)
        run = cls(Path(choice[0]), accelerator)
        if target.resuming:  # every process checks, so every process stops with the same message
            run._check_same_data(about.get("data", {}), legacy_data or {})
        if accelerator.is_main_process:
            if target.extended:
                (run.path / cls.CONFIG).write_text(cfg.to_yaml())  # the extended schedule is the run's now
                (run.path / cls.SUMMARY).unlink(missing_ok=True)
            run._write_meta(target, about)
        return run

    def _check_same_data(self, now: dict, legacy: dict) -> None:
        """A resumed run must train on the images it started on: the cache folders named in
        meta.json are content hashes of the annotations, image files and split (older runs' keys
        hashed the files' sizes and mtimes instead: the same key from the same files passes too)."""
        before = self.meta().get("data")
        if not before:  # a run from before the data were recorded: nothing to compare
            return
        changed = [f"{name}: {before.get(name)} -> {key}" for name, key in now.items()
                   if before.get(name) not in (key, legacy.get(name))]
        if changed:
            raise UserError(f"--resume {self.path}: the data differ from the run's (images, scores or split changed "
                            f"since it started; cache {'; '.join(changed)}). Restore them, or start a new run")

    @contextlib.contextmanager
    def holding(self):
        """The main process gives the run's writer lock (artifacts/lock.py, taken when the launch chose
        this directory) back when training ends, however it ends."""
        try:
            yield
        finally:
            if self.accelerator.is_main_process:
                lock.release(self.path)

    @contextlib.contextmanager
    def discard_if_unstarted(self, created: bool):
        """Removes the directory again when this launch created it and fails before its first
        checkpoint (nothing to resume, nothing to look at); a kept debug state or a traceback counts
        as a result."""
        try:
            yield
        except BaseException:
            if created and self.accelerator.is_main_process and not self.has_results():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _write_meta(self, target: Target, about: dict) -> None:
        meta = self.meta() or {"launches": []}
        acc, sha = self.accelerator, git_sha()
        meta.setdefault("git_sha", sha)
        meta.update(about)
        if target.extended:
            meta.setdefault("extensions", []).append({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                      "changes": target.extended})
        meta["launches"].append({
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": target.resuming, "command": " ".join(sys.argv),
            "world_size": acc.num_processes, "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1")),  # torchrun
            "device": str(acc.device), "mixed_precision": acc.mixed_precision,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "accelerate": accelerate.__version__, "iqa_dist": __version__, "git_sha": sha,
        })
        (self.path / self.META).write_text(json.dumps(meta, indent=1))

    # ------------------------------------------------------------ logs and results

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path / self.METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, they will be logged again."""
        if self.accelerator.is_main_process:
            kept = [r for r in self.metrics() if r["step"] <= step]
            (self.path / self.METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write_summary(self, summary: dict) -> None:
        if self.accelerator.is_main_process:
            (self.path / self.SUMMARY).write_text(json.dumps(summary, indent=1))

    def export_model(self, state_dict: dict[str, torch.Tensor], card: ModelCard,
                     train_images: dict[str, dict[str, list[str]]]) -> None:
        """The selected model as a self-contained directory (card.py), replaced atomically."""
        if not self.accelerator.is_main_process:
            return
        tmp = self.path / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write_weights(state_dict, tmp / WEIGHTS_FILE)
            card.write(tmp, train_images)
        except (OSError, RuntimeError) as e:
            if not out_of_space(e, self.path):
                raise
            need = max(_size(self.model_dir), sum(v.numel() * v.element_size() for v in state_dict.values()))
            shutil.rmtree(tmp, ignore_errors=True)
            raise no_space(self.path, need, f"the model selected at step {card.step}",
                           f"free space and resume (--resume {self.path})") from None
        shutil.rmtree(self.model_dir, ignore_errors=True)
        os.replace(tmp, self.model_dir)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int, keep: int) -> Path:
        """The run's state at `step` (checkpoints/step-N), keeping the last `keep` of them."""
        final = self._save_state(self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}")
        if self.accelerator.is_main_process:
            for old in sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def save_debug(self, step: int) -> Path:
        """The state from before a non-finite step (debug-step-N), beside the checkpoints: never
        resumed from, kept for debugging."""
        return self._save_state(self.path / f"{DEBUG_PREFIX}{step:08d}")

    def _save_state(self, final: Path) -> Path:
        """Accelerate save_state into a temporary folder, renamed once every process is done, so a
        kill during a save never leaves a folder that loads half."""
        acc = self.accelerator
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            failed = None
        except Exception as e:  # noqa: BLE001 (told apart below: a full disk is one line, the rest re-raised)
            failed = e
        if acc.num_processes > 1:  # every process learns whether any save failed (instead of a barrier that hangs)
            flags = torch.tensor([float(failed is not None)], device=acc.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # torch.distributed's own MAX (accelerate 1.0's reduce sums)
            if flags.item() and failed is None:
                raise UserError("") from None  # another process failed and says why
        if failed is not None:
            last = self.latest_checkpoint()
            need = max(_size(last) if last else 0, _size(tmp))  # the last complete one, or what got written
            full = out_of_space(failed, tmp.parent)
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # its own partial files, which would keep the disk full
            if not full:
                raise failed
            raise no_space(final.parent, need, f"the checkpoint {final.name}",
                           f"the run stopped there; the last complete checkpoint is "
                           f"{last.name if last else 'none'}: free space and resume (--resume {self.path})") from None
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: damaged JSON (line {e.lineno}: {e.msg})") from None
