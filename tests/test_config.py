"""The typed config: presets, overrides, validation, and the CLI that exposes them."""

from __future__ import annotations

import dataclasses
import re

import pytest

from iqa_dist.cli import COMMANDS, build_parser
from iqa_dist.config import SECTIONS, config_from_yaml, field_docs, load_config, preset_names
from iqa_dist.errors import UserError

from .conftest import here, run_cli


def test_presets_load_and_encode_their_recipes():
    assert set(preset_names()) >= {"koniq-swin-t", "koniq-resnet50", "koniq-swin-b-long", "demo"}
    t = load_config("koniq-swin-t")
    assert (t.model.backbone, t.model.fusion, t.model.dropout, t.model.drop_path) == ("swin_tiny_patch4_window7_224.ms_in1k", "concat", 0.3, 0.2)
    assert (t.optim.lr, t.optim.lr_ratio, t.optim.weight_decay, t.optim.grad_clip) == (1e-5, 10.0, 1e-4, 1.0)
    assert (t.train.batch_size, t.train.epochs, t.train.patience, t.train.mixed_precision) == (96, 30, 7, "bf16")
    assert (t.augment.brightness, t.augment.contrast, t.augment.saturation, t.augment.hue) == (0.1, 0.1, 0.1, 0.05)
    assert t.data.resize == "512x384" and t.data.score_column == "MOS_zscore"
    r = load_config("koniq-resnet50")
    assert (r.model.backbone, r.optim.lr, r.optim.weight_decay, r.train.epochs, r.data.train_patch_num) == ("resnet50.tv_in1k", 2e-5, 5e-4, 16, 25)
    assert r.model.dropout == 0 and r.augment.brightness == r.augment.hue == 0
    b = load_config("koniq-swin-b-long")
    assert b.model.backbone.startswith("swin_base") and b.train.epochs == 60 and b.optim.warmup_steps > 0
    assert b.model.drop_path > t.model.drop_path
    assert load_config("demo").data.dataset == "synthetic"


def test_overrides_apply_with_types():
    cfg = load_config("koniq-swin-t", ["optim.lr=3e-4", "train.epochs=5", "augment.hflip=false",
                                       "model.backbone_kwargs.embed_dim=32", "model.hyper_hidden=[64, 32]",
                                       "--train.compile=true"])
    assert cfg.optim.lr == 3e-4 and cfg.train.epochs == 5 and cfg.augment.hflip is False
    assert cfg.model.backbone_kwargs == {"embed_dim": 32} and cfg.model.hyper_hidden == [64, 32]
    assert cfg.train.compile is True


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("optm.lr=1", "did you mean 'optim.lr'"),
    ("train.epochs=abc", "train.epochs='abc': expected int"),
    ("train.epochs=2.5", "expected int"),
    ("model.fusion=concatt", "did you mean 'concat'"),
    ("train.batch_size=0", "must be positive"),
    ("data.resize=512", "expected auto, none, WxH"),
    ("augment.hue=0.7", "at most 0.5"),
    ("data.val_fraction=1.5", "strictly between 0 and 1"),
    ("model.target_hidden=[100, 56, 28, 14]", "feature_size^2"),
    ("noequals", "expected section.field=value"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("koniq-swin-t", [override])


def test_preset_from_yaml_file_and_roundtrip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 2.0e-5\ntrain:\n  epochs: 3\n")
    cfg = load_config(str(path))
    assert cfg.optim.lr == 2e-5 and cfg.train.epochs == 3 and cfg.run_name() == "mine"
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert config_from_yaml(saved) == cfg
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown key 'optim.learning_rate'"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(UserError, match="did you mean 'koniq-swin-t'"):
        load_config("koniq-swin")


def test_every_field_is_documented():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: undocumented fields {missing}"


def test_cli_help_lists_fields_with_docs():
    out = here("train", "--help")
    assert out.returncode == 0
    assert "--optim.lr" in out.stdout and "backbone learning rate" in out.stdout
    assert "--data.train_patches" in out.stdout and "--model.fusion" in out.stdout


def test_cli_bad_option_exits_without_traceback():
    out = here("train", "--preset", "demo", "--optim.lrr=1")
    assert out.returncode == 2
    assert "did you mean --optim.lr" in out.stderr and "Traceback" not in out.stderr
    out = here("train", "--preset", "nosuch")
    assert out.returncode == 2 and "nosuch" in out.stderr and "Traceback" not in out.stderr


def test_every_subcommand_exists(capsys):
    assert set(COMMANDS) >= {"prepare", "train", "evaluate", "predict", "report", "bench", "demo", "sweep"}
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0 and COMMANDS[name][0].split()[0] in capsys.readouterr().out, name
    assert run_cli("--help").returncode == 0  # `python -m iqa_dist` is the same program


def test_switching_dataset_drops_the_presets_dataset_fields():
    from iqa_dist.config import load_config_for

    cfg = load_config_for("koniq-swin-t", ["data.dataset=spaq", "data.root=/x"])
    assert (cfg.data.score_column, cfg.data.resize, cfg.data.split) == ("", "auto", "random")
    assert cfg.model.backbone == "swin_tiny_patch4_window7_224.ms_in1k"  # the recipe itself stays
    kept = load_config_for("koniq-swin-t", ["data.dataset=spaq", "data.score_column=Sharpness"])
    assert kept.data.score_column == "Sharpness"
    same = load_config_for("koniq-swin-t", ["data.root=/x"])
    assert same.data.score_column == "MOS_zscore" and same.data.resize == "512x384"


def test_string_fields_take_the_text_as_typed():
    """YAML would read `no` as False: `--train.mixed_precision=no` (the README's setting) is a string."""
    cfg = load_config("koniq-swin-t", ["train.mixed_precision=no", "run.name=off", "data.root=/data/a b"])
    assert (cfg.train.mixed_precision, cfg.run.name, cfg.data.root) == ("no", "off", "/data/a b")
