"""Models out: a run as a Hugging Face Hub repo folder (loaded back by repo id from a hub cache
laid out as huggingface_hub lays it out, offline), and as an ONNX file that onnxruntime scores as
torch does, with the README's numpy + PIL + onnxruntime snippet giving predict's score."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from iqa_dist.artifacts.card import ModelCard, TrainedOn
from iqa_dist.config import DataConfig, ModelConfig
from iqa_dist.data.targets import Scale
from iqa_dist.errors import UserError
from iqa_dist.models.hyperiqa import build_model
from iqa_dist.scoring.predict import load_model

from . import fixtures
from .conftest import cli, here

README = Path(__file__).resolve().parent.parent / "README.md"
REV = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def hub_folder(single_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny-iqa"
    out = here("export", str(single_run), "--hub", str(folder))
    assert out.returncode == 0, out.stderr
    return folder


def test_the_hub_folder_is_a_model_repo_with_a_model_card(hub_folder, single_run):
    from huggingface_hub import ModelCard as HubCard

    assert sorted(p.name for p in hub_folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                            "train_images.json"]
    card = HubCard.load(hub_folder / "README.md")
    data = card.data
    assert data.library_name == "iqa-dist" and "image-quality-assessment" in data.tags
    assert data.datasets == ["synthetic"] and "license" not in data.to_dict()  # the owner's choice
    assert data.base_model is None  # trained from random weights (model.pretrained=none)
    summary = json.loads((single_run / "summary.json").read_text())
    figures = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert figures[("synthetic", "test", "spearmanr")] == round(summary["test"]["srcc"], 4)
    assert figures[("synthetic", "test", "pearsonr")] == round(summary["test"]["plcc"], 4)
    assert {metric for *_, metric in figures} == {"spearmanr", "pearsonr"}  # (evaluate's reports may add splits)
    assert "iqa-dist predict ORG/tiny-iqa photos/" in card.text and "Licence: not set" in card.text


@pytest.fixture()
def hub_cache(hub_folder, tmp_path, monkeypatch):
    """The folder as huggingface_hub caches a downloaded repo: models--org--name/{refs/main,
    snapshots/<commit>/...}; the client offline (HF_HUB_OFFLINE=1) and pointed at it."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--test-org--tiny-iqa"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    shutil.copytree(hub_folder, repo / "snapshots" / REV)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_repo_id_scores_as_its_run_offline(hub_cache, single_run, tmp_path, monkeypatch, cache_root):
    image = tmp_path / "a.png"
    fixtures.image(image, (160, 120), seed=2)
    want = load_model(single_run, "cpu").score(image)
    assert load_model("test-org/tiny-iqa", "cpu").score(image) == pytest.approx(want, abs=1e-6)
    assert load_model(f"test-org/tiny-iqa@{REV}", "cpu").score(image) == pytest.approx(want, abs=1e-6)
    code, out, err = cli("predict", "test-org/tiny-iqa", str(image), "--format", "csv")
    assert code == 0, err
    assert float(out.splitlines()[1].split(",")[1]) == pytest.approx(float(want[0]), abs=1e-4)
    monkeypatch.chdir(tmp_path)  # evaluate's report goes to the current folder, not into the hub cache
    code, _, err = cli("evaluate", "--weights", "test-org/tiny-iqa", "--dataset", "synthetic",
                       f"--data.cache_dir={cache_root}")
    assert code == 0, err
    assert json.loads((tmp_path / "eval-test-org--tiny-iqa-synthetic-test.json").read_text())["metrics"]["n"] > 10
    code, _, err = cli("export", "test-org/tiny-iqa", "--push", "test-org/tiny-iqa")
    assert code == 2 and "give --hub DIR too" in err  # (the upload itself needs the Hub: not tested here)
    code, _, err = cli("predict", "test-org/not-there", str(image))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not a Hugging Face repo in the hub cache" in err and "HF_HUB_OFFLINE is set" in err


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def scale_model(tmp_path_factory):
    """A small random ConvNeXt HyperIQA whose scores are on a 10-90 scale (the graph bakes the
    score map in), and its ONNX export."""
    folder = tmp_path_factory.mktemp("onnx") / "model"
    folder.mkdir()
    cfg = ModelConfig(backbone="convnext_atto", pretrained="none", img_size=64, hyper_hidden=[64], hyper_in=56,
                      target_in=112, target_hidden=[56, 28, 14, 7], dropout=0.0, drop_path=0.0,
                      backbone_kwargs={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]})
    torch.manual_seed(0)
    model = build_model(cfg)
    save_file(model.state_dict(), folder / "model.safetensors")
    data = DataConfig(dataset="synthetic", resize="96x80", test_patch_num=3)
    ModelCard(model=asdict(cfg), datasets={"synthetic": TrainedOn(asdict(data), [10.0, 90.0], "96x80",
                                                                   Scale("range", 10.0, 80.0))},
              test_patch_num=3, mean=list(model.mean), std=list(model.std)).write(folder, {})
    onnx = folder.parent / "model.onnx"
    out = here("export", str(folder), "--onnx", str(onnx))
    assert out.returncode == 0, out.stderr
    assert "onnxruntime's scores of 3 patches equal torch's" in out.stdout
    return folder, onnx


def test_onnxruntime_scores_patches_and_images_as_torch(scale_model, tmp_path, monkeypatch):
    from iqa_dist.scoring.onnx import Deployed, OnnxForward

    folder, onnx = scale_model
    scorer = load_model(folder, "cpu")
    patches = torch.randn(5, 3, 64, 64)  # another batch size than the export's and the check's
    with torch.no_grad():
        torch.testing.assert_close(OnnxForward(onnx)(patches), Deployed(scorer)(patches), rtol=1e-4, atol=1e-3)
    snippet = re.search(r"<!-- onnx-snippet -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(onnx, "model.onnx")
    fixtures.image(tmp_path / "photo.jpg", (90, 120), seed=4)  # portrait: the 96x80 resize turns with it
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["score"] == pytest.approx(float(scorer.score(tmp_path / "photo.jpg")[0]), rel=1e-4)


def test_a_graph_that_scores_otherwise_is_refused(scale_model):
    from iqa_dist.scoring.onnx import Deployed, check

    folder, onnx = scale_model
    deployed = Deployed(load_model(folder, "cpu"))
    with torch.no_grad():
        deployed.model.hyper.bias_fcs[-1].bias += 0.01  # torch's model is now another one
    with pytest.raises(UserError, match=r"onnxruntime's scores of the same 3 patches differ from torch's by .* "
                                        r"the graph computes something else; not written"):
        check(onnx, deployed, 64)


def test_bench_predict_measures_torch_and_onnxruntime_on_the_same_patches(scale_model, tmp_path):
    """The figures `iqa-dist bench predict` prints side by side: positive and finite (never a speed
    threshold)."""
    import math

    from iqa_dist.bench.scoring import onnx_rates
    from iqa_dist.data.store import EvalSet, ImageStore

    folder, onnx = scale_model
    scorer = load_model(folder, "cpu")
    fixtures.image(tmp_path / "a.png", (120, 90), seed=6)
    images = EvalSet.of(ImageStore.of_images([scorer.prepare(tmp_path / "a.png")]), "random", 3, 64)
    found = onnx_rates(folder, onnx, [images], repeats=1)
    assert all(math.isfinite(found[k]) and found[k] > 0 for k in ("torch_cpu", "onnxruntime_cpu", "speedup"))

