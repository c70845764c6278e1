"""Teacher-student distillation (`train --teacher MODEL`): trained models predict each training
patch on the student's target scale, their L1 joins the loss; 1 and 2 processes train alike, the
step never waits for the device, and a teacher that cannot teach this student is refused in one
line before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from iqa_dist.artifacts.card import ModelCard
from iqa_dist.bench.rig import StepRig
from iqa_dist.config import load_config
from iqa_dist.data.targets import Scale
from iqa_dist.errors import UserError
from iqa_dist.scoring.predict import load_model
from iqa_dist.training.teacher import build_teacher, find_teachers

from .conftest import RUN, assert_same_training, cli, cut_at_first_step, launch_here, metrics, only_run, train_here
from .test_audit import audited_steps, store, tiny_recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def renormalised(single_run, tmp_path_factory):
    """single_run's model as a model that normalises its input otherwise (another mean and std):
    the same weights, so a teacher must renormalise the student's patch for it."""
    folder = tmp_path_factory.mktemp("teacher") / "model"
    shutil.copytree(single_run / "model", folder)
    card = json.loads((folder / "config.json").read_text())
    card["mean"], card["std"] = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (folder / "config.json").write_text(json.dumps(card))
    return folder


def test_the_teacher_predicts_each_patch_on_the_students_target_scale(single_run, renormalised, tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, f"optim.teachers={json.dumps([str(single_run), str(renormalised)])}",
                               "optim.teacher_weight=1"])
    student = Scale("range", 10.0, 50.0)  # another score -> target map than the teacher's own
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    span = ModelCard.read(single_run / "model").datasets["synthetic"].score_range
    teacher = build_teacher(find_teachers(cfg, "synthetic"), "synthetic", span, student, mean, std, CPU)
    x = torch.randn(5, 3, cfg.model.img_size, cfg.model.img_size)
    expected = []
    for path in (single_run, renormalised):
        scorer = load_model(path, CPU)
        card = ModelCard.read(scorer.folder)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        mt, st = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
        pixels = x * s + m  # the patch in [0, 1] units, normalised as this member normalises
        with torch.no_grad():
            out = scorer.model((pixels - mt) / st).double().numpy()
        expected.append(student.to_target(card.scale("synthetic").to_score(out)))
    teacher.train()  # a teacher stays in eval mode
    with torch.no_grad():
        taught = teacher(x).double().numpy()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert taught == pytest.approx((expected[0] + expected[1]) / 2, rel=1e-5, abs=1e-6)


def test_a_taught_step_never_waits_for_the_device(single_run):
    cfg = tiny_recipe()
    r = StepRig.build(cfg, store(), "fp32", 8, CPU)
    teacher_cfg = load_config("demo", [f"optim.teachers={json.dumps([str(single_run)])}", "model.img_size=64"])
    span = ModelCard.read(single_run / "model").datasets["synthetic"].score_range
    teacher = build_teacher(find_teachers(teacher_cfg, "synthetic"), "synthetic", span, Scale("range", 0.0, 100.0),
                            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), CPU)
    r.trainer.teacher, r.trainer.distill_weight = teacher, 1.0
    for _ in range(2):
        r.end_to_end()
    assert "teacher" in audited_steps(r, [*teacher.parameters(), *teacher.buffers()])["parts"]


def test_a_taught_run_trains_alike_on_one_and_two_processes(single_run, tiny_overrides, tmp_path):
    """The teacher's L1 joins the loss (the run trains other numbers than the same run untaught),
    the run's meta.json names its teacher, and 2 processes train what 1 does."""
    taught = [*tiny_overrides, *RUN, f"optim.teachers={json.dumps([str(single_run)])}", "optim.teacher_weight=1"]
    one = train_here([*taught, f"run.root={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert f"taught by {single_run}, weight 1.0" in one.stdout + one.stderr
    run = only_run(tmp_path / "one")
    [recorded] = json.loads((run / "meta.json").read_text())["teachers"]
    assert recorded["model"] == str(single_run) and len(recorded["sha256"]) == 64
    assert [r["train_loss"] for r in metrics(run)] != [r["train_loss"] for r in metrics(single_run)]
    two = launch_here("train", "--preset", "demo", *[f"--{o}" for o in [*taught, f"run.root={tmp_path / 'two'}"]])
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_training(metrics(run), metrics(only_run(tmp_path / "two")))


def test_a_teacher_that_cannot_teach_this_student_is_refused_in_one_line(single_run, tiny_overrides, tmp_path):
    base = ["train", "--preset", "demo", *[f"--{o}" for o in tiny_overrides], f"--run.root={tmp_path / 'runs'}"]
    code, _, err = cli(*base, "--teacher", str(single_run), "--model.img_size=32")
    assert code == 2 and "Traceback" not in err and "scores 64-px patches and the student trains on 32-px" in err, err
    other = tmp_path / "csv-model"
    shutil.copytree(single_run / "model", other)
    card = json.loads((other / "config.json").read_text())
    card["datasets"] = {"csv": card["datasets"]["synthetic"]}
    (other / "config.json").write_text(json.dumps(card))
    code, _, err = cli(*base, "--teacher", str(other))
    assert code == 2 and "it trained on csv, the student on synthetic" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written
    span = tmp_path / "0-1-model"  # a teacher of the same dataset name whose scores span 0-1 (an imported model's)
    shutil.copytree(single_run / "model", span)
    card = json.loads((span / "config.json").read_text())
    card["datasets"]["synthetic"]["score_range"] = [0.0, 1.0]
    (span / "config.json").write_text(json.dumps(card))
    code, _, err = cli(*base, "--teacher", str(span))
    assert code == 2 and "its synthetic scores span 0-1 and the student's span 0-100" in err, err
    code, _, err = cli(*base, "--teacher", str(single_run), "--optim.teacher_weight=0")
    assert code == 2 and "a teacher needs a weight above 0" in err, err
    with pytest.raises(UserError, match="one teacher per run"):
        load_config("demo", ["optim.teachers=[a]", "optim.teacher_weight=1", "optim.distill_weight=0.5",
                             "train.ema_decay=0.9"])


def test_a_taught_run_resumes_exactly_and_refuses_a_changed_teacher(single_run, tiny_overrides, tmp_path,
                                                                    monkeypatch):
    """The teacher is rebuilt from the run's config on --resume: the same numbers as without the
    stop; a teacher whose weights changed meanwhile (its run trained on, a file replaced) is
    refused in one line, since it would teach other numbers."""
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(single_run / "model", teacher)
    taught = [*tiny_overrides, *RUN, f"optim.teachers={json.dumps([str(teacher)])}"]
    ref = train_here([*taught, f"run.root={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = cut_at_first_step(taught, tmp_path / "cut", monkeypatch)
    weights = teacher / "model.safetensors"
    original = weights.read_bytes()
    changed = load_file(str(weights))
    name = next(iter(changed))
    changed[name] = changed[name] + 1e-3
    save_file(changed, str(weights))
    refused = train_here(taught, resume=str(run))
    assert refused.returncode == 2 and "its teachers' weights are not the ones it began with" in refused.stderr, \
        refused.stderr[-2000:]
    weights.write_bytes(original)
    again = train_here(taught, resume=str(run))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    a, b = metrics(only_run(tmp_path / "ref")), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for x, y in zip(a, b):  # the loss window's float32 sums meet in another order across the stop
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-6)
        assert y["val_srcc"] == pytest.approx(x["val_srcc"], abs=1e-6)
        assert y["val_rmse"] == pytest.approx(x["val_rmse"], abs=1e-5)


def test_a_teachers_training_images_are_the_students_for_evaluate(single_run, tiny_overrides, cache_root, tmp_path):
    """A teacher trained on another split of the dataset has seen images of the student's test
    split: the student's record holds them, so `evaluate` refuses to call its test split held out."""
    other = train_here([*tiny_overrides, *RUN, "data.split_seed=1", f"run.root={tmp_path / 'other'}"])
    assert other.returncode == 0, other.stderr[-2000:]
    student = train_here([*tiny_overrides, *RUN, f"optim.teachers={json.dumps([str(only_run(tmp_path / 'other'))])}",
                          f"run.root={tmp_path / 'student'}"])
    assert student.returncode == 0, student.stderr[-2000:]
    code, _, err = cli("evaluate", "--run", str(only_run(tmp_path / "student")), "--dataset", "synthetic",
                       f"--data.cache_dir={cache_root}")
    assert code == 2 and "images this model trained on" in err, err
    code, _, err = cli("evaluate", "--run", str(single_run), "--dataset", "synthetic", f"--data.cache_dir={cache_root}")
    assert code == 0, err  # the same split untaught: held out


def test_a_jointly_trained_teacher_teaches_on_the_students_datasets_scale(single_run, tiny_overrides, tmp_path):
    joint = tmp_path / "joint"
    shutil.copytree(single_run / "model", joint)
    card = json.loads((joint / "config.json").read_text())
    card["datasets"]["csv"] = {**card["datasets"]["synthetic"], "scale": {"kind": "range", "shift": 1.0, "scale": 4.0}}
    (joint / "config.json").write_text(json.dumps(card))
    cfg = load_config("demo", [*tiny_overrides, f"optim.teachers={json.dumps([str(joint)])}"])
    span = ModelCard.read(joint).datasets["synthetic"].score_range
    student = ModelCard.read(joint).scale("synthetic")  # the teacher's own synthetic map: gain 1, offset 0
    teacher = build_teacher(find_teachers(cfg, "synthetic"), "synthetic", span, student,
                            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), CPU)
    x = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        assert torch.allclose(teacher(x), load_model(single_run, CPU).model(x).float(), atol=1e-6)
