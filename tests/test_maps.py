"""Quality maps: a map's patches are the grid protocol's, its mean is the image's grid score, it
is averaged per pixel where patches overlap, and `predict --map` draws one per image."""

from __future__ import annotations

from dataclasses import replace

import iqa_dist
import numpy as np
import pytest
from PIL import Image

from iqa_dist.data.protocol import grid_origins
from iqa_dist.scoring.maps import QualityMap

from . import fixtures
from .conftest import here


def test_a_maps_mean_is_the_images_score_under_the_grid_protocol(single_run, tmp_path):
    """The map's patches are the grid protocol's origins for its crop count, its score is the one
    `score` gives under the grid protocol with that count, and its patch scores average to it;
    scores of the card's own (random) protocol are left as they are."""
    paths = [tmp_path / "wide.png", tmp_path / "tall.jpg"]
    fixtures.image(paths[0], (260, 150), seed=3)
    fixtures.image(paths[1], (150, 230), seed=4)
    scorer = iqa_dist.load_model(single_run, "cpu")
    assert scorer.card.protocol == "random"
    maps = scorer.quality_maps(paths, crops=9)
    grid = iqa_dist.load_model(single_run, "cpu")
    grid.card = replace(grid.card, protocol="grid")
    expected = grid.score(paths, crops=9)
    for m, path, score in zip(maps, paths, expected):
        with Image.open(path) as im:
            assert (m.width, m.height) == im.size  # the synthetic card keeps sizes (resize none)
        assert m.origins.tolist() == grid_origins(m.height, m.width, m.patch, 9).tolist()
        assert m.score == pytest.approx(score, abs=1e-9)  # the same batch of the same patches: the same number
        assert m.scores.mean() == pytest.approx(m.score, abs=1e-4)  # float32 mean vs float64 mean of the same
        assert m.scores.std() > 0  # patches differ: the map is not the score repeated
    assert scorer.score(paths) == pytest.approx(iqa_dist.load_model(single_run, "cpu").score(paths), abs=0)


def test_overlapping_patches_are_averaged_per_pixel():
    m = QualityMap(score=2.0, origins=np.array([[0, 0], [0, 2]]), scores=np.array([1.0, 3.0]), patch=4, height=5,
                   width=6)
    px = m.pixels()
    assert px[0, :2].tolist() == [1.0, 1.0] and px[0, 2:4].tolist() == [2.0, 2.0] and px[0, 4:].tolist() == [3.0, 3.0]
    assert np.isnan(px[4]).all()  # the last row: no patch covers it
    assert m.to_json() == {"score": 2.0, "patch": 4, "width": 6, "height": 5, "origins": [[0, 0], [0, 2]],
                           "scores": [1.0, 3.0]}


def test_predict_map_draws_one_png_per_image(single_run, tmp_path):
    """`predict --map DIR` keeps the scores as they were and writes one PNG per scored image; two
    files of one name in different folders get their list position in the map's name; a folder
    that cannot be made is one line before anything is scored."""
    for i, sub in enumerate(("a", "b")):
        fixtures.image(tmp_path / "in" / sub / "photo.png", (200, 150), seed=i)
    fixtures.image(tmp_path / "in" / "other.jpg", (150, 200), seed=5)
    out = here("predict", str(single_run), str(tmp_path / "in"), "--format", "csv", "--map", str(tmp_path / "maps"),
               "--crops", "6")
    assert out.returncode == 0, out.stderr
    plain = here("predict", str(single_run), str(tmp_path / "in"), "--format", "csv", "--crops", "6")
    assert out.stdout == plain.stdout  # drawing maps changes no score
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == ["other.png", "photo-0.png", "photo-1.png"]
    for name in written:
        with Image.open(tmp_path / "maps" / name) as im:
            assert im.format == "PNG" and im.width >= 500
    (tmp_path / "blocker").write_text("a file where the folder should be")
    bad = here("predict", str(single_run), str(tmp_path / "in"), "--map", str(tmp_path / "blocker" / "maps"))
    assert bad.returncode == 2 and "--map" in bad.stderr and "Traceback" not in bad.stderr
