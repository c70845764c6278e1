"""Run directories: each describes itself and resuming one is relaunching.

runs/<YYYYmmdd-HHMMSS>-<name>/
  config.yaml      resolved config          meta.json     git SHA, command, world size, versions
  metrics.jsonl    a line per evaluation    summary.json  val/test metrics at the selected step
  model/           selected model (model.safetensors + config.json): what `predict` loads
  checkpoints/     step-XXXXXXXX/ (Accelerate save_state), written to a temporary name and
                   renamed when complete, so a kill during a save never leaves one that loads half
Only the main process writes; every process reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from . import __version__
from .config import Config, config_from_yaml
from .errors import UserError

CHECKPOINT_PREFIX = "step-"


def git_sha() -> str:
    """The commit of the iqa_dist source tree, '+dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "backbone_kwargs":
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def find_resumable(root: Path, name: str) -> Path | None:
    """The newest run of this name that has no summary.json (did not finish)."""
    runs = sorted(p for p in root.glob(f"*-{name}") if p.is_dir() and not (p / "summary.json").exists())
    return runs[-1] if runs else None


class RunDir:
    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path = path
        self.accelerator = accelerator
        self.checkpoints = path / "checkpoints"
        self.model_dir = path / "model"

    @classmethod
    def open(cls, cfg: Config, resume: str, accelerator: Accelerator) -> tuple["RunDir", bool]:
        """Creates a new run directory, or reopens one to resume. Returns (run, resuming).

        resume: "" (new run), "auto" (the newest unfinished run of this name, else a new one),
        or a run directory. The main process decides; the others receive its answer."""
        choice = [None, False]
        if accelerator.is_main_process:
            root = Path(cfg.run.root)
            path = find_resumable(root, cfg.run_name()) if resume == "auto" else Path(resume) if resume else None
            if path is not None:
                if not (path / "config.yaml").is_file():
                    raise UserError(f"--resume {resume}: {path} is not a run directory (no config.yaml)")
                diff = _differences(config_from_yaml(path / "config.yaml").to_dict(), cfg.to_dict())
                if diff:
                    raise UserError(f"--resume {path}: the config differs from the run's:\n  " + "\n  ".join(diff))
                choice = [str(path), True]
            else:
                path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run_name()}"
                while path.exists():  # two runs started in the same second
                    time.sleep(1)
                    path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run_name()}"
                (path / "checkpoints").mkdir(parents=True)
                (path / "config.yaml").write_text(cfg.to_yaml())
                choice = [str(path), False]
        if accelerator.num_processes > 1:
            broadcast_object_list(choice)
        run = cls(Path(choice[0]), accelerator)
        if accelerator.is_main_process:
            run.write_meta(resumed=choice[1])
        return run, choice[1]

    def write_meta(self, resumed: bool) -> None:
        meta_file = self.path / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"launches": []}
        acc = self.accelerator
        meta.setdefault("git_sha", git_sha())
        meta["launches"].append({
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": resumed, "command": " ".join(sys.argv),
            "world_size": acc.num_processes, "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1")),  # torchrun
            "device": str(acc.device), "mixed_precision": acc.mixed_precision,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "iqa_dist": __version__, "git_sha": git_sha(),
        })
        meta_file.write_text(json.dumps(meta, indent=1))

    # ------------------------------------------------------------ logs and results

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, they will be logged again."""
        if self.accelerator.is_main_process:
            kept = [r for r in self.metrics() if r["step"] <= step]
            (self.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_summary(self, summary: dict) -> None:
        if self.accelerator.is_main_process:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=1))

    def export_model(self, state_dict: dict[str, torch.Tensor], cfg: Config, extra: dict) -> None:
        """The selected model as a self-contained directory: model.safetensors + config.json."""
        if not self.accelerator.is_main_process:
            return
        tmp = self.path / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp / "model.safetensors")
        model_cfg = {**asdict(cfg.model), "pretrained": "none"}  # the weights are all in model.safetensors
        (tmp / "config.json").write_text(json.dumps({"model": model_cfg, **extra}, indent=1))
        shutil.rmtree(self.model_dir, ignore_errors=True)
        os.replace(tmp, self.model_dir)

    # ------------------------------------------------------------ checkpoints

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        return done[-1] if done else None

    def save_checkpoint(self, step: int, keep: int) -> Path:
        """Accelerate save_state into a temporary folder, renamed once every process is done."""
        acc = self.accelerator
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = self.checkpoints / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final
