"""`iqa-dist bench` runs end to end on tiny settings (figures positive and finite, JSON complete;
never a speed threshold: speed is measured by the command, not asserted by tests)."""

from __future__ import annotations

import json
import math

import pytest

from .conftest import here


@pytest.mark.slow
def test_bench_all_runs_and_writes_its_json(tmp_path):
    out_file = tmp_path / "bench.json"
    out = here("bench", "all", "--images", "9", "--batch", "8", "--steps", "2", "--workers", "1",
               "--output", str(out_file), "--work-dir", str(tmp_path / "work"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out_file.read_text())
    for key in ("cpu", "cpu_cores", "gpu", "torch"):
        assert key in report["machine"]
    data = report["data"]
    for key in ("phase_one", "cache_device_crops", "cache_stored_patches", "speedup_device_crops",
                "speedup_stored_patches", "cache_read_images_per_s", "cache_mb_per_1000_images",
                "host_work_device_crops", "speedup_host_work", "cache_read_eval_images_per_s"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    aug = report["augment"]
    assert all(math.isfinite(aug[k]) and aug[k] > 0 for k in ("torchvision_cpu", "iqa_dist", "speedup"))
    [row] = report["train"]
    assert row["backbone"] == "tiny" and row["precision"] == "fp32"
    for key in ("model_only", "end_to_end", "gflop_per_patch", "anchor", "pct_of_anchor"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert math.isfinite(row["overhead_pct"])
    [ev] = report["eval"]
    assert ev["images_per_s"] > 0 and ev["test_patch_num"] == 20
    assert "x phase one" in out.stdout and "model only" in out.stdout and "images/s" in out.stdout
    # each figure is a median of timed blocks, printed with its spread (a noisy one flagged)
    assert {"train.0.end_to_end", "train.0.model_only", "train.0.anchor", "data.phase_one", "eval.0.images_per_s",
            "augment.iqa_dist"} <= set(report["spread"])
    assert all(v >= 0 for v in report["spread"].values()) and " ±" in out.stdout
    noisy = [k for k, v in report["spread"].items() if v > 0.10]
    assert ("noisy:" in out.stderr) == bool(noisy)


def test_bench_help_lists_its_own_options_only():
    from iqa_dist.bench.run import BENCHES
    from iqa_dist.commands.bench import WHAT

    assert WHAT == (*BENCHES, "summary", "all")  # every bench is a choice, and every choice but two a bench
    out = here("bench", "--help")
    assert "usage: iqa-dist bench WHAT" in out.stdout and f"which figures: {', '.join(WHAT)}" in " ".join(out.stdout.split())
    assert "--steps" in out.stdout and "--model.img_size" in out.stdout and "--optim.lr" not in out.stdout
    code = here("bench", "train", "--optim.lr=0.1")
    assert code.returncode == 2 and "optim.lr" in code.stderr and "Traceback" not in code.stderr


def test_the_gpu_script_summary_reports_what_ran_and_names_what_did_not(tmp_path):
    """`bench summary` over a launch/gpu_bench.sh folder holding only the eager real loop and a
    `bench kernels` result: those figures in the markdown, every other figure 'missing', the
    JSON beside it; a folder that does not exist is one line, exit 2."""
    run = tmp_path / "runs-eager" / "20261127-000000-koniq-swin-t"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  batch_size: 96\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "patches_per_s": r, "elapsed_s": s / 10}) + "\n"
                                               for s, r in ((150, 1191.3), (300, 1496.4))))
    counts = {"kernels": 1000.0, "syncs": 0.0, "parts": {"augment": 80.0, "guard": 4.0}}
    kernels = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cpu": "x"},
               "kernels": [{"A": counts, "B": {**counts, "kernels": 920.0}, "C": {**counts, "kernels": 800.0},
                            "sync_debug": {"steps": 20, "batch": 96, "passed": True}}]}
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    out = here("bench", "summary", "--work-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    md = out.stdout
    assert "NVIDIA H100 80GB HBM3" in md and "batch 96: **1,496** in the last window (windows: 1,191, 1,496)" in md
    assert "1,000 / 920 / 800" in md and "20 real steps at batch 96: passed" in md
    assert "train.compile`: not measured" in md and "per-GPU batch table: not measured" in md
    assert "| real loop / model only | missing |" in md  # no batch table: no model-only figure
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["real_eager"]["steady"] == 1496.4 and report["real_compiled"] is None
    missing = here("bench", "summary", "--work-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
