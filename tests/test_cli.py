"""A CLI without sharp edges: results that cannot leak, failed starts that leave nothing, resume
and extend, one-line errors with exit 2, full-width logs, help that starts with what matters."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from iqa_dist.output import console
from iqa_dist.training.display import Display

from . import fixtures
from .conftest import RUN, cli, here, metrics, only_run, train_here


def one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


# ---------------------------------------------------------------- trust: evaluate never leaks


def test_evaluate_uses_the_runs_split_and_refuses_training_images(single_run, cache_root, tmp_path):
    cache = f"--data.cache_dir={cache_root}"
    # another seed's split mixes the run's training contents into "test": refused, counted
    code, _, err = cli("evaluate", "--run", str(single_run), "--dataset", "synthetic", "--preset", "demo",
                       cache, "--data.synthetic_size=1", "--data.split_seed=5", "--output", str(tmp_path / "a.json"))
    assert code == 2 and "images this model trained on" in err and "--allow-train-overlap" in err
    assert not (tmp_path / "a.json").exists()
    code, out, _ = cli("evaluate", "--run", str(single_run), "--dataset", "synthetic", "--preset", "demo",
                       cache, "--data.synthetic_size=1", "--data.split_seed=5", "--allow-train-overlap",
                       "--output", str(tmp_path / "b.json"))
    report = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and report["train_overlap"]["allowed"] and report["train_overlap"]["images"] > 0
    assert "TRAINING IMAGES" in out
    # every image of the dataset ("all") includes the training images too
    code, _, err = cli("evaluate", "--run", str(single_run), "--dataset", "synthetic", "--split", "all", cache)
    assert code == 2 and "trained on" in err


def test_evaluate_refuses_its_training_images_under_other_paths_and_names(single_run, cache_root, tmp_path):
    """A CSV dataset of its own listing the run's training files by absolute path (another
    dataset, other names, no shared content column): the files' contents give them away."""
    train = json.loads((single_run / "model" / "train_images.json").read_text())["synthetic"]["names"]
    source = next(p for p in cache_root.glob("synthetic-src-*") if p.is_dir())
    every = sorted(str(p) for p in (source / "images").iterdir())
    listed = [str(source / n) for n in train[:5]] + [p for p in every if Path(p).relative_to(source).as_posix()
                                                     not in train][:7]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "scores.csv").write_text("image,mos\n" + "".join(f"{p},{i}\n" for i, p in enumerate(listed)))
    args = ["evaluate", "--run", str(single_run), "--dataset", "csv", "--root", str(tmp_path / "mine"), "--split", "all",
            f"--data.cache_dir={tmp_path / 'c'}", "--output", str(tmp_path / "e.json")]
    code, _, err = cli(*args)
    assert code == 2 and "5 of the 12 csv images to score are images this model trained on" in err, err
    code, _, err = cli(*args, "--allow-train-overlap")
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["train_overlap"]["images"] == 5, err


def test_evaluate_split_all_names_its_output_all(single_run, tmp_path):
    fixtures.kadid(tmp_path / "kadid", refs=2, per_ref=3)
    code, out, err = cli("evaluate", "--run", str(single_run), "--dataset", "kadid10k", "--root",
                         str(tmp_path / "kadid"), "--split", "all", f"--data.cache_dir={tmp_path / 'c'}")
    assert code == 0, err
    assert (single_run / "eval-kadid10k-all.json").is_file() and "(all," in out
    assert json.loads((single_run / "eval-kadid10k-all.json").read_text())["split"] == "all"


# ---------------------------------------------------------------- failed starts, resume, extend


def test_a_failed_start_leaves_no_run_directory(tiny_overrides, tmp_path):
    common = [f"--{o}" for o in tiny_overrides if "synthetic" not in o]
    code, _, err = cli("train", "--preset", "demo", "--data.dataset=csv", f"--data.root={tmp_path / 'missing'}",
                       f"--run.root={tmp_path / 'r'}", *common)
    assert code == 2 and "no such folder" in err
    fixtures.generic_csv(tmp_path / "d", n=4)
    (tmp_path / "d" / "meta.csv").write_text("file_name,quality_value\na.png,3\n")
    code, _, err = cli("train", "--preset", "demo", "--data.dataset=csv", f"--data.root={tmp_path / 'd'}",
                       f"--run.root={tmp_path / 'r'}", *common)
    assert code == 2 and "no image column" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_resume_auto_ignores_runs_without_a_checkpoint(single_run, tmp_path):
    from iqa_dist.training.resume import find_resumable
    from iqa_dist.artifacts.rundir import RunDir

    root = tmp_path / "runs"
    never = root / "20200101-000000-demo"
    (never / "checkpoints").mkdir(parents=True)
    shutil.copy(single_run / "config.yaml", never / "config.yaml")
    assert find_resumable(root, "demo") is None
    with_checkpoint = root / "20200101-000001-demo"
    shutil.copytree(single_run, with_checkpoint)
    (with_checkpoint / "summary.json").unlink()
    assert find_resumable(root, "demo") == with_checkpoint
    other = root / "20200101-000002-my-demo"  # another run name that ends in -demo
    shutil.copytree(with_checkpoint, other)
    assert find_resumable(root, "demo") == with_checkpoint and RunDir.named(root, "demo") == [never, with_checkpoint]


def test_report_says_what_each_run_is_now(single_run, tmp_path):
    """finished; stopped, resumable (killed or preempted, its checkpoint left); running only while a
    live process trains it (here: holds its lock), never because it is simply unfinished."""
    runs = tmp_path / "runs"
    for name in ("20260101-000000-done", "20260101-000001-stopped", "20260101-000002-busy"):
        shutil.copytree(single_run, runs / name)
    for name in ("20260101-000001-stopped", "20260101-000002-busy"):
        (runs / name / "summary.json").unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom iqa_dist.artifacts import lock\n"
                               "lock.take(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(300)",
                               str(runs / "20260101-000002-busy")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = cli("report", str(runs), "--markdown")
    finally:
        holder.kill()
        holder.wait()
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| 2026")}
    assert code == 0 and set(rows) == {"20260101-000000-done", "20260101-000001-stopped", "20260101-000002-busy"}, out
    assert "(stopped, resumable from step 6)" in rows["20260101-000001-stopped"]
    assert f"(running (host {socket.gethostname()} pid {holder.pid}" in rows["20260101-000002-busy"]
    assert "running" not in rows["20260101-000000-done"] and "stopped" not in rows["20260101-000000-done"]


def test_one_run_has_one_writer(single_run, tmp_path):
    """A second launch of a run that a live process trains is refused in one line naming the
    holder; the holder killed (SIGKILL: nothing it could clean up), the lock is free."""
    from iqa_dist.artifacts import lock

    run = tmp_path / single_run.name
    shutil.copytree(single_run, run)
    (run / "summary.json").unlink()  # unfinished, with checkpoints: resumable
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom iqa_dist.artifacts import lock\n"
                               "lock.take(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(300)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = cli("train", "--resume", str(run))
        one_line_error(code, err, "this run is being trained by host", f"pid {holder.pid}", "one writer")
    finally:
        holder.kill()
        holder.wait()
    assert lock.holder(run) is None


def test_resume_refuses_data_that_changed(tiny_overrides, tmp_path):
    """The cache folders recorded in meta.json are content hashes: an annotation file that lost
    rows since the run started makes --resume stop, naming what changed."""
    fixtures.generic_csv(tmp_path / "d", n=24)
    overrides = [f"--{o}" for o in [*tiny_overrides, *RUN, "train.max_steps=2", "train.eval_every=2"]
                 if "synthetic" not in o]
    args = ["train", "--preset", "demo", "--data.dataset=csv", f"--data.root={tmp_path / 'd'}",
            f"--run.root={tmp_path / 'r'}", "--data.test_fraction=0.25", "--data.val_fraction=0.25", *overrides]
    code, out, err = cli(*args, "--resume", "auto")
    assert code == 0 and "--resume auto: no unfinished run named demo" in err and "starting a new one" in err, err
    assert "warning: 4 validation images: SRCC over so few takes few values and ties often" in out, out
    run = only_run(tmp_path / "r")
    assert set(json.loads((run / "meta.json").read_text())["data"]) == {"csv"}
    meta = tmp_path / "d" / "meta.csv"
    meta.write_text("".join(meta.read_text().splitlines(keepends=True)[:-4]))
    caches = sorted(p.name for p in Path(os.environ["IQA_DIST_CACHE"]).glob("csv-*"))
    code, _, err = cli(*args, "--resume", str(run), "--extend", "--train.max_steps=4")
    one_line_error(code, err, f"--resume {run}: the data differ from the run's", "csv: csv-", "nothing was built")
    assert [r["step"] for r in metrics(run)] == [2]  # nothing trained on the changed data
    assert sorted(p.name for p in Path(os.environ["IQA_DIST_CACHE"]).glob("csv-*")) == caches  # nor cached


def test_finished_run_says_so_and_extend_trains_it_longer(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *RUN, "train.max_steps=4", "train.eval_every=2", f"run.root={tmp_path}"]
    first = train_here(overrides)
    assert first.returncode == 0, first.stderr
    run = only_run(tmp_path)
    args = ["train", "--preset", "demo", *[f"--{o}" for o in overrides], "--resume", str(run)]
    code, out, err = cli(*args)
    assert code == 0 and "has finished" in err and "resumed" not in out
    # the hint names the limit that ended it: max_steps here, not epochs
    assert "--extend --train.max_steps N (it ended at its train.max_steps=4)" in " ".join(err.split()), err
    code, _, err = cli(*args, "--train.max_steps=6")
    assert code == 2 and "--extend" in err
    code, _, err = cli(*args, "--train.max_steps=6", "--extend")
    assert code == 0, err
    assert [r["step"] for r in metrics(run)] == [2, 4, 6]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["extensions"][0]["changes"] == ["train.max_steps: 4 -> 6"]
    # the run's own config is the base: only what changes needs saying
    code, _, err = cli("train", "--resume", str(run), "--extend", "--train.max_steps=8")
    assert code == 0, err
    assert [r["step"] for r in metrics(run)] == [2, 4, 6, 8]
    code, _, err = cli("train", "--preset", "koniq-resnet50", "--resume", str(run))
    one_line_error(code, err, "--preset koniq-resnet50", "was trained from preset demo")
    assert json.loads((run / "summary.json").read_text())["steps_run"] == 8


# ---------------------------------------------------------------- one-line errors, exit 2


@pytest.mark.parametrize("args, expected", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "not a device name"),
    (["--crops", "-1"], "--crops -1: must be at least 1"),
    (["--crops", "0"], "--crops 0: must be at least 1"),
    (["--batch-images", "0"], "--batch-images 0: must be at least 1"),
])
def test_predict_bad_options_are_one_line(single_run, tmp_path, args, expected):
    fixtures.image(tmp_path / "a.png", (150, 120), seed=1)
    code, _, err = cli("predict", str(single_run), str(tmp_path / "a.png"), *args)
    one_line_error(code, err, expected)


def test_csv_errors_say_what_is_there(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "meta.csv").write_text("")
    code, _, err = cli("prepare", "--dataset", "csv", "--root", str(tmp_path / "empty"),
                       "--cache-dir", str(tmp_path / "c"))
    one_line_error(code, err, "meta.csv: the file is empty")
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "meta.csv").write_text("image,mos\n")
    code, _, err = cli("prepare", "--dataset", "csv", "--root", str(tmp_path / "header"),
                       "--cache-dir", str(tmp_path / "c"))
    one_line_error(code, err, "the annotations list no images")


def test_bad_rows_hints_name_real_options(tmp_path):
    root = tmp_path / "small"
    rows = []
    for i in range(6):
        fixtures.image(root / f"{i}.png", (100, 80), seed=i)
        rows.append(f"{i}.png,{i}")
    (root / "meta.csv").write_text("image,mos\n" + "\n".join(rows) + "\n")
    code, _, err = cli("prepare", "--dataset", "csv", "--root", str(root), "--cache-dir", str(tmp_path / "c"),
                       "--data.workers=1")
    assert code == 2 and "6 of 6 images are smaller than the 224-px patch" in err
    assert "--preset" in err and "--data.resize short:224" in err
    for i in range(5):
        fixtures.image(root / f"big{i}.png", (240, 240), seed=10 + i)
    (root / "meta.csv").write_text("image,mos\n" + rows[0] + "\n" + "".join(f"big{i}.png,{i}\n" for i in range(5)))
    code, _, err = cli("prepare", "--dataset", "csv", "--root", str(root), "--cache-dir", str(tmp_path / "c"),
                       "--data.workers=1")
    assert code == 2 and "--data.skip_bad=true" in err and "--skip-bad to drop" not in err
    code, _, err = cli("prepare", "--dataset", "csv", "--root", str(root), "--cache-dir", str(tmp_path / "c"),
                       "--data.workers=1", "--skip-bad", "--data.test_fraction=0.4", "--data.val_fraction=0.34")
    assert code == 0, err
    listed = [p for p in err.split() if p.endswith("meta.json")]
    assert listed and all(Path(p).is_file() and ".partial" not in p for p in listed)


def test_inputs_that_used_to_end_in_a_traceback(single_run, tmp_path):
    """Each of these once raised from deep inside; each is now one line naming the input."""
    fixtures.generic_csv(tmp_path / "d", n=4)
    (tmp_path / "d" / "meta.csv").write_bytes("name,mos\ncaf\xe9.png,3\n".encode("latin-1"))
    prepare = ["prepare", "--dataset", "csv", "--preset", "demo", "--cache-dir", str(tmp_path / "c"), "--data.workers=1"]
    code, _, err = cli(*prepare, "--root", str(tmp_path / "d"))
    one_line_error(code, err, "meta.csv: not UTF-8 text (byte 0xe9")
    fixtures.generic_csv(tmp_path / "e", n=4)
    for resize in ("0x0", "short:0"):
        code, _, err = cli(*prepare, "--root", str(tmp_path / "e"), f"--data.resize={resize}")
        one_line_error(code, err, f"data.resize='{resize}'")
    (tmp_path / "split.json").write_text(json.dumps({"train": "img/000.png"}))
    code, _, err = cli(*prepare, "--root", str(tmp_path / "e"), f"--data.split={tmp_path / 'split.json'}")
    one_line_error(code, err, "split.json: 'train': expected a list of image names")
    code, _, err = cli("evaluate", "--run", str(single_run), "--dataset", "synthetic", "--train.batch_size=3")
    one_line_error(code, err, "--train.batch_size: this command does not read that setting")
    (tmp_path / "file").write_text("")
    code, _, err = cli("evaluate", "--run", str(single_run), "--dataset", "synthetic",
                       "--output", str(tmp_path / "file" / "e.json"))
    one_line_error(code, err, "--output", "cannot make the folder")
    code, _, err = cli("report", str(single_run), "--plot", str(tmp_path / "file"))
    one_line_error(code, err, "--plot", "cannot make the folder")
    fixtures.image(tmp_path / "one.png", (160, 160), seed=1)
    code, _, err = cli("predict", str(single_run), str(tmp_path / "one.png"), "--format", "csv",
                       "--output", str(tmp_path / "new" / "deeper" / "p.csv"))
    assert code == 0 and (tmp_path / "new" / "deeper" / "p.csv").read_text().startswith("path,score"), err


def test_sweep_options_are_checked_before_a_group_is_made(single_run, tmp_path):
    code, _, err = cli("sweep", "splits", "--n", "0", "--preset", "demo", f"--run.root={tmp_path}")
    one_line_error(code, err, "--n 0: must be at least 1")
    code, _, err = cli("sweep", "cross", "--run", str(single_run), "--dataset", f"kadid10k={tmp_path}",
                       "--train.epochs=3", f"--run.root={tmp_path}")
    one_line_error(code, err, "sweep cross: --train.epochs is not read by evaluation")
    assert not list(tmp_path.iterdir())


def test_damaged_weights_checkpoints_and_workbooks_are_named(single_run, tiny_overrides, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not weights at all")
    code, _, err = cli("train", "--preset", "demo", *[f"--{o}" for o in tiny_overrides],
                       f"--model.pretrained={tmp_path / 'bad.safetensors'}", f"--run.root={tmp_path / 'r'}")
    one_line_error(code, err, "bad.safetensors", "timm cannot load it as swin_tiny")
    assert not (tmp_path / "r").exists()
    run = tmp_path / "runs" / single_run.name
    shutil.copytree(single_run, run)
    (run / "summary.json").unlink()
    latest = sorted((run / "checkpoints").iterdir())[-1]
    (latest / "model.safetensors").write_bytes((latest / "model.safetensors").read_bytes()[:100])
    code, _, err = cli("train", "--preset", "demo", *[f"--{o}" for o in [*tiny_overrides, *RUN]],
                       f"--run.root={tmp_path / 'runs'}", "--resume", str(run))
    assert code == 2 and "Traceback" not in err, err  # after the data's "up to date" lines, one error line
    assert err.strip().splitlines()[-1].startswith(f"error: --resume: checkpoint {latest} cannot be read"), err
    assert "move that folder away" in err
    sheet = tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.xlsx"
    sheet.parent.mkdir(parents=True)
    sheet.write_bytes(b"PK not really a workbook")
    code, _, err = cli("prepare", "--dataset", "spaq", "--root", str(tmp_path / "spaq"),
                       "--cache-dir", str(tmp_path / "c"))
    one_line_error(code, err, "scores.xlsx: not a readable .xlsx workbook")


@pytest.mark.parametrize("args,expected", [(["--batch", "abc"], "--batch abc: expected positive whole numbers"),
                                           (["--batch", "12,0"], "--batch 12,0: expected positive"),
                                           (["--backbones", "nosuch"], "--backbones: 'nosuch' is not one of tiny"),
                                           (["--precisions", "fp16"], "--precisions: 'fp16' is not one of fp32, bf16"),
                                           (["--steps", "0"], "--steps 0: must be at least 1")])
def test_bench_options_are_checked_first(args, expected):
    code, _, err = cli("bench", "train", *args)
    one_line_error(code, err, expected)


def test_bench_on_a_gpu_that_is_not_there(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli("bench", "eval", "--device", "cuda")
    one_line_error(code, err, "--device cuda: no CUDA GPU is visible")


def test_predict_on_a_folder_without_images_says_so(single_run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    code, _, err = cli("predict", str(single_run), str(tmp_path / "empty"))
    assert code == 1 and "a folder with no images in it" in err and "Traceback" not in err, err


def test_a_tracker_that_is_not_installed_fails_at_start(tiny_overrides, tmp_path, monkeypatch):
    import iqa_dist.distributed.accelerators as accelerators

    monkeypatch.setattr(accelerators, "is_wandb_available", lambda: None)  # as Accelerate says it
    code, _, err = cli("train", "--preset", "demo", *[f"--{o}" for o in tiny_overrides],
                       "--run.log_with=wandb", f"--run.root={tmp_path}")
    one_line_error(code, err, "run.log_with=wandb: the wandb package is not installed")
    assert not list(tmp_path.iterdir())


def test_a_scale_the_model_never_saw_is_explained(single_run, tmp_path):
    fixtures.image(tmp_path / "one.png", (160, 160), seed=1)
    code, _, err = cli("predict", str(single_run), str(tmp_path / "one.png"), "--scale", "koniq10k")
    one_line_error(code, err, "--scale koniq10k: this model trained on synthetic only", "its scale is the default")


def test_damaged_run_files_are_named_and_a_cut_metrics_line_is_skipped(single_run, tmp_path):
    run = tmp_path / single_run.name
    shutil.copytree(single_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_lo')  # the process was killed while writing
    code, out, err = cli("report", str(run))
    assert code == 0 and "1 run(s)" in out, err
    (run / "summary.json").write_text('{"test": ')
    code, _, err = cli("report", str(run))
    one_line_error(code, err, "summary.json: damaged JSON (line 1")


def test_rows_that_used_to_pass_unnoticed(tmp_path):
    """An image listed twice (it could sit in train and test), a row with more fields than the
    header (an unquoted comma) and a mistyped split word are bad rows, not silently accepted."""
    fixtures.generic_csv(tmp_path / "d", n=8, split=True)
    meta = tmp_path / "d" / "meta.csv"
    lines = meta.read_text().splitlines()
    prepare = ["prepare", "--dataset", "csv", "--preset", "demo", "--root", str(tmp_path / "d"), "--cache-dir",
               str(tmp_path / "c"), "--data.workers=1", "--data.split=official"]
    meta.write_text("\n".join([*lines, "img/000.png,0.7,0.1,test", "img/001.png,0.5,0.1,test,extra"]) + "\n")
    code, _, err = cli(*prepare)
    assert code == 2 and "Traceback" not in err, err
    assert "meta.csv row 10 (img/000.png): listed twice (first at row 2)" in err
    assert "meta.csv row 11 (img/001.png): 1 more field(s) than the header has columns" in err
    meta.write_text("\n".join([*lines[:-1], lines[-1].replace(",train", ",tset")]) + "\n")
    code, _, err = cli(*prepare)
    one_line_error(code, err, "meta.csv row 9: split 'tset' is not train/val/test")


def test_a_root_for_the_synthetic_dataset_is_refused(tmp_path):
    """`train --preset demo --data.root MINE` without --data.dataset trained on the synthetic set
    after one warning line: refused in one line that names the option, before any work."""
    for command in (["train", "--preset", "demo", "--run.root", str(tmp_path / "r")], ["prepare", "--dataset", "synthetic"]):
        code, _, err = cli(*command, "--data.root", str(tmp_path / "mine"), "--data.cache_dir", str(tmp_path / "c"))
        one_line_error(code, err, "with data.dataset=synthetic", "give --data.dataset too (csv for a CSV")
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_unknown_options_suggest_the_full_key():
    code, _, err = cli("train", "--preset", "demo", "--lr", "1e-3")
    one_line_error(code, err, "unknown option --lr; did you mean --optim.lr?")


# ---------------------------------------------------------------- output


def test_logs_never_wrap_a_message(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 6) / "data"
    code, _, err = cli("prepare", "--dataset", "koniq10k", "--root", str(deep), "--cache-dir", str(tmp_path))
    one_line_error(code, err, str(deep))
    wide = console()
    assert wide.width >= 1000 and not wide.is_terminal  # pipes and files get the long lines whole


def test_eta_is_smoothed_over_evaluation_pauses():
    display = Display(console(quiet=True), total_steps=2000, steps_per_epoch=100, log_every=50)
    now = [1000.0]
    etas = []
    for step in range(1, 1001):
        now[0] += 0.1 + (30.0 if step % 100 == 0 else 0.0)  # a 30 s evaluation every 100 steps
        display.times.append((now[0], step))
        if step % 50 == 0 and step >= 500:
            etas.append((2000 - step) / display.rate())
    per_step = (0.1 * 100 + 30) / 100  # the true average, evaluations included
    for step, eta in zip(range(500, 1001, 50), etas):
        assert eta == pytest.approx((2000 - step) * per_step, rel=0.1)
    display.close()


def test_the_first_line_after_a_resume_has_no_speed_yet(capsys):
    display = Display(console(), total_steps=100, steps_per_epoch=10, log_every=5)
    display.times.append((1000.0, 20))
    display.line(20, 0.5, 1e-4)
    display.close()
    out = capsys.readouterr().out
    assert "speed not yet measured" in out and "nan" not in out and "0.00 steps/s" not in out


def test_version_and_help_that_starts_with_what_matters():
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("iqa-dist ")
    code, out, _ = cli("train", "--help")
    assert code == 0 and "examples:" in out
    common = out.index("most used options")
    assert out.index("examples:") < common < out.index("--data.cache_dir")
    for key in ("--data.root", "--optim.lr", "--train.epochs", "--train.batch_size", "--run.name"):
        assert common < out.index(f"  {key} V", common) < out.index("--data.cache_dir"), key
    code, out, _ = cli("evaluate", "--help")
    assert code == 0 and "--data.split" in out and "--allow-train-overlap" in out
    for key in ("--optim.lr", "--train.epochs", "--model.backbone", "--augment.hue", "--data.train_patch_num"):
        assert key not in out, key


def test_startup_lines(tiny_overrides, tmp_path):
    out = train_here([*tiny_overrides, *RUN, "train.max_steps=1", "train.eval_every=1", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "1 process, precision fp32; batch 16 patches per step = 1 process(es) x 1 micro-batch(es) x 16 patches" in text
    assert "optimizer: adamw; groups: backbone" in text
    assert "validation images" not in text  # 31: enough to rank (a small set is warned about: see the csv run below)



def test_demo_preempted_says_one_line_and_exits_124(tiny_overrides, tmp_path, monkeypatch):
    """SIGUSR1 while the demo trains: one line, exit 124, no traceback."""
    import signal

    from iqa_dist.training import trainer as trainer_module

    step = trainer_module.Trainer.step

    def warned(self, batch):
        step(self, batch)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "step", warned)
    out = here("demo", *[f"--{o}" for o in tiny_overrides], "--train.max_steps=400", "--train.eval_every=400",
               f"--run.root={tmp_path}")
    assert out.returncode == 124, out.stderr
    assert "Traceback" not in out.stderr and "preempted at step" in out.stderr and "relaunch to resume" in out.stderr


def test_a_run_root_that_cannot_be_written_fails_before_the_data(tiny_overrides, tmp_path):
    """A read-only (or immutable) --run.root: one line naming the folder, exit 2, before any data
    is prepared (no cache work is wasted); a truncated model.safetensors in predict: one line."""
    if os.geteuid() == 0:  # root writes through permission bits: stand in a read-only path another way
        blocker = tmp_path / "file"
        blocker.write_text("a file where the runs folder should be")
        root = blocker / "runs"
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    code, out, err = cli("train", "--preset", "demo", *[f"--{o}" for o in tiny_overrides],
                         "--data.cache_dir", str(tmp_path / "fresh-cache"), f"--run.root={root}")
    one_line_error(code, err, f"{root}: cannot write run outputs there")
    assert not (tmp_path / "fresh-cache").exists()  # nothing was prepared


def test_a_truncated_model_file_is_one_line_in_predict(single_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(single_run / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    image = tmp_path / "a.png"
    fixtures.image(image, (120, 90), seed=1)
    code, _, err = cli("predict", str(model), str(image))
    one_line_error(code, err, f"{weights}: cannot be read as this model's weights")


def test_evaluate_reuses_the_training_runs_cache(single_run, tmp_path):
    """evaluate of a run reads the run's data.cache_dir (not the default folder); when that folder
    is gone it says so and builds in the default one."""
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    config = run / "config.yaml"
    own = tmp_path / "the-runs-cache"
    text = config.read_text()
    old_cache = next(line for line in text.splitlines() if line.strip().startswith("cache_dir:"))
    config.write_text(text.replace(old_cache, f"  cache_dir: {own}"))
    code, _, err = cli("evaluate", "--run", str(run), "--dataset", "synthetic", "--output", str(tmp_path / "a.json"))
    assert code == 0 and "is not there any more" in err, err
    own.mkdir()
    code, _, err = cli("evaluate", "--run", str(run), "--dataset", "synthetic", "--output", str(tmp_path / "b.json"))
    assert code == 0 and "is not there any more" not in err, err
    assert any(p.name.startswith("synthetic-") for p in own.iterdir())  # built in the run's cache folder
    a, b = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "b.json"))
    assert a == b


def test_sweep_table_says_stopped_failed_and_why(tmp_path):
    """A member stopped on request (exit 124, checkpointed) is 'stopped (resumable)', a failed one
    shows its one-line error, best epochs print as epochs; `sweep collect` on such a group exits 1."""
    group = tmp_path / "20261127-000000-sweep-ablation"
    group.mkdir()
    (group / "sweep.json").write_text(json.dumps({"kind": "ablation"}))
    (group / "members.jsonl").write_text("".join(json.dumps({"name": n, "args": []}) + "\n" for n in ("ok", "halt", "bad")))
    (group / "status.json").write_text(json.dumps({"ok": 0, "halt": 124, "bad": 2}))
    (group / "bad.log").write_text("parameters: ...\nerror: data.root=/nowhere: no such folder\n")
    run = group / "20261127-000001-ok"
    run.mkdir()
    (run / "config.yaml").write_text("data: {}\n")
    (run / "summary.json").write_text(json.dumps({"val": {"srcc": 0.5, "plcc": 0.5}, "test": {"srcc": 0.4, "plcc": 0.4},
                                                  "best_epoch": 0.25}))
    code, out, err = cli("sweep", "collect", str(group))
    assert code == 1, err
    assert "stopped (resumable)" in out and "failed (exit 2): data.root=/nowhere: no such folder" in out
    assert " 0.25 " in out and "0.2500" not in out.split("ok", 1)[1].splitlines()[0]
    assert "2 of 3 member(s) did not finish" in err


def test_the_live_bar_says_when_it_evaluates():
    import io

    from rich.console import Console

    out = io.StringIO()
    display = Display(Console(file=out, force_terminal=True, width=200), total_steps=10, steps_per_epoch=5,
                      log_every=5)
    display.step(5)
    display.evaluating(42)
    display.close()
    assert "evaluating 42 validation images" in out.getvalue()


def test_a_bad_config_value_is_reported_before_torch_loads():
    """Checked in a fresh interpreter: the one line comes without importing torch (seconds sooner)."""
    import subprocess
    import sys

    code = ("import sys\nfrom iqa_dist.cli import main\ntry:\n    main(['train', '--preset', 'demo', '--optim.lr=abc'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert "optim.lr='abc': expected float" in out.stderr


def test_openmp_waits_passively_unless_the_user_chose(monkeypatch):
    """Set by the CLI before torch loads: OpenMP's spinning threads would take the cores from any
    other process (the measured effect is in BENCHMARKS.md)."""
    from iqa_dist.cli import wait_passively

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    wait_passively()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    wait_passively()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="about a machine without CUDA")
def test_fp16_on_the_cpu_is_refused_in_one_line_instead_of_training_fp32_recorded_as_fp16(tmp_path, monkeypatch):
    """Accelerate runs fp16 on the CPU as fp32 (no autocast, no scaler): a run that said fp16 and
    trained fp32 was a wrong record. From the preset or from accelerate launch alike."""
    code, _, err = cli("train", "--preset", "demo", "--train.mixed_precision", "fp16", f"--run.root={tmp_path}")
    one_line_error(code, err, "train.mixed_precision=fp16 on the CPU", "use bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    code, _, err = cli("train", "--preset", "demo", "--train.mixed_precision", "launcher", f"--run.root={tmp_path}")
    one_line_error(code, err, "train.mixed_precision=fp16 on the CPU", "use bf16")
    assert not any(tmp_path.iterdir())


def test_constant_scores_are_refused_in_one_line(tiny_overrides, tmp_path):
    """Every training image with one score (a wrong score column, an unfilled annotation): nothing
    to learn or rank; it trained silently with "-" metrics."""
    fixtures.generic_csv(tmp_path / "d", n=12)
    meta = tmp_path / "d" / "meta.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], *[",".join([r.split(",")[0], "3.5", "0.1"]) for r in lines[1:]]]) + "\n")
    overrides = [f"--{o}" for o in tiny_overrides if "synthetic" not in o]
    code, _, err = cli("train", "--preset", "demo", *overrides, "--data.dataset=csv", f"--data.root={tmp_path / 'd'}",
                       "--train.max_steps=1", f"--run.root={tmp_path / 'r'}")
    one_line_error(code, err, "csv: every training image scores 3.5: nothing to learn or rank")
    assert not (tmp_path / "r").exists()


def test_the_readmes_own_csv_dataset_commands_run_as_written(tiny_overrides, tmp_path, monkeypatch):
    """The README's "Your own dataset" commands, as written there, on a small CSV dataset laid out as
    it shows (image, mos, content), each with only the tiny model's options added."""
    import glob
    import re
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- test:csv.*?-->\n```bash\n(.*?)```", readme, re.S).group(1)
    commands = [shlex.split(line.split("  #")[0]) for line in block.strip().splitlines()]
    assert [c[1] for c in commands] == ["prepare", "train", "evaluate", "predict"]
    root = tmp_path / "mine"
    fixtures.generic_csv(root, n=24)
    rows = (root / "meta.csv").read_text().splitlines()  # name,mos,std -> image,mos,content (4 contents)
    (root / "meta.csv").unlink()
    (root / "scores.csv").write_text("image,mos,content\n" + "".join(
        f"{r.split(',')[0]},{float(r.split(',')[1]) * 100},scene{i % 4}\n" for i, r in enumerate(rows[1:])))
    (tmp_path / "new").mkdir()
    shutil.copy(root / "img" / "000.png", tmp_path / "new" / "a.png")
    monkeypatch.chdir(tmp_path)
    model = [o for o in tiny_overrides if o.startswith("model.")]
    extra = {"prepare": ["model.img_size=64"], "train": [*model, "train.max_steps=2", "data.test_fraction=0.25",
                                         "data.val_fraction=0.34", "train.batch_size=8"], "evaluate": [], "predict": []}
    for command in commands:
        args = [a.replace("/data/mine", str(root)).replace("/data/new-photos", str(tmp_path / "new")) for a in command[1:]]
        args = [glob.glob(a)[0] if "*" in a else a for a in args]
        if args[0] == "prepare":
            args += ["--data.test_fraction=0.25", "--data.val_fraction=0.34"]
        out = here(*args, *[f"--{o}" for o in extra[args[0]]])
        assert out.returncode == 0, (args, out.stderr[-2000:])
    scored = (tmp_path / "scores.csv").read_text().splitlines()
    assert scored[0].startswith("path,score") and scored[1].startswith(str(tmp_path / "new" / "a.png")), scored
