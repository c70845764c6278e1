"""The page of figures `launch/gpu_bench.sh` leaves: one JSON and one markdown table, read from
the step files in its folder (kernels.json, batches.json, scaling.json, eval.json, predict.json and the two real
training runs' metrics.jsonl), with the targets each figure is judged against. Steps that did not
run (or failed) are reported as missing, never guessed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from ..output import markdown_table
from .inputs import KONIQ_EPOCH

# The targets of the speed work (the step's own, not the model's): see BENCHMARKS.md.
TARGETS = {"real_over_model_only": 0.95, "model_only_over_anchor": 0.90, "compiled_patches_per_s": 2400,
           "thirty_epochs_min": 35.0, "augment_share": 0.03}


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def real_loop(folder: Path) -> dict | None:
    """A real `iqa-dist train` run's rates: each evaluation window's patches/s (the first holds the
    start-up and, compiled, the compilation; the last is the steady state)."""
    runs = sorted(folder.glob("*/metrics.jsonl"))
    lines = [json.loads(x) for f in runs for x in f.read_text().splitlines() if x]
    if not lines:
        return None
    cfg = yaml.safe_load((runs[-1].parent / "config.yaml").read_text())
    return {"windows": [r["patches_per_s"] for r in lines], "steady": lines[-1]["patches_per_s"],
            "steps": lines[-1]["step"], "elapsed_s": lines[-1]["elapsed_s"], "batch": cfg["train"]["batch_size"]}


def collect(folder: Path) -> dict:
    out = {"date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("COMMIT", "unknown"), "folder": str(folder)}
    for name in ("graph", "kernels", "batches", "scaling", "eval", "predict"):
        out[name] = _json(folder / f"{name}.json")
    out["machine"] = next((r["machine"] for r in (out["graph"], out["kernels"], out["batches"], out["eval"]) if r), None)
    out["real_eager"] = real_loop(folder / "runs-eager")
    out["real_compiled"] = real_loop(folder / "runs-compiled")
    out["real_graphed"] = real_loop(folder / "runs-graphed")
    out["checks"] = checks(out)
    return out


def _row96(batches: dict | None) -> dict | None:
    rows = [r for r in (batches or {}).get("train", []) if r["batch"] == 96 and not r["compile"]]
    return rows[0] if rows else None


def checks(out: dict) -> dict:
    """Each target: (measured, target, met) or None when the figure is missing."""
    row, eager, compiled = _row96(out["batches"]), out["real_eager"], out["real_compiled"]
    c = {}
    c["real_over_model_only"] = (eager["steady"] / row["model_only"], TARGETS["real_over_model_only"]) \
        if row and eager else None
    c["model_only_over_anchor"] = (row["model_only"] / row["anchor"], TARGETS["model_only_over_anchor"]) if row else None
    c["compiled_patches_per_s"] = (compiled["steady"], TARGETS["compiled_patches_per_s"]) if compiled else None
    best = max((r["steady"] for r in (eager, compiled) if r), default=None)
    c["thirty_epochs_min"] = (30 * KONIQ_EPOCH / best / 60, TARGETS["thirty_epochs_min"]) if best else None
    c["augment_share"] = (max(0.0, row["overhead_pct"]) / 100, TARGETS["augment_share"]) if row else None
    lower_is_better = {"thirty_epochs_min", "augment_share"}
    return {k: None if v is None else {"measured": v[0], "target": v[1],
                                        "met": v[0] <= v[1] if k in lower_is_better else v[0] >= v[1]}
            for k, v in c.items()}


def markdown(out: dict) -> str:
    m = out["machine"] or {}
    lines = [f"## GPU: {m.get('gpu') or 'none (' + str(m.get('cpu')) + ')'}, torch {m.get('torch', '?')}, commit {out['commit']} ({out['date']})",
             "", "`launch/gpu_bench.sh` (one run; figures in patches/s unless said otherwise).", ""]
    na = "not measured (step missing or failed)"
    for key, label in (("real_eager", "real `iqa-dist train` loop, eager"),
                       ("real_graphed", "real `iqa-dist train` loop, `train.cuda_graph`"),
                       ("real_compiled", "real `iqa-dist train` loop, `train.compile`")):
        r = out[key]
        lines.append(f"- {label}" + (f", batch {r['batch']}: **{r['steady']:,.0f}** in the last window (windows: "
                                     + ", ".join(f"{w:,.0f}" for w in r["windows"]) + ")" if r else f": {na}"))
    g = (out.get("graph") or {}).get("graph")
    if g:
        header = ["batch", "eager", "graphed", "x eager", "eager ms (host ms)", "graphed ms (host ms)", "capture s",
                  "peak GiB eager / graphed"]
        cells = [[str(r["batch"]), f"{r['eager']:,.0f}", f"{r['graphed']:,.0f}", f"{r['speedup']:.2f}",
                  f"{r['eager_step_ms']:.1f} ({r['eager_host_ms']:.1f})",
                  f"{r['graphed_step_ms']:.1f} ({r['graphed_host_ms']:.1f})", f"{r['capture_s']:.1f}",
                  f"{_opt(r['eager_memory_gib'], '.1f')} / {_opt(r['graphed_memory_gib'], '.1f')}"] for r in g["rows"]]
        proj = {r["gpus"]: r for r in g.get("projection", [])}
        if 8 in proj:
            lines.append(f"- projected, one run at global batch 96 on 8 GPUs (no all-reduce): eager "
                         f"{proj[8]['eager_x_one_gpu']:.2f}x one GPU, graphed {proj[8]['graphed_x_one_gpu']:.2f}x")
        ch = g["check"]
        lines += ["`train.cuda_graph` (`bench graph`), patches/s end to end" + ("" if g["captured"] else
                  " (NOT captured: no CUDA)") + ":", "", markdown_table(header, cells, "r" * len(header)), "",
                  f"- equality: {ch['steps']} steps at batch {ch['batch']}, largest relative loss difference "
                  f"{ch['loss_max_rel']:.3g}, weights {ch['weights_rel']:.3g} (two eager runs: "
                  f"{ch['floor_loss_max_rel']:.3g}, {ch['floor_weights_rel']:.3g})", ""]
    else:
        lines.append(f"- `train.cuda_graph` (`bench graph`): {na}")
    k = (out["kernels"] or {}).get("kernels", [None])[0]
    if k:
        lines.append(f"- kernels per step (A real step / B model only / C anchor): {k['A']['kernels']:,.0f} / "
                     f"{k['B']['kernels']:,.0f} / {k['C']['kernels']:,.0f}; host syncs {k['A']['syncs']:g}; "
                     f"augmentation {k['A']['parts'].get('augment', 0):g}, guard {k['A']['parts'].get('guard', 0):g}")
        sd = k.get("sync_debug")
        lines.append("- `set_sync_debug_mode(\"error\")`, " + (f"{sd['steps']} real steps at batch {sd['batch']}: "
                     + ("passed" if sd["passed"] else f"FAILED: {sd['error']}") if sd else "not run (no GPU)"))
    else:
        lines.append(f"- kernels and the sync check: {na}")
    rows = (out["batches"] or {}).get("train", [])
    if rows:
        header = ["batch", "end to end", "model only", "anchor", "model only % of anchor", "MFU %", "peak GiB"]
        cells = [[str(r["batch"]), f"{r['end_to_end']:,.0f}", f"{r['model_only']:,.0f}", f"{r['anchor']:,.0f}",
                  f"{r['pct_of_anchor']:.0f}", _opt(r.get("mfu_pct"), ".2f"), _opt(r["memory_gib"], ".1f")]
                 for r in rows]
        lines += ["", markdown_table(header, cells, "r" * len(header))]
    else:
        lines.append(f"- per-GPU batch table: {na}")
    sc = (out["scaling"] or {}).get("scaling")
    if sc:
        per = {r["gpus"]: r for r in sc["per_gpu_96"]}
        lines.append("- scaling (projected from the measured step): a KonIQ epoch at 96 per GPU in "
                     + ", ".join(f"{per[g]['epoch_s']:.0f} s on {g}" for g in (1, 8, 64) if g in per)
                     + f"; sweep on one 8-GPU node {sc['sweep_30_epochs']['speedup']:.1f}x one-at-a-time")
    for e in (out["eval"] or {}).get("eval", []):
        lines.append(f"- evaluation: {e['images_per_s']:.1f} images/s ({e['test_patch_num']} patches each, "
                     f"compile={e['compile']})")
    p = (out["predict"] or {}).get("predict")
    for r in (p or {}).get("rows", []):
        lines.append(f"- predict ({r['patches']} patches an image, {p['workers']} workers): before {r['a_before']:.1f}, "
                     f"now {r['b_score_files']:.1f} images/s ({r['speedup']:.2f}x); the model alone "
                     f"{r['model_only']:.1f}; decoding alone {p['decode_workers']:.1f} images/s")
    names = {"real_over_model_only": "real loop / model only", "model_only_over_anchor": "model only / anchor",
             "compiled_patches_per_s": "compiled real loop, patches/s",
             "thirty_epochs_min": "30 KonIQ epochs, minutes (training only)",
             "augment_share": "input path share of the step (batch 96)"}
    checks = [(label, out["checks"][key]) for key, label in names.items()]
    cells = [[label, f"{c['measured']:,.3g}", f"{c['target']:g}", "met" if c["met"] else "missed"] if c else
             [label, "missing", "", ""] for label, c in checks]
    lines += ["", markdown_table(["target", "measured", "target", ""], cells, "lrrl")]
    return "\n".join(lines) + "\n"


def _opt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary(folder: Path, output: Path) -> str:
    out = collect(folder)
    output.write_text(json.dumps(out, indent=1, default=str))
    return markdown(out)
