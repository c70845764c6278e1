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
