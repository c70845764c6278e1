"""Ensembles: several trained models scored as one (`evaluate --run A --run B`, `load_model([A, B])`):
each image's prediction is the mean of the members' on one scale, each member's metrics beside the
ensemble's, and every member's training images checked against the images scored."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import iqa_dist
from iqa_dist.errors import UserError
from iqa_dist.scoring.evaluate import evaluate_model
from iqa_dist.scoring.metrics import correlation_metrics

from . import fixtures
from .conftest import RUN, cli, only_run, train_here


@pytest.fixture(scope="module")
def second_run(tiny_overrides, tmp_path_factory):
    """A second tiny model on the same split as `single_run` (another training seed)."""
    root = tmp_path_factory.mktemp("runs-seed1")
    out = train_here([*tiny_overrides, *RUN, "train.seed=1", f"run.root={root}"])
    assert out.returncode == 0, out.stderr[-2000:]
    return only_run(root)


def test_an_ensemble_scores_the_mean_of_its_members_with_each_members_metrics(single_run, second_run, cache_root,
                                                                                tmp_path):
    cache = [f"data.cache_dir={cache_root}"]
    alone = [evaluate_model(run, "synthetic", "test", cache) for run in (single_run, second_run)]
    both = evaluate_model([single_run, second_run], "synthetic", "test", cache)
    assert both["per_image"]["names"] == alone[0]["per_image"]["names"] == alone[1]["per_image"]["names"]
    for member, one in zip(both["members"], alone):  # each member as it scores alone
        assert member["metrics"] == one["metrics"]
    assert both["per_image"]["members"] == [one["per_image"]["preds"] for one in alone]
    mean = np.mean([one["per_image"]["preds"] for one in alone], axis=0)
    np.testing.assert_allclose(both["per_image"]["preds"], mean, rtol=0, atol=1e-12)
    expected = correlation_metrics(mean, np.array(alone[0]["per_image"]["targets"]))
    assert both["metrics"] == pytest.approx(expected)
    assert both["train_overlap"]["images"] == 0 and both["train_overlap"]["checkable"]

    out = tmp_path / "ens.json"  # --weights first, then --run: members in the order given
    code, stdout, err = cli("evaluate", "--weights", str(second_run / "model"), "--run", str(single_run), "--dataset",
                            "synthetic", f"--data.cache_dir={cache_root}", "--output", str(out))
    assert code == 0, err
    assert "an ensemble of 2 models" in stdout and "ensemble (mean)" in stdout and "2: " in stdout, stdout
    report = json.loads(out.read_text())
    assert [m["model"] for m in report["members"]] == [str(second_run / "model"), str(single_run / "model")]
    assert report["metrics"] == pytest.approx(both["metrics"])
    rows = out.with_suffix(".predictions.csv").read_text().splitlines()
    assert rows[0] == "image,score,prediction" and len(rows) == 1 + len(mean)
    assert float(rows[1].split(",")[-1]) == pytest.approx(mean[0], abs=1e-4)


def test_every_members_training_images_are_checked(single_run, tiny_overrides, cache_root, tmp_path):
    """A member trained on another split of the dataset (a `sweep splits` member) trained on images
    of the first member's test split: the ensemble is refused naming that member, or scored with
    --allow-train-overlap and the count recorded under it."""
    root = tmp_path / "other-split"
    out = train_here([*tiny_overrides, *RUN, "data.split_seed=1", f"run.root={root}"])
    assert out.returncode == 0, out.stderr[-2000:]
    other = only_run(root)
    args = ["evaluate", "--run", str(single_run), "--run", str(other), "--dataset", "synthetic",
            f"--data.cache_dir={cache_root}", "--output", str(tmp_path / "ens.json")]
    code, _, err = cli(*args)
    assert code == 2 and "Traceback" not in err, err
    assert f"{other / 'model'}: " in err and "images this model trained on" in err, err
    code, stdout, err = cli(*args, "--allow-train-overlap")
    assert code == 0, err
    report = json.loads((tmp_path / "ens.json").read_text())
    first, second = (m["train_overlap"] for m in report["members"])
    assert first["images"] == 0 and second["images"] > 0 and report["train_overlap"]["images"] == second["images"]
    assert "TRAINING IMAGES" in stdout


def test_load_model_of_several_models_scores_their_mean(single_run, second_run, tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for i, f in enumerate(files):
        fixtures.image(f, (180, 140), seed=i)
    one, two = iqa_dist.load_model(single_run), iqa_dist.load_model(second_run)
    ensemble = iqa_dist.load_model([single_run, second_run])
    scores = ensemble.score([str(f) for f in files])
    np.testing.assert_allclose(scores, (one.score([str(f) for f in files]) + two.score([str(f) for f in files])) / 2,
                               rtol=1e-12)
    assert ensemble.member_scores(str(files[0])).shape == (2, 1) and ensemble.units == one.units
    assert type(iqa_dist.load_model([single_run])) is type(one)  # a list of one: that model


def test_members_on_different_scales_are_refused_in_one_line(single_run, second_run, tmp_path):
    """Predictions on two datasets' scales cannot be averaged: refused before any image is read,
    saying what to give."""
    other = tmp_path / "csv-model"
    shutil.copytree(second_run / "model", other)
    config = json.loads((other / "config.json").read_text())
    config["datasets"] = {"csv": config["datasets"]["synthetic"]}  # as a model trained on a CSV dataset
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"different scales \(csv, synthetic\): give"):
        iqa_dist.load_model([single_run, other])
    code, _, err = cli("evaluate", "--run", str(single_run), "--weights", str(other), "--dataset", "csv",
                       "--root", str(tmp_path), "--split", "all")
    assert code == 2 and "different scales (csv, synthetic)" in err and "Traceback" not in err, err
    config["datasets"] = {"synthetic": {**config["datasets"]["csv"], "score_range": [0.0, 1.0]}}  # one name, 0-1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"span different ranges .*0-1\): other scores under one name"):
        iqa_dist.load_model([single_run, other])
    config["datasets"]["synthetic"]["score_range"] = [0.0, 100.0]
    config["datasets"]["synthetic"]["data"]["resize"] = "short:96"  # trained on other image sizes
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = cli("evaluate", "--run", str(single_run), "--weights", str(other), "--dataset", "synthetic")
    assert code == 2 and "its models resize images differently" in err and "short:96" in err, err


def test_predict_with_an_ensemble_writes_the_members_mean(single_run, second_run, tmp_path):
    folder = tmp_path / "imgs"
    for i in range(3):
        fixtures.image(folder / f"{i}.png", (180, 140), seed=i)
    fixtures.image(folder / "tiny.png", (20, 20), seed=9)  # too small for a patch: a row with its reason
    out = tmp_path / "scores.csv"
    code, _, err = cli("predict", str(single_run), str(folder), "--ensemble", str(second_run), "--format", "csv",
                       "--output", str(out))
    assert code == 1 and "tiny.png" in err, err  # the one file that cannot be scored makes the status 1
    rows = {r.split(",")[0]: r.split(",")[1] for r in out.read_text().splitlines()[1:]}
    files = [str(folder / f"{i}.png") for i in range(3)]
    expected = iqa_dist.load_model([single_run, second_run]).score(files)
    assert [float(rows[f]) for f in files] == pytest.approx(expected, abs=1e-4)
    assert rows[str(folder / "tiny.png")] == ""
    code, _, err = cli("predict", str(single_run), str(folder), "--ensemble", str(second_run), "--map",
                       str(tmp_path / "maps"))
    assert code == 2 and "--map draws one model's patch scores" in err and "Traceback" not in err, err


def test_a_sweep_group_is_the_ensemble_of_its_finished_members(single_run, second_run, cache_root, tmp_path):
    """A sweep group's folder (members.jsonl and each member's DATE-TIME-NAME run, as `sweep`
    writes them) is the ensemble of its members' finished runs; a member without one is refused,
    named."""
    group = tmp_path / "20261206-000000-sweep-grid"
    group.mkdir()
    for name, run in (("seed=0", single_run), ("seed=1", second_run)):
        shutil.copytree(run, group / f"20261206-000001-{name}")
    (group / "members.jsonl").write_text("".join(json.dumps({"name": n, "config": n, "repeat": 0, "args": []}) + "\n"
                                                 for n in ("seed=0", "seed=1")))
    cache = [f"data.cache_dir={cache_root}"]
    both = evaluate_model([single_run, second_run], "synthetic", "test", cache)
    assert evaluate_model(group, "synthetic", "test", cache)["metrics"] == both["metrics"]
    image = tmp_path / "a.png"
    fixtures.image(image, (180, 140), seed=3)
    assert iqa_dist.load_model(group).score(str(image)) == pytest.approx(
        iqa_dist.load_model([single_run, second_run]).score(str(image)), rel=1e-12)

    shutil.copytree(second_run, group / "20261206-000002-seed=2")
    (group / "20261206-000002-seed=2" / "summary.json").unlink()  # a member that did not finish
    with open(group / "members.jsonl", "a") as f:
        f.write(json.dumps({"name": "seed=2", "config": "seed=2", "repeat": 0, "args": []}) + "\n")
    code, _, err = cli("evaluate", "--run", str(group), "--dataset", "synthetic", f"--data.cache_dir={cache_root}")
    assert code == 2 and "member seed=2 has no finished run" in err and "Traceback" not in err, err
