"""Models in: the published HyperIQA weights (SSL92's and pyiqa's formats) imported as model
directories that score as the originals do, bad files refused in one line, and training started
from any model's weights (`train --init-from`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from iqa_dist.artifacts.card import ModelCard
from iqa_dist.config import load_config
from iqa_dist.data.protocol import patch_origins
from iqa_dist.models.weights import sha256
from iqa_dist.scoring.predict import load_model

from . import fixtures
from .conftest import RUN, TINY_SWIN, here, only_run, train_here
from .published import resnet50_weights, save_pyiqa, save_ssl92, ssl92_modules, ssl92_state
from .test_fidelity import original_hypernet


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """One set of random HyperNet weights saved in both formats and imported from each."""
    folder = tmp_path_factory.mktemp("published")
    state = ssl92_state(resnet50_weights())
    files = {"ssl92": save_ssl92(state, folder / "koniq_pretrained.pkl"),
             "pyiqa": save_pyiqa(state, folder / "HyperIQA-resnet50-koniq10k-c96c41b1.pth")}
    for name, file in files.items():
        out = here("import", str(file), "--out", str(folder / name))
        assert out.returncode == 0, out.stderr
        assert f"{name} weights from {file.name} (sha256 {sha256(file)})" in out.stdout
    return folder, state, files


@pytest.fixture(scope="module")
def ssl92(published):
    """The SSL92 import loaded, and the original network on the file's own tensors."""
    folder, state, _ = published
    return load_model(folder / "ssl92", "cpu"), ssl92_modules(state)


def test_an_ssl92_import_computes_the_original_forward_and_its_card_says_how_it_was_scored(published, ssl92):
    folder, _, files = published
    scorer, original = ssl92
    img = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(scorer.model(img), original_hypernet(original, img), rtol=1e-5, atol=1e-4)
    card = ModelCard.read(folder / "ssl92")
    assert card.weights["sha256"] == sha256(files["ssl92"]) and card.weights["name"] == "koniq_pretrained.pkl"
    koniq = card.datasets["koniq10k"]
    assert (koniq.score_range, koniq.resize, card.protocol, card.test_patch_num) == ([0.0, 100.0], "384x512!",
                                                                                      "random", 25)
    assert koniq.data["score_column"] == "MOS_zscore" and koniq.data["exif"] is False
    assert card.model_config().architecture() == load_config("koniq-resnet50").model.architecture()
    assert "did not publish which KonIQ-10k images" in card.unknown_training
    assert ModelCard.recorded_images(folder / "ssl92") == {}


def test_a_pyiqa_import_holds_the_same_weights_under_pyiqas_protocol(published):
    """The pyiqa file holds the SSL92 fixture's values under pyiqa's names, so its import equals
    the SSL92 import weight for weight (and so computes the original forward too)."""
    folder, _, files = published
    ssl92, pyiqa = load_file(folder / "ssl92" / "model.safetensors"), load_file(folder / "pyiqa" / "model.safetensors")
    assert ssl92.keys() == pyiqa.keys() and all(torch.equal(ssl92[k], pyiqa[k]) for k in ssl92)
    card = ModelCard.read(folder / "pyiqa")
    assert card.weights["format"] == "pyiqa" and card.weights["sha256"] == sha256(files["pyiqa"])
    assert (card.datasets["koniq10k"].score_range, card.datasets["koniq10k"].resize, card.protocol) == (
        [0.0, 1.0], "none", "grid")


def test_predict_scores_an_image_as_the_original_pipeline(ssl92, tmp_path):
    """SSL92's demo: every image resized to 384 wide x 512 high whatever its orientation (PIL
    bilinear, as torchvision's Resize((512, 384))), 224-px crops, ImageNet normalisation, the mean
    of the crops' outputs on 0-100. Two crops (the protocol's first two) keep it cheap."""
    scorer, network = ssl92
    path = tmp_path / "landscape.png"
    fixtures.image(path, (400, 300), seed=3)
    squashed = np.asarray(Image.open(path).convert("RGB").resize((384, 512), Image.BILINEAR))
    origins = patch_origins("random", squashed, 512, 384, 224, 2)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    crops = np.stack([(squashed[y:y + 224, x:x + 224] / 255.0 - mean) / std for y, x in origins])
    with torch.no_grad():
        original = original_hypernet(network, torch.from_numpy(crops).permute(0, 3, 1, 2).float().contiguous())
    scored = scorer.score(path, crops=2)
    assert float(scored[0]) == pytest.approx(float(original.mean()), rel=1e-4)


class Payload:
    """Unpickling this runs code (it creates a file): what torch.load(weights_only=True) must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_bad_file_is_one_line_and_writes_nothing(published, tmp_path):
    folder, state, files = published

    def refused(file, *extra) -> str:
        out = here("import", str(file), "--out", str(tmp_path / "out"), *extra)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (tmp_path / "out" / "model.safetensors").exists()
        return " ".join(out.stderr.split())

    cut = tmp_path / "cut.pkl"
    cut.write_bytes(files["ssl92"].read_bytes()[:1 << 20])  # a download cut short
    assert "cannot be read as a torch weights file" in refused(cut)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"params": Payload(marker)}, evil)
    assert "refused: unpickling it would run code" in refused(evil) and not marker.exists()
    import torchvision

    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)  # another model's weights
    assert "not a HyperIQA weights file of a known format: its keys (conv1.weight, bn1.weight" in refused(other)
    wider = dict(state)
    wider["fc1w_conv.weight"] = torch.zeros(256, 112, 3, 3)  # HyperNet(16, 112, 224, 56, ...): another network
    bigger = tmp_path / "wider.pkl"
    torch.save(wider, bigger)
    assert "fc1w_conv.weight is 256x112x3x3, where ssl92's HyperNet(16, 112, 224, 112, 56, 28, 14, 7) has " \
           "512x112x3x3" in refused(bigger)
    assert "not the pyiqa HyperIQA format" in refused(files["ssl92"], "--format", "pyiqa")


@pytest.fixture(scope="module")
def fine_tuned(single_run, tiny_overrides, tmp_path_factory):
    """A run started from a copy of single_run's model whose card says its training images are
    unknown (as an imported model's does), with the demo preset's architecture left to the start."""
    root = tmp_path_factory.mktemp("init")
    start = root / "start"
    shutil.copytree(single_run / "model", start)
    card = json.loads((start / "config.json").read_text())
    card["unknown_training"] = "imported from test.pkl"
    (start / "config.json").write_text(json.dumps(card))
    recipe = [o for o in tiny_overrides if o not in TINY_SWIN[1:]]  # the architecture: the start's
    out = train_here([*recipe, *RUN, "train.max_steps=2", "train.eval_every=2", f"run.root={root / 'runs'}",
                      f"model.init_from={start}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return start, only_run(root / "runs"), recipe


def test_init_from_starts_from_the_models_weights_and_records_it(fine_tuned, single_run):
    start, run, _ = fine_tuned
    cfg = yaml_model(run)
    assert cfg["img_size"] == 64 and cfg["hyper_hidden"] == [64, 32] and cfg["pretrained"] == "none"
    before, after = load_file(start / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    # two Adam steps at the warmup's lr (demo: 5e-4 x step/100) move a weight by ~1e-5; a fresh init is ~0.1 away
    assert 0 < moved < 1e-3
    card = ModelCard.read(run / "model")
    assert card.weights["source"] == "model" and card.weights["sha256"] == sha256(start / "model.safetensors")
    assert "whose training images are unknown (imported from test.pkl)" in card.unknown_training
    own, inherited = ModelCard.recorded_images(run / "model"), ModelCard.recorded_images(single_run / "model")
    assert set(inherited["synthetic"]["names"]) <= set(own["synthetic"]["names"])


def yaml_model(run) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]


def test_evaluate_says_overlap_cannot_be_checked(fine_tuned, cache_root):
    _, run, _ = fine_tuned
    out = here("evaluate", "--run", str(run), "--dataset", "synthetic", f"--data.cache_dir={cache_root}")
    assert out.returncode == 0, out.stderr
    assert "OVERLAP WITH ITS TRAINING IMAGES CANNOT BE CHECKED" in " ".join(out.stdout.split())
    report = json.loads((run / "eval-synthetic-test.json").read_text())
    assert report["train_overlap"]["checkable"] is False and "imported from test.pkl" in report["train_overlap"]["unknown"]


def test_init_from_refuses_another_architecture_in_one_line(fine_tuned, tmp_path):
    start, _, recipe = fine_tuned
    out = here("train", "--preset", "demo", *[f"--{o}" for o in recipe], "--init-from", str(start),
               "--model.img_size=96", f"--run.root={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--model.img_size=96 asks for another architecture than the start model's (img_size=64)" in \
           " ".join(out.stderr.split())
    missing = here("train", "--preset", "demo", "--init-from", str(tmp_path / "nothing"), f"--run.root={tmp_path}")
    assert missing.returncode == 2 and "model.init_from=" in missing.stderr and "Traceback" not in missing.stderr
    assert not list(tmp_path.iterdir())
