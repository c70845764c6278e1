"""`iqa-dist report`: compare runs at a glance, beside phase one's reference table.

The table shows only the config fields that differ between the runs, their val/test SRCC and
PLCC (a joint run's each dataset too, from the exported weights), selected epoch, epochs run,
training time and throughput; phase one's table beside it when every run is a KonIQ-10k run. `--markdown` prints the same as
Markdown; `--plot DIR` draws training loss and val SRCC per epoch, overlaid (matplotlib, an
optional extra imported only here).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts.rundir import RunDir
from ..config import ENVIRONMENT, flatten
from ..errors import UserError
from ..output import fmt, fmt_epoch, markdown_table, pyplot
from .compare import shared

# Phase one on KonIQ-10k (Q-Align split, selection on test); the README's "Reproducing the papers".
PHASE_ONE = [
    ("ResNet-50 HyperIQA (paper reproduction)", 0.9009, 0.9170),
    ("Swin-T backbone", 0.9154, 0.9298),
    ("+ ranking loss (alpha 0.3)", 0.9206, 0.9334),
    ("+ multi-scale fusion (concat)", 0.9195, 0.9316),
    ("+ anti-overfitting (no ColorJitter)", 0.9207, 0.9330),
    ("+ ColorJitter (best)", 0.9236, 0.9353),
]


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories named, or found (with their meta.json: a run that started) under the given folders."""
    found = []
    for p in paths or ["runs"]:
        path = Path(p)
        if RunDir.is_run(path):
            found.append(path)
        elif path.is_dir():
            found += sorted(q.parent for q in path.rglob(RunDir.CONFIG) if (q.parent / RunDir.META).exists())
        else:
            raise UserError(f"{p}: no such run directory")
    if not found:
        raise UserError(f"no runs found in {', '.join(paths or ['runs'])}")
    return found


def load_run(path: Path) -> dict:
    run = RunDir(path)
    return {"path": path, "config": run.raw_config(), "metrics": run.metrics(), "summary": run.summary(),
            "state": run.state()}


def differing_keys(runs: list[dict]) -> list[str]:
    flats = [flatten(r["config"]) for r in runs]
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
        flat = flatten(r["config"])
        s = r["summary"]
        last = r["metrics"][-1] if r["metrics"] else {}
        if s:
            stats = [s["val"].get("srcc"), s["val"].get("plcc"), s["test"].get("srcc"), s["test"].get("plcc"),
                     fmt_epoch(s["best_epoch"]), f"{fmt_epoch(s['epochs_run'])}{' (early)' if s['stopped_early'] else ''}",
                     s["train_seconds"], s["patches_per_s"]]
        else:  # unfinished: its latest evaluation, and what it is now (running, stopped, failed)
            stats = [last.get("val_srcc"), last.get("val_plcc"), "-", "-", "-",
                     f"{fmt_epoch(last.get('epoch', 0))} ({r.get('state', 'unfinished')})", last.get("elapsed_s"),
                     last.get("patches_per_s")]
        body.append([r["path"].name, *([_differs(flat, keys, sep)] if keys else []), *(fmt(v) for v in stats)])
        for name, d in ((s or {}).get("datasets") or {}).items():  # a joint run: each dataset, then combined
            body.append([f"  {name}", *([""] if keys else []), *(fmt(v) for v in (
                d["val"].get("srcc"), d["val"].get("plcc"), d["test"].get("srcc"), d["test"].get("plcc"))),
                *[""] * 4])
    return header, body


def koniq_only(runs: list[dict]) -> bool:
    """Phase one's reference table compares with KonIQ-10k runs only (not synthetic, joint or other data)."""
    return all(r["config"].get("data", {}).get("dataset") == "koniq10k" and not r["config"]["data"].get("datasets")
               for r in runs)


def markdown(header: list[str], body: list[list[str]], reference: bool = True) -> str:
    ref = markdown_table(["config", "SRCC", "PLCC"], [[name, f"{s:.4f}", f"{p:.4f}"] for name, s, p in PHASE_ONE])
    return markdown_table(header, body) + (f"\n\nPhase one (KonIQ-10k, for reference):\n\n{ref}" if reference else "")


def plot(runs: list[dict], folder: Path) -> list[Path]:
    plt = pyplot("--plot")
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


def plot_group(table: dict, folder: Path) -> list[Path]:
    """A sweep group's picture: per config, every repeat's test SRCC (points over a box) with the
    baseline's median as a line; and the paired differences with the baseline, their median and
    95% interval."""
    plt = pyplot("--plot")
    folder.mkdir(parents=True, exist_ok=True)
    configs = list(table["configs"])
    members = [m for m in table["members"] if m.get("finished") and m.get("test_srcc") is not None]
    values = [[m["test_srcc"] for m in members if m["config"] == c] for c in configs]
    labels = [c or "(base)" for c in configs]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(configs)), 4.5), dpi=120)
    ax.boxplot(values, tick_labels=labels, showfliers=False)
    for i, vs in enumerate(values, 1):
        ax.scatter([i + 0.08 * (j - (len(vs) - 1) / 2) / max(1, len(vs)) * 4 for j in range(len(vs))], vs, s=14,
                   zorder=3)
    base = table["configs"][table["baseline"]].get("test_srcc")
    if base:
        ax.axhline(base["median"], linestyle="--", color="gray", label=f"{table['baseline'] or '(base)'} median")
        ax.legend(fontsize=7)
    ax.set_ylabel("test SRCC (val-selected)")
    ax.set_title("test SRCC per config, one point per repeat")
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    written = [folder / "test_srcc_by_config.png"]
    fig.savefig(written[0])
    plt.close(fig)
    others = [(c, table["configs"][c]["vs_baseline"]) for c in configs if c != table["baseline"]]
    others = [(c, d) for c, d in others if d.get("pairs")]
    if others:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(others)), 4.5), dpi=120)
        for i, (c, d) in enumerate(others):
            ax.scatter([i] * len(d["diffs"]), d["diffs"], s=14, alpha=0.6)
            ax.errorbar([i + 0.15], [d["median"]], yerr=[[d["median"] - d["ci95"][0]], [d["ci95"][1] - d["median"]]],
                        fmt="o", color="black", capsize=4)
        ax.axhline(0, color="gray", linewidth=1)
        ax.set_xticks(range(len(others)), [c or "(base)" for c, _ in others], rotation=20, fontsize=7)
        ax.set_xlim(-0.6, len(others) - 0.4)  # room for the points and the interval beside them, at either end
        ax.margins(y=0.15)
        ax.set_ylabel(f"test SRCC minus {table['baseline'] or '(base)'}'s,\n{shared(table.get('repeats', {}).get('by', ''))}")
        ax.set_title("paired differences with the baseline:\neach pair, the median and its 95% bootstrap interval",
                     fontsize=10)
        fig.tight_layout()
        written.append(folder / "paired_differences.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written
