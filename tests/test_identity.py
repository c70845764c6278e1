"""Data that moves keeps its identity: files are known by their content, not their mtimes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

from iqa_dist.config import load_config
from iqa_dist.data.cache import HASHES, _hash, cache_root, legacy_fingerprint
from iqa_dist.data.identity import file_hashes, sha256_file
from iqa_dist.sources.readers import read_source, source_root

from . import fixtures
from .conftest import RUN, cli, metrics, only_run
from .test_cli import one_line_error


def _train_args(tiny_overrides, data, runs, cache):
    overrides = [f"--{o}" for o in [*tiny_overrides, *RUN, "train.max_steps=2", "train.eval_every=2"]
                 if "synthetic" not in o and "cache_dir" not in o]
    return ["train", "--preset", "demo", "--data.dataset=csv", f"--data.root={data}", f"--run.root={runs}",
            f"--data.cache_dir={cache}", "--data.test_fraction=0.25", "--data.val_fraction=0.25", *overrides]


def test_a_copy_without_timestamps_resumes_on_the_same_cache_and_a_changed_byte_is_refused(tiny_overrides, tmp_path):
    """Staging the data to node-local scratch (`cp -r`: new mtimes) and resuming from there:
    the image cache is the same (nothing is decoded again) and the run continues; one changed
    pixel in one image makes the same resume stop, naming the cache that changed."""
    fixtures.generic_csv(tmp_path / "d", n=24)
    args = _train_args(tiny_overrides, tmp_path / "d", tmp_path / "r", tmp_path / "c")
    code, _, err = cli(*args)
    assert code == 0, err
    run = only_run(tmp_path / "r")
    shutil.copytree(tmp_path / "d", tmp_path / "scratch", copy_function=shutil.copyfile)  # no metadata kept
    for f in (tmp_path / "scratch").rglob("*"):
        os.utime(f, ns=(1, 1))  # certainly other mtimes than the originals'
    moved = [a.replace(str(tmp_path / "d"), str(tmp_path / "scratch")) for a in args]
    code, _, err = cli(*moved, "--resume", str(run), "--extend", "--train.max_steps=4")
    assert code == 0, err
    assert "image cache csv: up to date" in err, err  # found, not built again
    assert [m["step"] for m in metrics(run)] == [2, 4]
    caches = [p for p in (tmp_path / "c").iterdir() if p.is_dir() and p.name.startswith("csv-")]
    assert len(caches) == 1  # one cache for both folders

    image = tmp_path / "scratch" / "img" / "003.png"
    pixels = np.array(Image.open(image))
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(image)
    code, _, err = cli(*moved, "--resume", str(run), "--extend", "--train.max_steps=6")
    one_line_error(code, err, "the data differ from the run's", "csv: csv-")


def test_a_run_from_before_content_identity_resumes_and_its_cache_is_reused(tiny_overrides, tmp_path):
    """A run and cache made when files were keyed by (size, mtime): its meta.json holds the old
    key, the cache folder the old name. Resuming on the same files passes the check through the
    old key recomputed from them, and the old cache is renamed to its new key, not rebuilt."""
    fixtures.generic_csv(tmp_path / "d", n=24)
    args = _train_args(tiny_overrides, tmp_path / "d", tmp_path / "r", tmp_path / "c")
    assert cli(*args)[0] == 0
    run = only_run(tmp_path / "r")
    # turn run and cache into what the code before version 4 left behind
    cfg = load_config("demo", [a[2:] for a in args if a.startswith("--data.") or a.startswith("--model.")])
    data = read_source(cfg.data, source_root(cfg.data, cache_root(cfg)))
    legacy = tmp_path / "c" / f"csv-{_hash(legacy_fingerprint(cfg, data))}"
    meta = json.loads((run / "meta.json").read_text())
    current = tmp_path / "c" / meta["data"]["csv"].split("/")[0]
    spec = json.loads((current / "views" / meta["data"]["csv"].split("/")[1] / "meta.json").read_text())
    view_keys = {"images", "split", "split_seed", "test_fraction", "val_fraction", "split_hash", "train_patches",
                 "patch_size", "cached_patch_num", "patch_seed"}
    old_view = _hash({**{k: spec[k] for k in view_keys}, "images": legacy.name})
    (current / HASHES).unlink()
    os.replace(current, legacy)
    meta["data"]["csv"] = f"{legacy.name}/{old_view}"
    (run / "meta.json").write_text(json.dumps(meta))

    code, _, err = cli(*args, "--resume", str(run), "--extend", "--train.max_steps=4")
    assert code == 0, err
    assert f"the cache built before files were identified by content ({legacy.name}) is reused" in err, err
    assert not legacy.exists() and current.is_dir() and (current / HASHES).is_file()
    assert [m["step"] for m in metrics(run)] == [2, 4]
    assert json.loads((run / "meta.json").read_text())["data"]["csv"].startswith(current.name)


def test_file_hashes_are_the_contents_and_a_memo_only_spares_reading(tmp_path):
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
    first = file_hashes(files, tmp_path, tmp_path / "cache", workers=2)
    assert first == [sha256_file(f) for f in files] and len(set(first)) == 3
    files[1].write_bytes(b"\x07" * 1000)  # same size; mtime moves: read again
    os.utime(files[1], ns=(5, 5))
    assert file_hashes(files, tmp_path, tmp_path / "cache", workers=1)[1] == sha256_file(files[1]) != first[1]
