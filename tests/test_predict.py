"""Trained models in use: load_model, evaluate, predict with TTA, report tables and plots."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import iqa_dist
import numpy as np
import pytest
import torch
from PIL import Image

from iqa_dist.artifacts.card import ModelCard
from iqa_dist.data.augment import normalize
from iqa_dist.data.protocol import grid_origins, patch_origins
from iqa_dist.errors import UserError
from iqa_dist.scoring.evaluate import write_predictions

from . import fixtures
from .conftest import RUN, cli, here, train_here


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        fixtures.image(folder / f"a{i}.png", (200, 150), seed=i)
    fixtures.image(folder / "sub" / "b.jpg", (150, 220), seed=7)  # portrait, in a subfolder
    return folder


def test_evaluate_reproduces_the_training_test_metrics(single_run, tiny_overrides):
    """load_model round trip: the exported model on the cached test patches gives the metrics
    the training process reported for its selected model."""
    out = here("evaluate", "--run", str(single_run), "--dataset", "synthetic",
               *[f"--{o}" for o in tiny_overrides if o.startswith("data.cache_dir")])
    assert out.returncode == 0, out.stderr
    report = json.loads((single_run / "eval-synthetic-test.json").read_text())
    summary = json.loads((single_run / "summary.json").read_text())
    for key in ("srcc", "plcc", "krcc", "rmse", "n"):
        assert report["metrics"][key] == pytest.approx(summary["test"][key], abs=1e-5), key
    lines = (single_run / "eval-synthetic-test.predictions.csv").read_text().splitlines()
    assert lines[0] == "image,score,prediction" and len(lines) == summary["test"]["n"] + 1


def test_one_evaluation_precision_for_a_bf16_run(tiny_overrides, cache_root, tmp_path):
    """A bf16-trained run scores its val and test splits in the precision its model card records
    (fp32), as `evaluate` and `predict` do: the same test metrics to 1e-6, the same per-image
    predictions to 1e-4 of the score range (0-100)."""
    out = train_here([*tiny_overrides, *RUN, "train.mixed_precision=bf16", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    card = json.loads((run / "model" / "config.json").read_text())
    assert card["eval_precision"] == "fp32"
    summary = json.loads((run / "summary.json").read_text())
    from iqa_dist.scoring.evaluate import evaluate_model

    report = evaluate_model(run, "synthetic", "test", [f"data.cache_dir={cache_root}"])
    for key in ("srcc", "plcc", "krcc", "rmse"):
        assert report["metrics"][key] == pytest.approx(summary["test"][key], abs=1e-6), key
    root = next(p for p in cache_root.glob("synthetic-src-*") if p.is_dir())
    predicted = iqa_dist.load_model(run, "cpu").score([root / name for name in report["per_image"]["names"]])
    assert predicted == pytest.approx(report["per_image"]["preds"], abs=1e-4 * 100)


def test_prediction_csv_quotes_names_with_commas(tmp_path):
    write_predictions(tmp_path / "p.csv", ["a,b.png", 'say "hi".jpg'], np.array([1.0, 2.0]), np.array([1.5, 2.5]))
    with open(tmp_path / "p.csv", newline="") as f:
        assert list(csv.reader(f)) == [["image", "score", "prediction"], ["a,b.png", "1.0000", "1.5000"],
                                       ['say "hi".jpg', "2.0000", "2.5000"]]


def test_cross_dataset_evaluation_on_all_images(single_run, tmp_path):
    fixtures.kadid(tmp_path / "kadid", refs=3, per_ref=3)
    out = here("evaluate", "--run", str(single_run), "--dataset", "kadid10k", "--root", str(tmp_path / "kadid"),
               "--split", "all", "--data.cache_dir", str(tmp_path / "c"), "--output", str(tmp_path / "k.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["metrics"]["n"] == 9 and report["trained_on"] == "synthetic" and report["score_scale"] == [1.0, 5.0]


def test_scorer_matches_the_model_and_tta_with_one_crop_is_plain(single_run, images):
    scorer = iqa_dist.load_model(single_run, "cpu")
    path = images / "a0.png"
    a = scorer.prepare(path)
    y, x = grid_origins(a.shape[0], a.shape[1], scorer.size, 1)[0]
    assert (y, x) == ((a.shape[0] - scorer.size) // 2, (a.shape[1] - scorer.size) // 2)  # the centre
    y, x = patch_origins(scorer.card.protocol, a, a.shape[0], a.shape[1], scorer.size, 1)[0]  # the model's protocol
    patch = torch.from_numpy(a[y:y + scorer.size, x:x + scorer.size].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        plain = scorer.scale.to_score(scorer.model(normalize(patch, scorer.augmenter.mean, scorer.augmenter.std)).item())
    assert scorer.score(path, crops=1, flip=False)[0] == pytest.approx(plain, abs=1e-4)
    # the same image as a path, a PIL image and a uint8 tensor (HWC and CHW) scores the same
    pil = Image.open(path)
    hwc = torch.from_numpy(np.array(pil.convert("RGB")))
    scores = [scorer.score(im, crops=4)[0] for im in (path, pil, hwc, hwc.permute(2, 0, 1))]
    assert max(scores) - min(scores) < 1e-4
    assert scorer.score([path, path], crops=4, flip=True).shape == (2,)
    # in-memory images take the cache's decoding: 16-bit gray keeps its top 8 bits (PIL's convert
    # would clip it to white), and one smaller than a patch is refused with its size
    gray16 = Image.fromarray(np.full((150, 200), 40 * 256, np.uint16))
    assert (scorer.prepare(gray16) == 40).all()
    with pytest.raises(UserError, match="is 60x50 after resize .* smaller than the 64-px patch"):
        scorer.prepare(Image.new("RGB", (60, 50)))


def test_an_image_scores_the_same_in_every_form_it_comes_in(single_run, tmp_path):
    """The same pixels as a file, a PIL image of any mode, a uint8 array or tensor (HWC or CHW;
    grey, RGB, RGBA): one score. RGBA scores as its file does (alpha dropped, as PIL reads it),
    grey as its file does (spread to RGB). Other forms are refused in one line naming them."""
    scorer = iqa_dist.load_model(single_run, "cpu")
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (130, 150, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    # the RGB image in the same call, so every score comes from one batch: a batch of another size
    # may take other CPU kernels (oneDNN blocks by batch on some CPUs) and differ in the last bits
    forms = [tmp_path / "rgba.png", Image.fromarray(rgba), rgba, rgba.transpose(2, 0, 1),
             torch.from_numpy(rgba.transpose(2, 0, 1).copy()), torch.from_numpy(rgba),
             np.ascontiguousarray(rgba[..., :3])]  # alpha dropped: the RGB image's score
    scores = scorer.score(forms)
    assert np.allclose(scores, scores[0], atol=0, rtol=0), scores
    grey = rng.integers(0, 256, (130, 150), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    forms = [tmp_path / "grey.png", Image.fromarray(grey), Image.fromarray(grey).convert("P"), grey, grey[..., None],
             torch.from_numpy(grey[None].copy()), np.repeat(grey[..., None], 3, 2)]
    scores = scorer.score(forms)
    assert np.allclose(scores, scores[0], atol=0, rtol=0), scores
    for bad, said in [(rgba.astype(np.float32) / 255, "float32"), (rgba[..., :2], "1, 3 or 4 channels"),
                      (np.zeros((2, 3, 4, 5, 6), np.uint8), "expected HxW")]:
        with pytest.raises(UserError, match=re.escape(said)):
            scorer.score([bad])


def test_predict_is_deterministic_scores_folders_and_skips_bad_files(single_run, images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    first = here("predict", str(single_run), str(folder), "--format", "csv", "--crops", "4", "--flip")
    assert first.returncode == 1  # one file failed
    assert "broken.jpg" in first.stderr and "unreadable image" in first.stderr and "Traceback" not in first.stderr
    rows = list(csv.DictReader(io.StringIO(first.stdout)))  # the bad file is a row without a score
    assert {r["path"].split("/")[-1]: bool(r["score"]) for r in rows} == {
        "a0.png": True, "a1.png": True, "a2.png": True, "broken.jpg": False, "b.jpg": True}
    rows = [r for r in rows if r["score"]]
    code, out, err = cli("predict", str(single_run / "model"), str(folder / "*.png"),
                         str(folder / "sub" / "b.jpg"), "--format", "jsonl", "--crops", "4", "--flip")
    assert code == 0, err
    scores = {json.loads(line)["path"]: json.loads(line)["score"] for line in out.splitlines()}
    for r in rows:
        assert scores[r["path"]] == pytest.approx(float(r["score"]), abs=1e-3)
    code, out, _ = cli("predict", str(single_run), str(images / "a1.png"))
    assert code == 0 and "a1.png" in out
    code, _, err = cli("predict", str(single_run), str(tmp_path / "nothing-here.png"))
    assert code == 1 and "no such file" in err


@pytest.fixture(scope="module")
def two_runs(tiny_overrides, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for lr in ("1e-3", "3e-4"):
        out = train_here([*tiny_overrides, *RUN, "train.max_steps=4", "train.eval_every=2", f"optim.lr={lr}",
                          f"run.root={root}"])
        assert out.returncode == 0, out.stderr
    return root


def test_report_table_markdown_and_plots(two_runs, tmp_path):
    out = here("report", str(two_runs))
    assert out.returncode == 0, out.stderr
    assert "lr=0.001" in out.stdout and "lr=0.0003" in out.stdout  # what differs
    assert "phase one" not in out.stdout.lower()  # synthetic runs: KonIQ's reference would mislead
    md = here("report", str(two_runs), "--markdown", "--plot", str(tmp_path / "plots"))
    assert md.returncode == 0, md.stderr
    rows = [line for line in md.stdout.splitlines() if re.match(r"\| \d{8}-\d{6}-", line)]
    assert len(rows) == 2 and "0.9236" not in md.stdout  # one row per run (a figure may begin "| 20")
    koniq = tmp_path / "koniq-runs"
    shutil.copytree(two_runs, koniq)
    for config in koniq.glob("*/config.yaml"):  # stand-ins for KonIQ-10k runs: the reference belongs
        config.write_text(config.read_text().replace("dataset: synthetic", "dataset: koniq10k"))
    md = here("report", str(koniq), "--markdown")
    assert md.returncode == 0, md.stderr
    assert "| + ColorJitter (best) | 0.9236 | 0.9353 |" in md.stdout
    for name in ("train_loss.png", "val_srcc.png"):
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 10_000
        with Image.open(png) as im:
            assert im.size == (840, 540)
            assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not blank
    bad = here("report", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such run directory" in bad.stderr


def test_predict_turns_phone_photos_upright_as_the_card_says(single_run, tmp_path):
    """predict follows the model card's data.exif: a portrait phone photo (stored sideways with
    EXIF orientation 6) scores as its upright view; a card from before the setting (or exif
    false) scores the pixels as stored, as that model's cache saw them."""
    from PIL import ImageOps

    from .test_cache import _phone_photo

    photo = tmp_path / "phone.jpg"
    stored = _phone_photo(photo, seed=11)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB"))
    assert upright.shape == (200, 120, 3) and stored.shape == (120, 200, 3)
    scorer = iqa_dist.load_model(single_run, "cpu")
    assert scorer.exif is True
    assert scorer.score([photo])[0] == pytest.approx(scorer.score([upright])[0], abs=1e-6)
    old = tmp_path / "old-model"
    shutil.copytree(single_run / "model", old)
    card = json.loads((old / "config.json").read_text())
    for d in card["datasets"].values():
        d["data"].pop("exif")  # a card written before data.exif existed
    (old / "config.json").write_text(json.dumps(card))
    before = iqa_dist.load_model(old, "cpu")
    assert before.exif is False
    assert before.score([photo])[0] == pytest.approx(before.score([stored])[0], abs=1e-6)
    assert before.score([photo])[0] != pytest.approx(scorer.score([photo])[0], abs=1e-6)


# ---------------------------------------------------------------- predict at scale: streaming, resumable, distributed


@pytest.fixture(scope="module")
def jpeg_list(tmp_path_factory):
    """40 generated JPEGs and one broken file, listed one a line (with a comment and a blank line)."""
    folder = tmp_path_factory.mktemp("generated")
    paths = []
    for i in range(40):
        fixtures.image(folder / f"g{i:03d}.jpg", (200, 150) if i % 3 else (150, 200), seed=100 + i)
        paths.append(str(folder / f"g{i:03d}.jpg"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths.insert(17, str(folder / "broken.jpg"))
    listing = folder / "list.txt"
    listing.write_text("# generated images\n\n" + "\n".join(paths) + "\n")
    return listing, paths


def _scores(path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {r["path"]: r["score"] for r in csv.DictReader(f)}


def test_predict_resumes_an_output_cut_short(single_run, jpeg_list, tmp_path):
    """--resume keeps the rows already written (a last line cut short by the kill is scored again)
    and the result is the uninterrupted run's file; without --resume the file starts afresh."""
    listing, paths = jpeg_list
    whole = tmp_path / "whole.csv"
    out = here("predict", str(single_run), "--list", str(listing), "--format", "csv", "--output", str(whole),
               "--workers", "2", "--batch-images", "4")
    assert out.returncode == 1 and "1 file(s) could not be scored; 40 scored" in out.stderr, out.stderr
    lines = whole.read_text().splitlines()
    assert lines[0] == "path,score,error" and [line.split(",")[0] for line in lines[1:]] == paths
    # the unreadable file's row says why, in the file and on stderr, from the first run on
    assert lines[18].startswith(f"{paths[17]},,unreadable image: ") and all(line.split(",")[1] for line in lines[1:18])
    assert f"{paths[17]}: unreadable image:" in " ".join(out.stderr.split()) and "earlier launch" not in out.stderr
    cut = tmp_path / "cut.csv"
    cut.write_text("\n".join(lines[:12]) + "\n" + lines[12][:-3])  # killed while writing row 12
    out = here("predict", str(single_run), "--list", str(listing), "--format", "csv", "--output", str(cut),
               "--resume", "--workers", "0")
    assert out.returncode == 1 and "--resume: 11 image(s) already in" in out.stderr, out.stderr
    assert cut.read_text() == whole.read_text()
    out = here("predict", str(single_run), str(paths[0]), "--format", "jsonl", "--output", str(cut))
    assert out.returncode == 0 and len(cut.read_text().splitlines()) == 1
    (tmp_path / "bad.csv").write_text("path,score,error\nx.jpg,0.5,,extra\n")
    code, _, err = cli("predict", str(single_run), "--list", str(listing), "--format", "csv", "--output",
                       str(tmp_path / "bad.csv"), "--resume")
    assert code == 2 and "bad.csv: row 2 is not a predict result row" in err and "Traceback" not in err


def test_predict_on_two_processes_killed_and_resumed_equals_one_process(single_run, jpeg_list, tmp_path, monkeypatch):
    """The newcomer's case: a list of JPEGs scored by two CPU processes, both killed while they
    write (SIGKILL after 4 rows each), relaunched with --resume: the CSV of an uninterrupted
    single-process run (scores to 1e-4 of the score range), the bad file reported in it and in the
    exit status, no part files left."""
    import os
    import signal

    from iqa_dist.commands import predict as predict_command

    from .conftest import launch_here

    listing, paths = jpeg_list
    one = tmp_path / "one.csv"
    out = here("predict", str(single_run), "--list", str(listing), "--format", "csv", "--output", str(one),
               "--workers", "0")
    assert out.returncode == 1, out.stderr
    two = tmp_path / "two.csv"
    args = ["predict", str(single_run), "--list", str(listing), "--format", "csv", "--output", str(two), "--workers",
            "1", "--batch-images", "1"]
    line = predict_command.Output._line

    def killed_after_four_rows(self, *row):
        self.lines = getattr(self, "lines", 0) + 1
        if self.lines > 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return line(self, *row)

    monkeypatch.setattr(predict_command.Output, "_line", killed_after_four_rows)
    killed = launch_here(*args)
    written = sum(len(p.read_text().splitlines()) for p in tmp_path.glob("two.csv.part-*"))
    assert killed.returncode == 4 and written == 8, (killed.returncode, written, killed.stderr[-2000:])
    monkeypatch.setattr(predict_command.Output, "_line", line)
    resumed = launch_here(*args, "--resume")
    assert resumed.returncode == 1 and "1 file(s) could not be scored; 40 scored" in resumed.stderr, resumed.stderr
    assert "--resume:" in resumed.stderr and not list(tmp_path.glob("two.csv.part-*"))
    a, b = _scores(one), _scores(two)
    assert list(a) == list(b) == paths
    lo, hi = ModelCard.read(single_run / "model").datasets["synthetic"].score_range
    for path in paths:
        assert (a[path] == "") == (b[path] == "") == (path.endswith("broken.jpg")), path
        if a[path]:
            assert abs(float(a[path]) - float(b[path])) <= 1e-4 * (hi - lo) + 1e-4, path  # + the printed rounding


def test_a_path_given_twice_is_scored_once_and_said(single_run, images, tmp_path):
    listing = tmp_path / "list.txt"
    a0, a1 = str(images / "a0.png"), str(images / "a1.png")
    listing.write_text(f"{a0}\n{a1}\n{a0}\n")
    out = here("predict", str(single_run), str(images / "a1.png"), "--list", str(listing), "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert [r["path"] for r in csv.DictReader(io.StringIO(out.stdout))] == [a1, a0]
    assert "2 path(s) given more than once: each is scored once (one row)" in " ".join(out.stderr.split())
