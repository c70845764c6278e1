"""`iqa-dist bench`'s tables: the report `run.run_bench` measured, shown (measuring and showing
kept apart: the benches return numbers, never print tables).
"""

from __future__ import annotations

import math

from rich.table import Table

from ..output import console as make_console, fmt, print_table
from .inputs import KONIQ_EPOCH
from .scaling import GPUS_PER_NODE
from .timing import NOISY, Rate


def fr(v) -> str:
    """A measured figure with its spread, flagged when the machine was noisy: '152.6 ±4%'."""
    if not isinstance(v, Rate) or math.isnan(v.spread):
        return fmt(v)
    return f"{fmt(v)} ±{100 * v.spread:.0f}%" + (" noisy" if v.spread > NOISY else "")


def show(report: dict) -> None:
    """The report's tables (`warn_noisy` then names the figures whose timed blocks disagreed)."""
    out = make_console()
    m = report["machine"]
    where = f"{m['gpu'] or m['cpu']} ({m['cpu_cores']} CPU cores, torch {m['torch']})"
    if "augment" in report:
        a = report["augment"]
        out.print(f"augmentation on the same decoded images ({a['img_size']} px crops, flip, ColorJitter, normalise): "
                  f"torchvision per image on the CPU {fr(a['torchvision_cpu'])} patches/s, iqa_dist batched on "
                  f"{report['device']} {fr(a['iqa_dist'])} patches/s ({fmt(a['speedup'])}x) - {where}", highlight=False)
    if "data" in report:
        d = report["data"]
        t = Table()
        for c in ("pipeline", "patches/s", "x phase one"):
            t.add_column(c, justify="right" if c != "pipeline" else "left")
        t.add_row("(a) phase one: decode + resize per patch, CPU transforms", fr(d["phase_one"]), "1")
        t.add_row("(b) cache + device crop/flip/jitter", fr(d["cache_device_crops"]), fmt(d["speedup_device_crops"]))
        t.add_row("(c) cache + stored patches", fr(d["cache_stored_patches"]), fmt(d["speedup_stored_patches"]))
        t.add_row("(b) host side only: the CPU's share when augmentation runs on a GPU", fr(d["host_work_device_crops"]),
                  fmt(d["speedup_host_work"]))
        print_table(out, f"data pipeline, patches/s ready on {report['device']} - {where}", t)
        if report["device"] == "cpu":
            out.print("On this machine the CPU is also the device: (b) and (c) include the augmentation arithmetic "
                      "that a GPU would do; the last row is what remains on the CPU cores when a GPU does it.")
        out.print(f"cache: reads {fmt(d['cache_read_images_per_s'])} training images/s and "
                  f"{fmt(d['cache_read_eval_images_per_s'])} evaluation images/s (with their protocol patches) into "
                  f"memory; {d['cache_mb_per_1000_images']} MB per 1,000 KonIQ-size (512x384) images", highlight=False)
    if "train" in report:
        t = Table()
        for c in ("backbone", "precision", "compile", "batch", "end to end", "model only", "anchor", "% of anchor",
                  "input overhead %", "MFU %", "peak GiB", "first step s"):
            t.add_column(c, justify="right")
        for r in report["train"]:
            t.add_row(r["backbone"], r["precision"], str(r["compile"]), str(r["batch"]), fr(r["end_to_end"]),
                      fr(r["model_only"]), fr(r["anchor"]), fmt(r["pct_of_anchor"]), fmt(r["overhead_pct"]),
                      fmt(r.get("mfu_pct")), fmt(r["memory_gib"]), fmt(r["first_step_s"]))
        print_table(out, f"training steps, patches/s (end to end = `iqa-dist train`'s step with its input path; model "
                         f"only = the same step on a batch already on the device; anchor = timm's plain classifier of "
                         f"the backbone, same batch, precision, fused AdamW, clipping){_recipe(report['train'])} - "
                         f"{where}", t)
    if report.get("projection"):
        t = Table()
        for c in ("backbone", "precision", "compile", "GPUs", "batch per GPU", "patches/s", "KonIQ epoch s",
                  "30 epochs min"):
            t.add_column(c, justify="right")
        for r in report["projection"]:
            t.add_row(r["backbone"], r["precision"], str(r["compile"]), str(r["gpus"]), str(r["per_gpu_batch"]),
                      fmt(r["patches_per_s"]), fmt(r["epoch_s"]), fmt(30 * r["epoch_s"] / 60))
        print_table(out, f"projected (not measured): a KonIQ epoch ({KONIQ_EPOCH:,} patches) at global batch 96 on N "
                         "GPUs, each at the end-to-end rate measured for its per-GPU batch; communication and "
                         "evaluation not included", t)
    if "scaling" in report:
        show_scaling(out, report["scaling"], where)
    if "predict" in report:
        show_predict(out, report["predict"], where)
    if "serve" in report:
        show_serve(out, report["serve"], where)
    for k in report.get("kernels", []):
        show_kernels(out, k, where)
    if "graph" in report:
        show_graph(out, report["graph"], where)
    if "profile" in report:
        show_profile(out, report["profile"], where)
    for e in report.get("eval", []):
        out.print(f"evaluation: {fr(e['images_per_s'])} images/s ({fmt(e['patches_per_s'])} patches/s, "
                  f"{e['test_patch_num']} patches per image, {e['backbone']} at {e['img_size']} px, {e['precision']}, "
                  f"compile={e['compile']})", highlight=False)


def show_predict(out, p: dict, where: str) -> None:
    t = Table()
    for c in ("patches an image", "(a) decode in the main thread, then scoring (the loop before)",
              f"(b) score_files: {p['workers']} decoding worker(s)", "x before", "model alone", "(b) per image"):
        t.add_column(c, justify="right")
    for r in p["rows"]:
        per = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r["b_seconds_per_image"].items() if v)
        t.add_row(str(r["patches"]), fr(r["a_before"]), fr(r["b_score_files"]), fmt(r["speedup"]), fr(r["model_only"]),
                  per)
    print_table(out, f"predict, images/s: {p['images']} KonIQ-size JPEGs -> 512x384, {p['protocol']} patches of "
                     f"{p['img_size']} px, {p['backbone']} model - {where}", t)
    for r in p["rows"]:
        if "b_decode_gpu" in r:
            out.print(f"(b) with --decode gpu ({r['patches']} patches): {fr(r['b_decode_gpu'])} images/s", highlight=False)
    onnx = p.get("onnx", {})
    if "torch_cpu" in onnx:
        out.print(f"the model alone on the CPU, the same patches: torch {fr(onnx['torch_cpu'])} images/s, onnxruntime "
                  f"{fr(onnx['onnxruntime_cpu'])} ({fmt(onnx['speedup'])}x torch; the export took {onnx['export_s']} s "
                  f"and agreed with torch to {onnx['max_rel_diff']:.1e})", highlight=False)
    out.print(f"decode + resize alone: {fr(p['decode_main_thread'])} images/s in the main thread, "
              f"{fr(p['decode_workers'])} in {p['workers']} worker(s). Where the device is the CPU itself, the model "
              "already uses every core: decoding beside it can only take its turn on them.", highlight=False)


def show_serve(out, s: dict, where: str) -> None:
    t = Table()
    for c in ("clients", "serve images/s", "x predict (paired blocks)", "p50 ms", "p99 ms", "requests timed"):
        t.add_column(c, justify="right")
    for r in s["rows"]:
        paired = " ".join(f"{v:.2f}" for v in r["vs_predict_blocks"])
        t.add_row(str(r["clients"]), fr(r["images_per_s"]), f"{fmt(r['vs_predict'])} ({paired})", fmt(r["p50_ms"]),
                  fmt(r["p99_ms"]), str(r["requests"]))
    print_table(out, f"serve (one request an image, batches of up to {s['max_batch']}, {s['max_wait_ms']:g} ms wait) "
                     f"against predict ({fr(s['predict'])} images/s, {s['predict_workers']} decoding worker(s)), "
                     f"{s['blocks']} blocks of each interleaved, on the "
                     f"same {s['images']} KonIQ-size JPEGs -> 512x384, {s['patches']} {s['protocol']} patches of "
                     f"{s['img_size']} px, {s['backbone']} model - {where}", t)


def show_scaling(out, sc: dict, where: str) -> None:
    t = Table()
    for c in ("per-process batch", "patches/s (measured)"):
        t.add_column(c, justify="right")
    for r in sc["measured"]:
        t.add_row(str(r["batch"]), fr(r["end_to_end"]))
    print_table(out, f"MEASURED: the real step (end to end), {sc['backbone']} {sc['precision']} - {where}; gradients "
                     f"{sc['grad_bytes']['fp32'] / 1e6:.1f} MB per step in fp32 ({sc['grad_bytes']['bf16'] / 1e6:.1f} MB "
                     f"with train.grad_compression=bf16)", t)
    for key, label in (("fixed_batch", f"global batch {sc['global_batch']}"), ("per_gpu_96", "96 per GPU")):
        t = Table()
        for c in ("GPUs", "batch per GPU", "compute ms", "all-reduce ms", "step ms", "patches/s", "KonIQ epoch s"):
            t.add_column(c, justify="right")
        for r in sc[key]:
            t.add_row(str(r["gpus"]), fmt(r["per_gpu_batch"]), fmt(r["compute_ms"]), fmt(r["comm_ms"]),
                      fmt(r["step_ms"]), fmt(r["patches_per_s"]), fmt(r["epoch_s"]))
        print_table(out, f"PROJECTED, not measured: {label}; compute at the measured rate for the per-GPU batch; "
                         f"ring all-reduce at {sc['intra_gbps']:g} GB/s per GPU within a node of {GPUS_PER_NODE} "
                         f"and {sc['inter_gbps']:g} GB/s across nodes, not overlapped with the backward pass "
                         "(an upper bound)", t)
    sw = sc["sweep_30_epochs"]
    out.print(f"PROJECTED sweep throughput on one 8-GPU node (30-epoch KonIQ runs at batch 96): "
              f"{fmt(sw['members_per_hour_8_parallel'])} members/hour with 8 members in parallel (one GPU each) vs "
              f"{fmt(sw['members_per_hour_one_at_a_time_on_8'])} one at a time on all 8 GPUs ({fmt(sw['speedup'])}x)",
              highlight=False)


def _recipe(rows: list[dict]) -> str:
    """What the step carries beyond the koniq-swin-t recipe: the weight EMA, self-distillation."""
    row = rows[0] if rows else {}
    extra = [f"weight EMA {row['ema_decay']}"] if row.get("ema_decay") else []
    extra += [f"self-distillation {row['distill_weight']}"] if row.get("distill_weight") else []
    return f"; step with {', '.join(extra)}" if extra else ""


def show_kernels(out, k: dict, where: str) -> None:
    parts = sorted({p for x in "ABC" for p in k[x]["parts"]}, key=lambda p: -k["A"]["parts"].get(p, 0))
    t = Table()
    for c in ("part", "A: real step", "B: model only", "C: anchor"):
        t.add_column(c, justify="right" if c != "part" else "left")
    for p in parts:
        t.add_row(p, *(f"{k[x]['parts'][p]:,.4g}" if p in k[x]["parts"] else "-" for x in "ABC"))
    t.add_row("total kernels", *(f"{k[x]['kernels']:,.6g}" for x in "ABC"))
    t.add_row("host syncs", *(f"{k[x]['syncs']:g}" for x in "ABC"))
    t.add_row("uploads / downloads", *(f"{k[x]['uploads']:g} / {k[x]['downloads']:g}" for x in "ABC"))
    print_table(out, f"device kernels per step (compute and copies, views excluded), {k['backbone']} HyperIQA, "
                     f"koniq-swin-t recipe with an EMA{' and self-distillation' if k.get('teacher') else ''}, "
                     f"compile={k['compile']}, counted on {where}", t)
    verdict = {True: "met", False: "MISSED"}
    tg, ch = k["targets"], k["checks"]
    without = " without the teacher" if k.get("teacher") else ""
    out.print(f"A/B {k['a_over_b']:.3f} (<= {tg['a_over_b']}: {verdict[ch['a_over_b']]}), B/C{without} {k['b_over_c']:.3f} "
              f"(<= {tg['b_over_c']}: {verdict[ch['b_over_c']]}), augmentation {k['A']['parts'].get('augment', 0):g} "
              f"(<= {tg['augment']}: {verdict[ch['augment']]}), guard {k['A']['parts'].get('guard', 0):g} "
              f"(<= {tg['guard']}: {verdict[ch['guard']]}), EMA {k['A']['parts'].get('ema', 0):g} "
              f"(<= {tg['ema']}: {verdict[ch['ema']]}), no host sync: {verdict[ch['no_syncs']]}", highlight=False)
    for x in "ABC":
        for f in k[x]["findings"]:
            out.print(f"  {x}: {f}", highlight=False)
    if "capture" in k["A"]:
        blockers = k["A"]["capture"]["blockers"]
        out.print(f"capture readiness of A (what one CUDA graph of the step would freeze, compared over "
                  f"{k['A']['capture']['steps']} steps): " + (f"{len(blockers)} blocker(s)" if blockers else "ready"),
                  highlight=False)
        for b in blockers:
            out.print(f"  {b}", highlight=False, markup=False)
    if "G" in k:
        g = k["G"]
        out.print(f"G, the body train.cuda_graph captures: {g['kernels']:,.6g} kernels per step, {g['syncs']:g} host "
                  f"syncs; capture readiness over {g['capture']['steps']} steps: "
                  + (f"{len(g['capture']['blockers'])} blocker(s)" if g["capture"]["blockers"] else "ready"),
                  highlight=False)
        for b in g["capture"]["blockers"] + g["findings"]:
            out.print(f"  {b}", highlight=False, markup=False)
    if "augment_inductor_kernels" in k:
        out.print(f"compiled augmentation: inductor generated {k['augment_inductor_kernels']} kernel(s)", highlight=False)
    if "sync_debug" in k:
        sd = k["sync_debug"]
        out.print(f"torch.cuda.set_sync_debug_mode('error'), {sd['steps']} real steps at batch {sd['batch']}: "
                  + ("passed" if sd["passed"] else f"FAILED: {sd['error']}"), highlight=False)


def show_profile(out, rows: list[dict], where: str) -> None:
    t = Table()
    t.add_column("part", justify="left")
    for r in rows:
        t.add_column(f"{r['mode']}: host ms", justify="right")
        t.add_column(f"{r['mode']}: device ms", justify="right")
    names = sorted({p for r in rows for p in r["parts"]}, key=lambda p: -rows[0]["parts"].get(p, {}).get("host_ms", 0))
    for p in names:
        t.add_row(p, *(fmt(r["parts"][p][k]) if p in r["parts"] else "-" for r in rows for k in ("host_ms", "device_ms")))
    t.add_row("wall per step", *(x for r in rows for x in (fmt(r["wall_ms"]), "")))
    t.add_row("device busy / idle per step", *(x for r in rows for x in ("", f"{fmt(r['device_busy_ms'])} / "
                                                                            f"{fmt(r['device_idle_ms'])}")))
    r0 = rows[0]
    print_table(out, f"torch.profiler, {r0['steps']} steady steps of the real step, {r0['backbone']} {r0['precision']} "
                     f"batch {r0['batch']}, ms per step - {where}", t)
    for r in rows:
        if "graphs" in r:
            out.print(f"{r['mode']}: dynamo graphs {r['graphs']}, graph breaks {r['graph_breaks']}, recompiles "
                      f"{r['recompiles']}", highlight=False)


def show_graph(out, g: dict, where: str) -> None:
    t = Table()
    for c in ("batch", "eager", "graphed", "x eager", "eager ms (host ms)", "graphed ms (host ms)", "capture s",
              "peak GiB eager / graphed"):
        t.add_column(c, justify="right")
    for r in g["rows"]:
        t.add_row(str(r["batch"]), fr(r["eager"]), fr(r["graphed"]), fmt(r["speedup"]),
                  f"{fmt(r['eager_step_ms'])} ({fmt(r['eager_host_ms'])})",
                  f"{fmt(r['graphed_step_ms'])} ({fmt(r['graphed_host_ms'])})", fmt(r["capture_s"]),
                  f"{fmt(r['eager_memory_gib'])} / {fmt(r['graphed_memory_gib'])}")
    kind = "captured and replayed" if g["captured"] else "NOT captured (no CUDA): the graphed body run eagerly"
    print_table(out, f"train.cuda_graph, patches/s end to end ({kind}), {g['backbone']} {g['precision']}, "
                     f"ms per step with the host's CPU ms per step - {where}", t)
    if g.get("projection"):
        t = Table()
        for c in ("GPUs", "batch per GPU", "eager patches/s", "x 1 GPU", "graphed patches/s", "x 1 GPU eager"):
            t.add_column(c, justify="right")
        for r in g["projection"]:
            t.add_row(str(r["gpus"]), str(r["per_gpu_batch"]), fmt(r["eager"]), fmt(r["eager_x_one_gpu"]),
                      fmt(r["graphed"]), fmt(r["graphed_x_one_gpu"]))
        print_table(out, "projected (not measured): one run at global batch 96 on N GPUs, each at the rate measured "
                         "above for its share; all-reduce not included (bench scaling adds it)", t)
    ch = g["check"]
    out.print(f"equality: {ch['steps']} steps at batch {ch['batch']}, {'graphed' if ch['captured'] else 'eager'} vs "
              f"eager from the same start: largest relative loss difference {ch['loss_max_rel']:.3g}, weights "
              f"{ch['weights_rel']:.3g} (two eager runs: {ch['floor_loss_max_rel']:.3g}, "
              f"{ch['floor_weights_rel']:.3g}; last loss {ch['last_loss']:.6g} vs {ch['last_loss_eager']:.6g})",
              highlight=False)


def warn_noisy(report: dict, console) -> None:
    noisy = sorted(k for k, v in report["spread"].items() if v > NOISY)
    if noisy:
        console.print(f"noisy: {len(noisy)} figure(s) spread more than {NOISY:.0%} between their timed blocks "
                      f"({', '.join(noisy[:6])}{', ...' if len(noisy) > 6 else ''}): measure again on a quieter "
                      "machine, or with more --steps, before comparing them", highlight=False)
