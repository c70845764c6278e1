"""A sweep group's table: each member's figures, each config's summary over its repeats and its
paired comparison with the baseline (compare.py), written to results.json and shown.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts.rundir import RunDir
from ..output import console, fmt, fmt_epoch, show_rows
from .compare import compare, shared, summary
from .group import RESULTS, exit_state, member_runs, read_info, read_members, read_status


def collect(group: Path, show_table: bool = True) -> dict:
    """The combined table of a group: per member val/test SRCC and PLCC; per config their summary
    over its repeats and the paired comparison with the baseline (compare.py); results.json."""
    group = Path(group)
    info = read_info(group)
    results = info["results"] if info["kind"] == "cross" else [member_result(group, m, read_status(group))
                                                              for m in read_members(group)]
    configs = info.get("configs") or list(dict.fromkeys(r.get("config", r.get("member")) for r in results))
    baseline = info.get("baseline") or (configs[0] if configs else "")
    table = {**info, "members": results, "baseline": baseline}
    if info["kind"] != "cross":
        table["configs"] = compare(results, configs, baseline, seed=0)
        table["bootstrap_seed"] = 0
    done = [r for r in results if r.get("finished", True) and r.get("test_srcc") is not None]
    if len(configs) <= 1 or info["kind"] == "cross":  # one config: the whole group's statistics
        table["statistics"] = {k: st for k in ("test_srcc", "test_plcc", "val_srcc", "val_plcc")
                               if (st := summary([r[k] for r in done if r.get(k) is not None]))}
    (group / RESULTS).write_text(json.dumps(table, indent=1))
    if show_table:
        show(table, group)
    return table


def member_result(group: Path, member: dict, status: dict[str, int]) -> dict:
    """One member's row: its latest run's val/test figures, or its state (stopped, failed: why)."""
    name = member["name"]
    runs = member_runs(group, name)
    done = RunDir(runs[-1]).summary() if runs else None
    code = status.get(name)
    state = "finished" if done else exit_state(code, group / f"{name}.log") if code else "not finished"
    on_test = (done or {}).get("test_selected_on_test") or {}
    return {"member": name, "config": member.get("config", name), "repeat": member.get("repeat", ""),
            "run": runs[-1].name if runs else None, "finished": done is not None, "state": state,
            **({f"{s}_{k}": done[s].get(k) for s in ("val", "test") for k in ("srcc", "plcc")} if done else {}),
            "test_on_test_srcc": on_test.get("srcc"), "best_epoch": done and done["best_epoch"]}


# Columns a narrow terminal leaves out, the least important first (`report GROUP --wide` shows them)
MEMBER_DROP = ["best epoch", "test SRCC selected on test (optimistic)", "val plcc", "val srcc", "test plcc"]
CONFIG_DROP = ["val SRCC median", "mean ± std", "n", "Wilcoxon p", "test SRCC median"]


def show(table: dict, group: Path, out=None, markdown: bool = False, wide: bool = False) -> None:
    """The members' table, then (several configs) each config against the baseline."""
    out = out or console()
    hint = f"iqa-dist report {group} --wide or --markdown shows every column"
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
    show_rows(out, f"sweep {table['kind']} ({group})", [labels.get(c, c.replace("_", " ")) for c in columns], rows,
              markdown, MEMBER_DROP, wide, hint)
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
        pairs = shared((table.get("repeats") or {}).get("by", ""))
        show_rows(out, f"configs against {table['baseline']}: paired by repeat ({pairs}); verdict at 5% "
                   "(Wilcoxon signed-rank)", header, rows, markdown, CONFIG_DROP, wide, hint)
