"""Joint training on several datasets and the weight EMA: the batch plan, per-dataset scales,
per-dataset metrics, scores on the scale the user names, an EMA that is exact and resumable."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from iqa_dist.artifacts.card import ModelCard
from iqa_dist.config import DataConfig, load_config
from iqa_dist.data.plan import JointPlan
from iqa_dist.data.targets import Scale
from iqa_dist.distributed.shards import Shares
from iqa_dist.errors import UserError
from iqa_dist.training.optim import WeightEMA

from . import fixtures
from .conftest import RUN, cli, metrics, only_run, train_here

# ---------------------------------------------------------------- the batch plan


def test_joint_plan_mixes_in_proportion_and_depends_only_on_the_step():
    plan = JointPlan(sizes=[40, 30], weights=[3, 1], patch_num=4, batch_size=16, seed=0)
    steps = plan.steps_per_epoch
    assert steps == (40 + 30) * 4 // 16
    rows = torch.cat([plan.batch(s)[0] for s in range(steps)])
    share = float((rows < 40).float().mean())  # the joined store: dataset 0's 40 rows, then dataset 1's
    assert share == pytest.approx(0.75, abs=0.01)  # within 1% of the weights' 3:1 over an epoch
    for s in range(steps):
        assert len(plan.batch(s)[0]) == 16
    # a fresh plan (a resumed run, another world size) gives the same batches at any step
    again = JointPlan(sizes=[40, 30], weights=[3, 1], patch_num=4, batch_size=16, seed=0)
    for s in (0, 5, 17, steps + 3):
        assert torch.equal(again.batch(s)[0], plan.batch(s)[0])
    # each process's chunks of it, for 1 and 2 processes, cover the same global batch exactly once
    rows0 = plan.batch(7)[0]
    for world in (1, 2):
        parts = [rows0[sl] for r in range(world) for sl in Shares.split(16, 0, world, r).slices()]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.sort(rows0).values)
    # every image of dataset 1 appears patch_num times per pass over it
    ones = rows[rows >= 40] - 40
    assert np.bincount(ones.numpy(), minlength=30).max() <= 4 * math.ceil(len(ones) / 120)


def test_scale_is_fitted_on_the_training_split_only():
    train = np.array([20.0, 40.0, 60.0, 80.0])
    z = Scale.fit("zscore", train)
    assert (z.shift, z.scale) == pytest.approx((50.0, float(train.std())))
    r = Scale.fit("range", train)
    assert r.to_target(80.0) == pytest.approx(1.0) and r.to_score(0.0) == pytest.approx(20.0)
    assert Scale.fit("none", train).to_target(55.0) == 55.0


def test_joint_config_errors_name_the_fix():
    with pytest.raises(UserError, match="needs a common target scale"):
        load_config("demo", ["data.datasets=[{name: synthetic}, {name: kadid10k}]", "data.score_norm=none"])
    with pytest.raises(UserError, match="data.roots.NAME=DIR"):
        load_config("demo", ["data.datasets=[{name: synthetic}, {name: kadid10k}]", "data.score_norm=zscore",
                             "data.root=/x"])
    with pytest.raises(UserError, match="unknown key.*colour"):
        load_config("demo", ["data.datasets=[{name: synthetic, colour: 1}]", "data.score_norm=zscore"])
    with pytest.raises(UserError, match="select_on='livec'"):
        load_config("demo", ["data.datasets=[{name: synthetic}, {name: kadid10k}]", "data.score_norm=zscore",
                             "train.select_on=livec"])
    joint = load_config("koniq-spaq-swin-t", ["data.roots.spaq=/s"])
    assert [(m.dataset, m.root, m.resize) for m in joint.data.members()] == [
        ("koniq10k", "", "512x384"), ("spaq", "/s", "short:512")]


# ---------------------------------------------------------------- the EMA


def test_ema_after_k_steps_is_the_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    history = []
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.update(torch.zeros(()))  # the guard's flag of an applied step
    d = 0.9  # ema_k = d^k w_0 + (1 - d) sum_i d^(k - i) w_i
    expected = d ** 5 * start + sum((1 - d) * d ** (5 - i) * w for i, w in enumerate(history, 1))
    torch.testing.assert_close(ema.model.weight, expected)
    restored = WeightEMA(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.model.weight, ema.model.weight)


# ---------------------------------------------------------------- a joint run end to end


@pytest.fixture(scope="module")
def joint_run(tiny_overrides, tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    fixtures.kadid(root / "kadid", refs=6, per_ref=4)
    out = train_here([*tiny_overrides, *RUN, "train.max_steps=6", "train.eval_every=3",
                      "data.datasets=[{name: synthetic, weight: 3}, {name: kadid10k, weight: 1}]",
                      f"data.roots.kadid10k={root / 'kadid'}", "data.score_norm=zscore", "optim.rank_weight=0.3",
                      "train.ema_decay=0.5", f"run.root={root / 'runs'}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "joint training: synthetic 75% of each batch" in out.stdout
    return only_run(root / "runs"), root


def test_joint_run_reports_every_dataset(joint_run):
    run, _ = joint_run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["datasets"]) == {"synthetic", "kadid10k"}
    for m in summary["datasets"].values():
        assert m["test"]["n"] > 0 and math.isfinite(m["test"]["srcc"]) and m["val"]["n"] > 0
    assert summary["test"]["n"] == sum(m["test"]["n"] for m in summary["datasets"].values())
    lines = metrics(run)
    assert all(f"val_{d}_srcc" in r and "ema_val_srcc" in r for r in lines for d in ("synthetic", "kadid10k"))
    weighted = 0.75 * lines[-1]["val_synthetic_srcc"] + 0.25 * lines[-1]["val_kadid10k_srcc"]
    assert lines[-1]["val_srcc"] == pytest.approx(weighted)  # selection on the weighted mean


def test_joint_card_scales_come_from_each_training_split(joint_run):
    from iqa_dist.data.cache import prepare

    run, root = joint_run
    card = ModelCard.read(run / "model")
    assert list(card.datasets) == ["synthetic", "kadid10k"]
    for name in card.datasets:
        view = prepare(dataclasses.replace(load_config("demo", [f"model.img_size={card.size}"]),
                                           data=DataConfig(**card.datasets[name].data)))
        train = view.scores()[view.ids("train")]
        assert card.datasets[name].scale.shift == pytest.approx(float(train.mean()))
        assert card.datasets[name].scale.scale == pytest.approx(float(train.std()))
        if name == "synthetic":  # its val and test contents score differently: fitting on them would show
            assert float(view.scores().mean()) != pytest.approx(float(train.mean()), abs=1e-3)


def test_ema_export_is_the_better_of_the_two(joint_run):
    run, _ = joint_run
    lines = metrics(run)
    summary = json.loads((run / "summary.json").read_text())
    best = next(r for r in lines if r["step"] == summary["best_step"])
    better = "ema" if best["ema_val_srcc"] > best["val_srcc"] else "raw"
    assert best["val_from"] == better and summary["weights_from"] == better
    card = json.loads((run / "model" / "config.json").read_text())
    assert card["averaged"] == better
    assert summary["val"]["srcc"] == pytest.approx(max(best["ema_val_srcc"], best["val_srcc"]))


def test_joint_summaries_and_report_are_the_exported_weights(joint_run, tmp_path):
    """Joint + EMA: summary.json's per-dataset val figures are the exported weights' (the EMA's when
    it was exported), metrics.jsonl has the EMA's per dataset, `evaluate --split val` on the
    exported model gives those figures, and `report` shows each dataset but no KonIQ reference."""
    run, _ = joint_run
    summary = json.loads((run / "summary.json").read_text())
    best = next(r for r in metrics(run) if r["step"] == summary["best_step"])
    prefix = "ema_val_" if summary["weights_from"] == "ema" else "val_"
    for name in ("synthetic", "kadid10k"):
        assert all(f"ema_val_{name}_{k}" in best for k in ("srcc", "plcc", "krcc", "rmse", "n"))
        assert summary["datasets"][name]["val"]["srcc"] == best[f"{prefix}{name}_srcc"]
        out = tmp_path / f"{name}.json"
        code, _, err = cli("evaluate", "--run", str(run), "--dataset", name, "--split", "val", "--output", str(out))
        assert code == 0, err
        report = json.loads(out.read_text())
        assert report["metrics"]["srcc"] == pytest.approx(summary["datasets"][name]["val"]["srcc"], abs=1e-6)
    code, out, err = cli("report", str(run), "--markdown")
    assert code == 0, err
    assert "|   synthetic | " in out and "|   kadid10k | " in out and "Phase one" not in out


def test_a_joint_model_scores_on_the_scale_asked(joint_run, tmp_path):
    run, root = joint_run
    image = root / "kadid" / "images" / "I01_01_01.png"
    code, _, err = cli("predict", str(run), str(image))
    assert code == 2 and "--scale" in err and "normalized" in err
    scores = {}
    for scale in ("kadid10k", "synthetic", "normalized"):
        code, out, err = cli("predict", str(run), str(image), "--scale", scale, "--format", "jsonl")
        assert code == 0, err
        scores[scale] = json.loads(out)["score"]
    card = ModelCard.read(run / "model")
    for name in ("kadid10k", "synthetic"):  # printed to 4 decimals: the normalized one's rounding, scaled
        scale = card.datasets[name].scale
        assert scores[name] == pytest.approx(scale.to_score(scores["normalized"]), abs=1e-4 + 5e-5 * scale.scale)
    code, _, err = cli("evaluate", "--run", str(run), "--dataset", "kadid10k", "--output", str(tmp_path / "k.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["scale"] == "kadid10k" and report["metrics"]["n"] > 0  # its own test split, on its own scale


def test_scales_get_their_own_files_and_resizing_follows_the_images(joint_run, tmp_path):
    """`evaluate --scale normalized` writes its own file beside the dataset-scale one; on the
    normalized scale the resize policy is the images' (--resize-as), so the scores stay an affine
    map of that dataset's scale; a model whose datasets resize differently needs the choice."""
    run, root = joint_run
    for scale in ("kadid10k", "normalized"):
        code, _, err = cli("evaluate", "--run", str(run), "--dataset", "kadid10k", "--scale", scale)
        assert code == 0, err
    own = json.loads((run / "eval-kadid10k-test.json").read_text())
    normalized = json.loads((run / "eval-kadid10k-test-normalized.json").read_text())
    assert own["scale"] == "kadid10k" and normalized["scale"] == "normalized"
    image = root / "kadid" / "images" / "I01_01_01.png"
    scores = {}
    for scale in ("kadid10k", "normalized"):
        code, out, err = cli("predict", str(run), str(image), "--scale", scale, "--resize-as", "kadid10k",
                             "--format", "jsonl")
        assert code == 0, err
        scores[scale] = json.loads(out)["score"]
    card = ModelCard.read(run / "model")
    scale = card.datasets["kadid10k"].scale
    assert scores["kadid10k"] == pytest.approx(scale.to_score(scores["normalized"]), abs=1e-4 + 5e-5 * scale.scale)
    mixed = dataclasses.replace(card, datasets={**card.datasets, "kadid10k": dataclasses.replace(
        card.datasets["kadid10k"], resize="512x384")})
    with pytest.raises(UserError, match="resized differently"):
        mixed.image_policy("normalized")
    assert mixed.image_policy("normalized", like="kadid10k")[0] == "512x384"
    assert mixed.image_policy("synthetic")[0] == card.datasets["synthetic"].resize


def test_ema_resumes_bit_exact(tiny_overrides, tmp_path):
    """A run checkpointed at step 3 and resumed to 6 equals one that ran 6 steps, EMA included."""
    common = [f"--{o}" for o in [*tiny_overrides, "train.eval_every=3", "train.checkpoint_every=3",
                                 "train.ema_decay=0.5", "optim.schedule=constant", "optim.warmup_steps=0"]]
    assert cli("train", "--preset", "demo", *common, "--train.max_steps=6", f"--run.root={tmp_path / 'a'}")[0] == 0
    assert cli("train", "--preset", "demo", *common, "--train.max_steps=3", f"--run.root={tmp_path / 'b'}")[0] == 0
    run_b = only_run(tmp_path / "b")
    code, _, err = cli("train", "--preset", "demo", *common, "--train.max_steps=6", f"--run.root={tmp_path / 'b'}",
                       "--resume", str(run_b), "--extend")
    assert code == 0, err
    a, b = metrics(only_run(tmp_path / "a")), metrics(run_b)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    assert b[-1]["ema_val_srcc"] == a[-1]["ema_val_srcc"] and b[-1]["val_srcc"] == a[-1]["val_srcc"]

    def ema(run):  # the registered objects are state (0), augmenter (1), EMA (2)
        return torch.load(run / "checkpoints" / "step-00000006" / "custom_checkpoint_2.pkl", weights_only=False)

    ours, theirs = ema(run_b), ema(only_run(tmp_path / "a"))
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
