"""Grid sweeps and their paired statistics: expansion and naming, pairing by split, the bootstrap
(reproducible by seed), the Wilcoxon value (scipy's), the verdict rules, the group table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from iqa_dist.errors import UserError
from iqa_dist.experiments.compare import MIN_PAIRS, bootstrap_median, compare, paired, verdict, wilcoxon
from iqa_dist.experiments.grid import grid_configs, members

from .conftest import here


def test_grid_crosses_the_axes_and_names_members_by_their_settings():
    specs = members("grid", ["model.pretrained=none"], 2, ["optim.lr=1e-5,2e-5", "model.drop_path=0.1,0.2"], "splits")
    assert [m["name"] for m in specs[:3]] == ["lr=1e-5,drop_path=0.1,split00", "lr=1e-5,drop_path=0.1,split01",
                                               "lr=1e-5,drop_path=0.2,split00"]
    assert len(specs) == 8 and len({m["config"] for m in specs}) == 4
    first = specs[0]["overrides"]
    assert first == ["model.pretrained=none", "optim.lr=1e-5", "model.drop_path=0.1", "data.split=random",
                     "data.split_seed=0", "train.seed=0"]
    seeds = members("grid", [], 3, ["optim.lr=1e-5"], "seeds")
    assert [m["repeat"] for m in seeds] == ["seed00", "seed01", "seed02"]
    assert seeds[2]["overrides"] == ["optim.lr=1e-5", "train.seed=2"]  # the preset's split: only the seed varies
    # ablation and splits are grids with fixed axes (one code path)
    ablation = members("ablation", [], 2, by="splits")
    assert {m["config"] for m in ablation} == {"none", "dropout-only", "drop_path-only", "weight_decay-only",
                                               "jitter-only", "all"} and len(ablation) == 12
    assert [m["name"] for m in members("splits", [], 3)] == ["split00", "split01", "split02"]
    # a key whose last part is ambiguous keeps its section
    assert grid_configs(["optim.lr=1", "train.lr=2"])[0][0] == "optim.lr=1,train.lr=2"
    for bad in (["optim.lr"], ["optim.lr="], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(UserError):
            grid_configs(bad)


def _members(config: str, values: dict[int, float]) -> list[dict]:
    return [{"config": config, "repeat": f"split{i:02d}", "finished": True, "test_srcc": v, "val_srcc": v}
            for i, v in values.items()]


def test_pairs_are_made_by_repeat_and_only_where_both_finished():
    base = _members("a", {0: 0.80, 1: 0.82, 2: 0.81})
    other = _members("b", {1: 0.85, 2: 0.83, 3: 0.99})  # split03 has no baseline partner, split00 no other
    assert paired(other, base) == pytest.approx([0.03, 0.02])


def test_bootstrap_is_reproducible_by_seed(monkeypatch):
    diffs = [0.010, -0.002, 0.004, 0.007, 0.001, 0.012, -0.001, 0.0035]
    assert bootstrap_median(diffs, seed=0) == bootstrap_median(diffs, seed=0)
    import iqa_dist.experiments.compare as compare_module

    monkeypatch.setattr(compare_module, "BOOTSTRAP", 25)  # few resamples: the seed shows in the interval
    assert bootstrap_median(diffs, seed=0) != bootstrap_median(diffs, seed=1)
    monkeypatch.undo()
    low, high = bootstrap_median(diffs, seed=0)
    assert low <= float(np.median(diffs)) <= high and low >= min(diffs) and high <= max(diffs)


def test_wilcoxon_is_scipys_and_the_verdicts_follow_the_rules():
    diffs = [0.010, -0.002, 0.004, 0.007, 0.001, 0.012, 0.003, 0.006]
    assert wilcoxon(diffs) == pytest.approx(scipy.stats.wilcoxon(diffs).pvalue)
    assert wilcoxon([0.0] * 6) == 1.0  # no difference at all: nothing to test
    assert verdict(MIN_PAIRS - 1, 0.5, 0.0).startswith("too few repeats (4 pairs")
    assert verdict(8, 0.004, 0.01) == "better" and verdict(8, -0.004, 0.01) == "worse"
    assert verdict(8, 0.004, 0.2) == "not distinguishable"


def test_compare_gives_every_config_its_summary_and_the_paired_test():
    base = _members("a", {i: 0.80 + 0.01 * i for i in range(8)})
    better = _members("b", {i: 0.80 + 0.01 * i + 0.005 + 0.001 * (i % 3) for i in range(8)})
    same = _members("c", {i: 0.80 + 0.01 * i + (0.001 if i % 2 else -0.001) for i in range(8)})
    few = _members("d", {i: 0.9 for i in range(3)})
    out = compare([*base, *better, *same, *few], ["a", "b", "c", "d"], "a", seed=0)
    assert "vs_baseline" not in out["a"] and out["a"]["n"] == 8
    assert out["a"]["test_srcc"]["median"] == pytest.approx(np.median([m["test_srcc"] for m in base]))
    assert out["b"]["vs_baseline"]["verdict"] == "better" and out["b"]["vs_baseline"]["p"] < 0.05
    assert out["c"]["vs_baseline"]["verdict"] == "not distinguishable"
    assert out["d"]["vs_baseline"]["verdict"].startswith("too few repeats")
    assert compare([*base, *better], ["a", "b"], "a", seed=0) == compare([*base, *better], ["a", "b"], "a", seed=0)


def _group(tmp_path: Path) -> Path:
    """A finished 2-config x 6-split grid group, written as the sweep writes it."""
    group = tmp_path / "20261127-000000-sweep-grid"
    group.mkdir()
    configs = ["lr=1e-3", "lr=3e-4"]
    (group / "sweep.json").write_text(json.dumps({"kind": "grid", "configs": configs, "baseline": configs[0],
                                                   "repeats": {"by": "splits", "n": 6}}))
    lines = []
    rng = np.random.default_rng(0)
    for c, shift in zip(configs, (0.0, 0.01)):
        for i in range(6):
            name = f"{c},split{i:02d}"
            lines.append(json.dumps({"name": name, "config": c, "repeat": f"split{i:02d}", "args": []}))
            run = group / f"20261127-00000{i}-{name}"
            run.mkdir()
            (run / "config.yaml").write_text("data: {}\n")
            srcc = 0.80 + 0.02 * i + shift + float(rng.normal(0, 0.001))
            (run / "summary.json").write_text(json.dumps({
                "val": {"srcc": srcc, "plcc": srcc}, "test": {"srcc": srcc, "plcc": srcc}, "best_epoch": 1.5,
                "test_selected_on_test": {"srcc": srcc + 0.004, "plcc": srcc}}))
    (group / "members.jsonl").write_text("\n".join(lines) + "\n")
    return group


def test_the_group_table_report_and_plot(tmp_path):
    group = _group(tmp_path)
    code = here("sweep", "collect", str(group))
    assert code.returncode == 0, code.stderr
    assert "configs against lr=1e-3" in code.stdout and "better" in code.stdout
    assert "selected on test (optimistic)" in code.stdout  # both columns, labelled
    results = json.loads((group / "results.json").read_text())
    vs = results["configs"]["lr=3e-4"]["vs_baseline"]
    assert vs["pairs"] == 6 and vs["verdict"] == "better" and vs["ci95"][0] > 0 and results["bootstrap_seed"] == 0
    md = here("report", str(group), "--markdown", "--plot", str(tmp_path / "plots"))
    assert md.returncode == 0, md.stderr
    assert "| lr=3e-4 | 6 |" in md.stdout and "| better |" in md.stdout
    for name in ("test_srcc_by_config.png", "paired_differences.png"):
        with Image.open(tmp_path / "plots" / name) as im:
            assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not blank


def test_grid_options_are_checked_before_a_group_is_made(tmp_path):
    for args, expected in ((["--set", "optim.lr"], "expected KEY=V1,V2"),
                           (["--set", "optim.lr=1e-5", "--splits", "2", "--seeds", "2"], "not both"),
                           (["--set", "optim.lr=1e-5,2e-5", "--baseline", "lr=9"], "--baseline 'lr=9' is not one"),
                           ([], "give at least one --set")):
        out = here("sweep", "grid", "--preset", "demo", *args, f"--run.root={tmp_path}")
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())
