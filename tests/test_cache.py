"""`iqa-dist prepare`: the datasets cache, fingerprints, bad input, concurrency."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iqa_dist.config import load_config
from iqa_dist.data.cache import prepare

from . import fixtures
from .conftest import fork_here, here

TINY = ["model.img_size=112", "data.test_patch_num=3", "data.workers=2"]


def koniq_cfg(root: Path, cache: Path, *extra: str):
    return load_config("koniq-swin-t", [f"data.root={root}", f"data.cache_dir={cache}", "data.split=random", *TINY, *extra])


def complete_caches(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*") if (p / "meta.json").is_file()]


def test_prepare_synthetic_cli(tmp_path):
    cache = tmp_path / "cache"
    out = here("prepare", "--dataset", "synthetic", "--cache-dir", str(cache), "--data.synthetic_size=1")
    assert out.returncode == 0, out.stderr
    m = re.search(r"synthetic: (\d+) images cached \(train (\d+) / val (\d+) / test (\d+)", " ".join(out.stderr.split()))
    assert m and int(m[1]) == int(m[2]) + int(m[3]) + int(m[4]) and min(map(int, m.groups())) > 0
    again = here("prepare", "--dataset", "synthetic", "--cache-dir", str(cache), "--data.synthetic_size=1")
    assert again.returncode == 0 and "up to date" in again.stderr and "nothing to do" in again.stderr


def test_koniq_folder_counts_and_pixels(tmp_path):
    fixtures.koniq(tmp_path / "koniq", n=12)
    view = prepare(koniq_cfg(tmp_path / "koniq", tmp_path / "c", "data.split=official"))
    assert view.meta["counts"] == {"train": 8, "val": 2, "test": 2}
    assert view.image_meta["count"] == 12 and view.image_meta["resize"] == "512x384"
    store = view.image_store("test")
    names = view.names(view.ids("test"))
    for row, name in enumerate(names):
        expected = np.asarray(Image.open(tmp_path / "koniq" / name).convert("RGB").resize((512, 384), Image.BILINEAR))
        n = int(store.heights[row] * store.widths[row] * 3)
        got = store.pixels[int(store.offsets[row]):int(store.offsets[row]) + n].numpy().reshape(384, 512, 3)
        assert np.array_equal(got, expected)  # landscape, exactly PIL decode + resize
    images = view.eval_set("test", "random", 3, 112)
    assert images.origins.shape == (2, 3, 2) and images.store.heights.tolist() == [384] * 2
    random_view = prepare(koniq_cfg(tmp_path / "koniq", tmp_path / "c", "data.split=random"))
    assert sum(random_view.meta["counts"].values()) == 12
    assert random_view.meta["images"] == view.meta["images"]  # a new split reuses the decoded images


def test_second_prepare_is_noop_and_changed_input_rebuilds(tmp_path, capsys):
    fixtures.koniq(tmp_path / "k", n=6, sets=False)
    cfg = koniq_cfg(tmp_path / "k", tmp_path / "c")
    first = prepare(cfg)
    arrow = next(first.path.parent.parent.glob("images-*.arrow"))
    stamp = arrow.stat().st_mtime_ns
    capsys.readouterr()
    second = prepare(cfg)
    assert second.path == first.path and arrow.stat().st_mtime_ns == stamp
    assert "up to date" in capsys.readouterr().err
    fixtures.image(tmp_path / "k" / "1024x768" / f"{10004473376}.jpg", (256, 192), seed=99)  # new pixels
    third = prepare(cfg)
    assert third.path.parent.parent != first.path.parent.parent
    assert len(complete_caches(tmp_path / "c")) == 2
    split_change = prepare(koniq_cfg(tmp_path / "k", tmp_path / "c", "data.split_seed=4"))
    assert split_change.path.parent.parent == third.path.parent.parent and split_change.path != third.path


def make_bad(root: Path) -> dict[str, str]:
    rows = fixtures.koniq(root, n=10, size=(320, 240), sets=False)
    img = root / "1024x768"
    (img / rows[0][0]).write_bytes(b"this is not a jpeg at all")  # corrupt
    data = (img / rows[1][0]).read_bytes()
    (img / rows[1][0]).write_bytes(data[: len(data) // 2])  # truncated
    (img / rows[2][0]).unlink()  # missing file
    fixtures.image(img / rows[3][0], (100, 80), seed=3)  # too small for 224 px (resize none below)
    csv_path = root / "koniq10k_scores_and_distributions.csv"
    lines = csv_path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",nan"  # row 6 (rows[4]): NaN score
    lines[6] = lines[6].rsplit(",", 1)[0] + ",101"  # row 7 (rows[5]): out of range
    csv_path.write_text("\n".join(lines) + "\n")
    return {rows[0][0]: "unreadable image", rows[1][0]: "unreadable image", rows[2][0]: "image file missing",
            rows[3][0]: "smaller than the 224-px patch", rows[4][0]: "not finite", rows[5][0]: "outside the scale"}


def test_bad_input_is_reported_together_and_caches_nothing(tmp_path):
    expected = make_bad(tmp_path / "k")
    out = here("prepare", "--dataset", "koniq10k", "--root", str(tmp_path / "k"), "--cache-dir",
               str(tmp_path / "c"), "--data.resize=none", "--data.workers=1")
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "6 bad row(s) in koniq10k; nothing was cached" in text
    for name, reason in expected.items():
        assert name in text and reason in text, (name, reason)
    assert "row 6" in text and "row 7" in text
    assert not complete_caches(tmp_path / "c")
    assert not list((tmp_path / "c").glob(".*partial*"))


def test_skip_bad_drops_and_records(tmp_path):
    expected = make_bad(tmp_path / "k")
    out = here("prepare", "--dataset", "koniq10k", "--root", str(tmp_path / "k"), "--cache-dir",
               str(tmp_path / "c"), "--data.resize=none", "--data.workers=1", "--data.split=random",
               "--data.test_fraction=0.25", "--data.val_fraction=0.34", "--skip-bad")
    assert out.returncode == 0, out.stderr
    assert "dropped 6 bad row(s)" in " ".join(out.stderr.split())
    [cache] = complete_caches(tmp_path / "c")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["count"] == 4 and len(meta["skipped"]) == 6
    assert all(any(name in s for s in meta["skipped"]) for name in expected)


def test_csv_without_expected_columns(tmp_path):
    fixtures.generic_csv(tmp_path / "d", n=4)
    (tmp_path / "d" / "meta.csv").write_text("file_name,quality_value\na.png,3\n")
    out = here("prepare", "--dataset", "csv", "--root", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "meta.csv: no image column found among file_name, quality_value" in " ".join(out.stderr.split())
    assert not (tmp_path / "c").exists() or not complete_caches(tmp_path / "c")


def test_image_modes_become_rgb(tmp_path):
    root = tmp_path / "modes"
    rows = []
    for i, (mode, ext) in enumerate([("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"), ("I;16", "png"),
                                     ("RGB", "jpg")]):
        name = f"img/{i}.{ext}"
        if mode == "I;16":
            a = (np.linspace(0, 65535, 128 * 128).reshape(128, 128)).astype(np.uint16)
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / name)  # uint16 -> a 16-bit PNG
        else:
            fixtures.image(root / name, (128, 128), seed=i, mode=mode)
        rows.append(f"{name},{i}")
    (root / "meta.csv").write_text("image,mos\n" + "\n".join(rows) + "\n")
    view = prepare(load_config("demo", [f"data.root={root}", "data.dataset=csv", f"data.cache_dir={tmp_path / 'c'}",
                                        "data.test_fraction=0.34", "data.val_fraction=0.25", "model.img_size=112"]))
    assert view.image_meta["count"] == 6 and view.image_meta["skipped"] == []
    everything = view.images
    row = everything["name"].index("img/4.png")  # the 16-bit ramp: scaled to 8 bits, not clipped at 255
    ramp = np.frombuffer(everything[row]["pixels"], np.uint8).reshape(128, 128, 3)
    assert ramp.min() == 0 and ramp.max() == 255 and len(np.unique(ramp)) > 200
    store = view.image_store("train")
    assert int(store.nbytes) == sum(int(h * w * 3) for h, w in zip(store.heights, store.widths))


def test_build_failure_leaves_no_complete_cache(tmp_path, monkeypatch):
    from iqa_dist.data import cache as cache_mod

    fixtures.koniq(tmp_path / "k", n=4, sets=False)
    original = cache_mod._build_images

    def failing(partial, *args, **kwargs):
        original(partial, *args, **kwargs)
        raise KeyboardInterrupt  # killed after writing everything but before the rename

    monkeypatch.setattr(cache_mod, "_build_images", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(koniq_cfg(tmp_path / "k", tmp_path / "c"))
    assert not complete_caches(tmp_path / "c") and not list((tmp_path / "c").glob(".*partial*"))
    monkeypatch.setattr(cache_mod, "_build_images", original)
    assert prepare(koniq_cfg(tmp_path / "k", tmp_path / "c")).image_meta["count"] == 4


def _prepare_args(root: Path, cache: Path) -> list[str]:
    return ["prepare", "--dataset", "koniq10k", "--root", str(root), "--cache-dir", str(cache), "--data.workers=1",
            "--data.resize=1024x768", "--data.split=random"]


def test_killed_prepare_is_never_accepted(tmp_path):
    fixtures.koniq(tmp_path / "k", n=30, size=(1024, 768), sets=False)
    proc = fork_here(*_prepare_args(tmp_path / "k", tmp_path / "c"), out=tmp_path / "killed")

    def writing() -> bool:  # decoded rows are reaching the Arrow file of the partial build
        return any(f.stat().st_size > 0 for f in (tmp_path / "c").glob(".*partial*/hf/**/*.arrow"))

    deadline = time.time() + 120
    while time.time() < deadline and not writing() and proc.is_alive():
        time.sleep(0.02)
    assert proc.is_alive() and writing(), "prepare was not killed in the middle of writing the cache"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not complete_caches(tmp_path / "c") and list((tmp_path / "c").glob(".*partial*"))
    out = here(*_prepare_args(tmp_path / "k", tmp_path / "c"))
    assert out.returncode == 0 and "30 images cached" in " ".join(out.stderr.split())
    assert not list((tmp_path / "c").glob(".*partial*"))  # the killed build's leftovers are gone for good


def test_two_processes_preparing_at_once_yield_one_cache(tmp_path):
    fixtures.koniq(tmp_path / "k", n=20, size=(512, 384), sets=False)
    procs = [fork_here(*_prepare_args(tmp_path / "k", tmp_path / "c"), out=tmp_path / f"p{i}") for i in range(2)]
    for p in procs:
        p.join(300)
    errs = [(tmp_path / f"p{i}.stderr").read_text() for i in range(2)]
    assert [p.exitcode for p in procs] == [0, 0], errs
    assert len(complete_caches(tmp_path / "c")) == 1
    assert sum("nothing to do" in " ".join(e.split()) and "image cache" in e for e in errs) == 1


def _phone_photo(path: Path, seed: int) -> np.ndarray:
    """A portrait photo stored as phones store it: landscape pixels (200x120) with EXIF
    orientation 6 (turn 90 degrees clockwise to view). Returns the pixels as stored."""
    fixtures.image(path.with_suffix(".png"), (120, 200), seed=seed)  # the scene, upright: 120 wide, 200 tall
    upright = Image.open(path.with_suffix(".png")).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    path.with_suffix(".png").unlink()
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("exif", [True, False])
def test_exif_orientation_is_applied_unless_asked_not_to(tmp_path, exif):
    """data.exif (default true): a phone's portrait photo is cached upright, as a viewer shows it
    (its stored pixels turned 90 degrees clockwise); false keeps the pixels as stored (what the
    HyperIQA code, reading with PIL's Image.open, did). The setting is part of the cache key."""
    root = tmp_path / "d"
    stored = _phone_photo(root / "img" / "0.jpg", seed=3)
    rows = ["img/0.jpg,1"]
    for i in range(1, 6):
        fixtures.image(root / "img" / f"{i}.png", (128, 128), seed=i)
        rows.append(f"img/{i}.png,{i}")
    (root / "meta.csv").write_text("image,mos\n" + "\n".join(rows) + "\n")
    view = prepare(load_config("demo", [f"data.root={root}", "data.dataset=csv", f"data.cache_dir={tmp_path / 'c'}",
                                        "data.test_fraction=0.34", "data.val_fraction=0.25", "model.img_size=112",
                                        f"data.exif={str(exif).lower()}"]))
    row = view.images["name"].index("img/0.jpg")
    h, w = view.images[row]["height"], view.images[row]["width"]
    pixels = np.frombuffer(view.images[row]["pixels"], np.uint8).reshape(h, w, 3)
    expected = np.rot90(stored, k=-1) if exif else stored  # turned clockwise, or as stored
    assert (h, w) == expected.shape[:2] and np.array_equal(pixels, expected)
    assert view.image_meta["exif"] is exif


def test_a_damaged_cache_is_found_before_it_is_read_and_built_again(tmp_path):
    """A cache file cut short after the build (a full disk, a copy interrupted): the next prepare
    sees it from the sizes meta.json recorded, names the folder and what is wrong in one line,
    and builds it again, instead of saying "up to date" and failing deep in Arrow."""
    fixtures.koniq(tmp_path / "k", n=6, sets=False)
    view = prepare(koniq_cfg(tmp_path / "k", tmp_path / "c"))
    arrow = view.image_dir / "images-00000.arrow"
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.truncate(size // 2)
    out = here("prepare", "--dataset", "koniq10k", "--root", str(tmp_path / "k"), "--cache-dir", str(tmp_path / "c"),
               "--data.split=random", *[f"--{o}" for o in TINY])
    err = " ".join(out.stderr.split())
    assert out.returncode == 0, err
    assert f"{view.image_dir} is damaged (images-00000.arrow holds {size // 2:,} bytes where {size:,} were written)" in err
    assert arrow.stat().st_size == size and len(prepare(koniq_cfg(tmp_path / "k", tmp_path / "c")).image_store("test"))


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB file system of its own (tmpfs; needs root, as CI has)."""
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_full_disk_while_caching_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    fixtures.koniq(tmp_path / "k", n=8, size=(1024, 768), sets=False)
    out = here("prepare", "--dataset", "koniq10k", "--root", str(tmp_path / "k"), "--cache-dir", str(small_disk / "c"),
               "--data.split=random", *[f"--{o}" for o in TINY])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: no space left on {small_disk} for the image cache koniq10k (needs ~") and "MB" in lines[0]
    assert not complete_caches(small_disk / "c") and not list((small_disk / "c").glob(".*partial*"))


def test_images_far_larger_than_the_patches_need_are_warned_about(tmp_path):
    """resize none on a camera photo: one line with how many, the largest and their share of the
    cache, and the setting that keeps them smaller (a plain dataset says nothing)."""
    fixtures.generic_csv(tmp_path / "d", n=4)
    fixtures.image(tmp_path / "d" / "img" / "001.png", (1000, 950), seed=1)  # shorter side 950 > 8 x 112
    args = ["prepare", "--dataset", "csv", "--root", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"),
            "--data.split=random", "--data.test_fraction=0.5", "--data.val_fraction=0.5", *[f"--{o}" for o in TINY]]
    out = here(*args)
    err = " ".join(out.stderr.split())
    assert out.returncode == 0, err
    assert "warning: 1 of 4 csv images are over 8x the 112-px patch on their shorter side (the largest 1000x950" in err
    assert "--data.resize short:224" in err
    assert "over 8x" not in " ".join(here(*args, "--data.resize=short:224").stderr.split())


def test_a_read_only_cache_is_used_as_it_is_and_a_missing_level_is_one_line(tmp_path, tiny_overrides):
    """A cache built once, then mounted read-only (as shared cluster caches often are): prepare
    and train read it without a lock; a level it lacks (another split) is one line naming the folder."""
    fixtures.koniq(tmp_path / "k", n=12, sets=False)
    cache = tmp_path / "cache"
    args = ["--preset", "demo", "--dataset", "koniq10k", "--root", str(tmp_path / "k"), "--data.split=random",
            "--data.resize=none", *[f"--{o}" for o in TINY]]
    assert here("prepare", *args, "--cache-dir", str(cache)).returncode == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(ro)]).returncode:
        pytest.skip("needs root to mount a read-only copy")
    try:
        out = here("prepare", *args, "--cache-dir", str(ro))
        assert out.returncode == 0 and "up to date" in out.stderr, out.stderr
        overrides = [o for o in tiny_overrides if not o.startswith(("data.cache_dir", "data.synthetic_size"))]
        trained = here("train", "--preset", "demo", *[f"--{o}" for o in overrides], "--data.dataset=koniq10k",
                       f"--data.root={tmp_path / 'k'}", "--data.resize=none", "--data.split=random",
                       *[f"--{o}" for o in TINY], "--train.batch_size=8", "--train.max_steps=2",
                       f"--data.cache_dir={ro}", f"--run.root={tmp_path / 'runs'}")
        assert trained.returncode == 0, trained.stderr[-2000:]
        missing = here("prepare", *args, "--data.split_seed=7", "--cache-dir", str(ro))
        [line] = missing.stderr.strip().splitlines()[-1:]
        assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
        assert line.startswith("error: view random split: ") and "is not built, and" in line and "read-only" in line
    finally:
        subprocess.run(["umount", str(ro)])


def test_a_large_photo_decodes_without_a_raw_warning_and_a_bomb_is_a_row_problem(tmp_path, monkeypatch):
    """PIL warns (a raw line per file) above its MAX_IMAGE_PIXELS and refuses twice that: a
    dataset's own large photo decodes quietly; a decompression bomb is a row problem with PIL's
    reason (the limit lowered here so that small files stand in for 100-Mpx photos)."""
    import warnings

    from PIL import Image

    from iqa_dist.data.decode import decode

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    fixtures.image(tmp_path / "large.png", (90, 80), seed=1)  # 7,200 pixels: above the limit, below twice it
    fixtures.image(tmp_path / "bomb.png", (120, 100), seed=2)  # 12,000: above twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, h, w, why = decode(str(tmp_path / "large.png"), "none", 32)
        assert (h, w, why) == (80, 90, "") and len(pixels) == 80 * 90 * 3
        _, _, _, why = decode(str(tmp_path / "bomb.png"), "none", 32)
    assert why.startswith("unreadable image: DecompressionBombError: Image size (12000 pixels) exceeds limit"), why
