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

from . import fixtures
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


def test_the_group_table_report_and_plot(tmp_path, monkeypatch):
    group = _group(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # every header on one line (fitting a width is checked below)
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


# ---------------------------------------------------------------- cross datasets, equal configs


def test_cross_names_each_dataset_argument_and_refuses_one_given_twice(tmp_path):
    from iqa_dist.experiments.cross import dataset_labels

    assert dataset_labels(["spaq=/d/spaq", "kadid10k=/d/kadid"]) == [("spaq", "spaq", "/d/spaq"),
                                                                       ("kadid10k", "kadid10k", "/d/kadid")]
    assert [x[0] for x in dataset_labels(["csv=/d/livefb", "csv=/d/mine", "spaq=/d/spaq"])] == ["csv-livefb", "csv-mine",
                                                                                              "spaq"]
    assert [x[0] for x in dataset_labels(["csv=/a/set", "csv=/b/set"])] == ["csv-1", "csv-2"]  # folder names repeat
    for bad, expected in ((["csv=/d/x", "csv=/d/x/"], "is the same dataset as --dataset 'csv=/d/x'"),
                          (["=/d/x"], "expects NAME=ROOT")):
        with pytest.raises(UserError, match=expected):
            dataset_labels(bad)


def test_cross_with_two_datasets_of_one_kind_keeps_both(single_run, cache_root, tmp_path, monkeypatch):
    """`sweep cross --dataset csv=A --dataset csv=B`: two rows, two reports, two prediction files
    (one used to overwrite the other under the one name "csv"). Each member's evaluation runs in
    this process (the subprocess boundary adds nothing to what is checked)."""
    from iqa_dist.experiments import cross

    for name, n in (("livefb", 4), ("mine", 5)):
        fixtures.generic_csv(tmp_path / name, n=n)

    def in_process(args, **kwargs):
        assert args[1:3] == ["-m", "iqa_dist"], args
        return here(*args[3:])

    monkeypatch.setattr(cross.subprocess, "run", in_process)
    out = here("sweep", "cross", "--run", str(single_run), "--dataset", f"csv={tmp_path / 'livefb'}",
               "--dataset", f"csv={tmp_path / 'mine'}", f"--run.root={tmp_path / 'runs'}")
    assert out.returncode == 0, out.stderr[-3000:]
    [group] = list((tmp_path / "runs").iterdir())
    results = json.loads((group / "results.json").read_text())
    assert [(m["dataset"], m.get("kind"), m["n"]) for m in results["members"]] == [("csv-livefb", "csv", 4),
                                                                                  ("csv-mine", "csv", 5)]
    for label, n in (("csv-livefb", 4), ("csv-mine", 5)):
        assert json.loads((group / f"{label}.json").read_text())["metrics"]["n"] == n
        assert len((group / f"{label}.predictions.csv").read_text().splitlines()) == n + 1
    assert "csv-livefb" in out.stdout and "csv-mine" in out.stdout


def test_members_that_train_the_same_config_are_skipped_with_the_reason(tmp_path):
    """The demo preset has no dropout, drop path or ColorJitter: its ablation's "dropout-only",
    "drop_path-only" and "jitter-only" are "none" again, and "all" is "weight_decay-only". They
    are not trained (their difference would be 0 by construction); each says so in one line. An
    ablation left with one config is refused before a group is made; a grid value written twice
    is skipped the same way."""
    from iqa_dist.experiments.grid import equal_configs

    equal = equal_configs("demo", members("ablation", [], 0))
    assert {c: other for c, (other, _) in equal.items()} == {
        "dropout-only": "none", "drop_path-only": "none", "jitter-only": "none", "all": "weight_decay-only"}
    assert equal["dropout-only"][1] == "model.dropout=0.0 in both"
    assert equal_configs("koniq-swin-t", members("ablation", ["model.pretrained=none"], 0)) == {}

    out = here("sweep", "ablation", "--preset", "demo", "--baseline", "all", "--launcher", "true",
               f"--run.root={tmp_path / 'runs'}")
    lines = out.stderr.splitlines()
    assert ("sweep ablation: dropout-only skipped: it equals none (model.dropout=0.0 in both); give the preset's "
            "regularisers values (e.g. --model.dropout=0.3) or use a preset that has them") in lines, out.stderr
    assert "sweep ablation: the baseline is weight_decay-only, which --baseline all equals" in lines
    [group] = list((tmp_path / "runs").iterdir())
    info = json.loads((group / "sweep.json").read_text())
    assert info["configs"] == ["none", "weight_decay-only"] and info["baseline"] == "weight_decay-only"
    assert [json.loads(x)["name"] for x in (group / "members.jsonl").read_text().splitlines()] == ["none",
                                                                                                   "weight_decay-only"]

    out = here("sweep", "ablation", "--preset", "demo", "--optim.weight_decay=0", f"--run.root={tmp_path / 'none'}")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert ("dropout-only, drop_path-only, weight_decay-only, jitter-only, all would train the same config as none: "
            "nothing to compare") in out.stderr and not (tmp_path / "none").exists()
    equal = equal_configs("demo", members("grid", [], 0, ["optim.lr=1e-3,0.001,2e-3"]))
    assert equal == {"lr=0.001": ("lr=1e-3", "optim.lr=0.001 in both")}


# ---------------------------------------------------------------- tables that fit, plots that say what they show


def _cells(text: str) -> set[str]:
    """Every whitespace-separated word of a rich table's output, rules and box characters removed."""
    return {w for line in text.splitlines() for w in line.replace("│", " ").replace("┃", " ").split()}


@pytest.mark.parametrize("columns", ["60", "80", "", "200"], ids=["COLUMNS=60", "COLUMNS=80", "piped", "COLUMNS=200"])
def test_sweep_tables_fit_the_width_and_never_cut_a_number(tmp_path, monkeypatch, columns):
    """`report GROUP` (`sweep collect`'s tables) at 60 and 80 columns, piped (100 unless $COLUMNS
    says), wide: no line is longer than the width, every number and member name is whole (headers
    wrap between words), and where the columns cannot all fit, those left out are named, least
    important first, with how to see them (`--wide`: every column at its full width)."""
    group = _group(tmp_path)
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    else:
        monkeypatch.delenv("COLUMNS", raising=False)
    width = int(columns or 100)
    out = here("report", str(group))
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(map(len, table)) <= width, "\n".join(table)
    cells = _cells(out.stdout)
    results = json.loads((group / "results.json").read_text())
    for m in results["members"]:
        assert m["member"] in cells and f"{m['test_srcc']:.4f}" in cells, m
    for name, c in results["configs"].items():
        assert f"{c['vs_baseline']['median']:+.4f}" in cells if "vs_baseline" in c else "baseline" in cells, name
    left_out = [line for line in out.stdout.splitlines() if line.startswith("(left out to fit")]
    if width == 60:
        hint = f"; iqa-dist report {group} --wide or --markdown shows every column)"
        assert left_out == [f"(left out to fit 60 columns: best epoch, test SRCC selected on test (optimistic){hint}",
                            f"(left out to fit 60 columns: val SRCC median, mean ± std{hint}"], out.stdout
        assert "optimistic" not in out.stdout.split("(left out")[0]  # really left out
    else:
        assert not left_out, out.stdout
    wide = here("report", str(group), "--wide")
    assert "(left out" not in wide.stdout and "Wilcoxon" in wide.stdout and "optimistic" in wide.stdout


def test_a_table_fits_the_terminal_it_is_printed_on(tmp_path):
    """In a terminal the width is rich's own (the terminal's; 60 columns here): the same fitting."""
    import io

    from rich.console import Console

    from iqa_dist.experiments.collect import collect, show

    group = _group(tmp_path)
    table = collect(group, show_table=False)
    out = Console(file=io.StringIO(), width=60, force_terminal=True, color_system=None)
    show(table, group, out)
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines() if line[:1] in "┏┃┡│└") <= 60
    assert "(left out to fit 60 columns: best epoch" in text
    assert {f"{m['test_srcc']:.4f}" for m in table["members"]} <= _cells(text)


def test_fitted_table_keeps_words_whole_and_leaves_out_columns_in_order():
    import io

    from rich.console import Console

    from iqa_dist.output import fitted_table

    header, rows = ["run", "val SRCC", "train s"], [["20261206-042543-demo-lr", "0.3810", "2.5"]]
    table, dropped = fitted_table(header, rows, 36, drop=["train s", "val SRCC"])
    assert dropped == ["train s"]  # 23 + 6 + 5 + 10 of rules and padding > 36: the least important goes
    out = Console(file=io.StringIO(), width=36, color_system=None)
    out.print(table)
    assert max(map(len, out.file.getvalue().splitlines())) == 36
    assert "20261206-042543-demo-lr" in out.file.getvalue() and "0.3810" in out.file.getvalue()
    assert fitted_table(header, rows, 35, drop=["train s", "val SRCC"])[1] == ["train s", "val SRCC"]
    assert fitted_table(header, [], 80)[1] == []  # a group without members: its headers alone


def test_the_paired_plot_says_what_the_pairs_share(tmp_path, monkeypatch):
    """A --splits group's pairs share a split, a --seeds group's a training seed: the y-label says which."""
    from matplotlib.axes import Axes

    from iqa_dist.experiments.collect import collect
    from iqa_dist.experiments.report import plot_group

    labels = []
    set_ylabel = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, label, *a, **k: labels.append(label) or set_ylabel(
        self, label, *a, **k))
    for by in ("splits", "seeds"):
        (tmp_path / by).mkdir()
        group = _group(tmp_path / by)
        info = json.loads((group / "sweep.json").read_text())
        (group / "sweep.json").write_text(json.dumps({**info, "repeats": {"by": by, "n": 6}}))
        labels.clear()
        plot_group(collect(group, show_table=False), tmp_path / by / "plots")
        assert labels[-1].startswith("test SRCC minus lr=1e-3's"), labels
        assert labels[-1].endswith({"splits": "the same split", "seeds": "the same training seed (and the preset's "
                                    "split)"}[by]), labels
