"""`iqa-dist report`: compare runs at a glance, beside phase one's reference table.

The table shows only the config fields that differ between the runs, their val/test SRCC and
PLCC, selected epoch, epochs run, training time and throughput. `--markdown` prints the same as
Markdown; `--plot DIR` draws training loss and val SRCC per epoch, overlaid (matplotlib, an
optional extra imported only here).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from .errors import UserError
from .progress import output_console

# REFERENCE.md §1: phase one on KonIQ-10k (Q-Align split, selection on test).
PHASE_ONE = [
    ("ResNet-50 HyperIQA (paper reproduction)", 0.9009, 0.9170),
    ("Swin-T backbone", 0.9154, 0.9298),
    ("+ ranking loss (alpha 0.3)", 0.9206, 0.9334),
    ("+ multi-scale fusion (concat)", 0.9195, 0.9316),
    ("+ anti-overfitting (no ColorJitter)", 0.9207, 0.9330),
    ("+ ColorJitter (best)", 0.9236, 0.9353),
]


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories (holding config.yaml) named or found under the given folders."""
    found = []
    for p in paths or ["runs"]:
        path = Path(p)
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(q.parent for q in path.rglob("config.yaml") if (q.parent / "metrics.jsonl").exists())
        else:
            raise UserError(f"{p}: no such run directory")
    if not found:
        raise UserError(f"no runs found in {', '.join(paths or ['runs'])}")
    return found


def load_run(path: Path) -> dict:
    config = yaml.safe_load((path / "config.yaml").read_text())
    summary_file = path / "summary.json"
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()] \
        if (path / "metrics.jsonl").exists() else []
    return {"path": path, "config": config, "metrics": metrics,
            "summary": json.loads(summary_file.read_text()) if summary_file.exists() else None}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Where things ran, not what was trained: never a difference worth a column.
ENVIRONMENT = {"run.root", "run.name", "run.log_with", "preset", "data.cache_dir", "data.workers", "data.root",
               "data.resident", "train.log_every", "train.keep_checkpoints"}


def differing_keys(runs: list[dict]) -> list[str]:
    flats = [_flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flats))
    return [k for k in keys if k not in ENVIRONMENT and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def _differs(flat: dict, keys: list[str], sep: str) -> str:
    """'lr=0.001; epochs=6': the differing fields, by their last name unless that is ambiguous."""
    short = {k: k.split(".")[-1] for k in keys}
    names = list(short.values())
    return sep.join(f"{short[k] if names.count(short[k]) == 1 else k}={flat.get(k)}" for k in keys)


def rows(runs: list[dict], sep: str = "\n") -> tuple[list[str], list[list[str]]]:
    keys = differing_keys(runs) if len(runs) > 1 else []
    header = ["run", *(["differs"] if keys else []), "val SRCC", "val PLCC", "test SRCC", "test PLCC", "best epoch",
              "epochs", "train s", "patches/s"]
    body = []
    for r in runs:
        flat = _flatten(r["config"])
        s = r["summary"]
        last = r["metrics"][-1] if r["metrics"] else {}
        if s:
            stats = [s["val"].get("srcc"), s["val"].get("plcc"), s["test"].get("srcc"), s["test"].get("plcc"),
                     s["best_epoch"], f"{s['epochs_run']}{' (early)' if s['stopped_early'] else ''}",
                     s["train_seconds"], s["patches_per_s"]]
        else:  # unfinished: its latest evaluation
            stats = [last.get("val_srcc"), last.get("val_plcc"), "-", "-", "-", f"{last.get('epoch', 0)} (running)",
                     last.get("elapsed_s"), last.get("patches_per_s")]
        body.append([r["path"].name, *([_differs(flat, keys, sep)] if keys else []), *(_cell(v) for v in stats)])
    return header, body


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) <= 1 else str(v)


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    ref = ["", "Phase one (KonIQ-10k, for reference):", "", "| config | SRCC | PLCC |", "|---|---|---|"]
    ref += [f"| {name} | {s:.4f} | {p:.4f} |" for name, s, p in PHASE_ONE]
    return "\n".join(lines + ref)


def plot(runs: list[dict], folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'iqa-dist[plot]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, name in [("train_loss", "training loss (L1)", "train_loss.png"),
                             ("val_srcc", "validation SRCC", "val_srcc.png")]:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in runs:
            xs = [m["epoch"] for m in r["metrics"]]
            ax.plot(xs, [m[key] for m in r["metrics"]], marker="o", markersize=3, label=r["path"].name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(label + " per epoch")
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(folder / name)
    return written


def report_command(paths: list[str], as_markdown: bool, plot_dir: str) -> int:
    runs = [load_run(p) for p in find_runs(paths)]
    header, body = rows(runs, "; " if as_markdown else "\n")
    console = output_console()
    if as_markdown:
        console.print(markdown(header, body), markup=False, highlight=False, soft_wrap=True)
    else:
        table = Table(title=f"{len(runs)} run(s)")
        for h in header:
            table.add_column(h, justify="left" if h in ("run", "differs") else "right", overflow="fold")
        for r in body:
            table.add_row(*r)
        console.print(table)
        ref = Table(title="phase one (KonIQ-10k, Q-Align split, selected on test)")
        for h in ("config", "SRCC", "PLCC"):
            ref.add_column(h)
        for name, s, p in PHASE_ONE:
            ref.add_row(name, f"{s:.4f}", f"{p:.4f}")
        console.print(ref)
    if plot_dir:
        for path in plot(runs, Path(plot_dir)):
            Console(stderr=True).print(f"wrote {path}")
    return 0
