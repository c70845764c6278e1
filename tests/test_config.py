"""The typed config: presets, overrides, validation, and the CLI that exposes them."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from iqa_dist.cli import COMMANDS, build_parser
from iqa_dist.config import SECTIONS, config_from_yaml, field_docs, load_config, preset_names
from iqa_dist.errors import UserError

from .conftest import here, run_cli

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_preset_round_trips_and_the_readme_table_names_its_weights(tmp_path):
    """Each shipped preset loads (its keys are real fields of the right types), survives the trip
    through a run's config.yaml unchanged, and has a row in the README's presets table that names
    the backbone tag it starts from (or "none" for a random init): the table a user chooses by."""
    rows = {line.split("|")[1].strip().strip("`"): line for line in README.read_text().splitlines()
            if line.startswith("| `")}
    for name in preset_names():
        cfg = load_config(name)
        saved = tmp_path / f"{name}.yaml"
        saved.write_text(cfg.to_yaml())
        assert config_from_yaml(saved) == cfg, name
        assert name in rows, f"preset {name} has no row in the README's presets table"
        weights = rows[name].split("|")[3]
        expected = "none" if cfg.model.pretrained == "none" else f"`{cfg.model.backbone}`"
        assert expected in weights, (name, weights)


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
    ("optim.lr=inf", "optim.lr='inf': must be a finite number"),  # it would make a run folder, then stop at step 1
    ("optim.weight_decay=nan", "must be a finite number"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("koniq-swin-t", [override])


def test_whole_numbers_in_exponent_form_are_integers():
    """YAML reads 1e9 (no dot) as a string: an int field takes it as the whole number it is."""
    assert load_config("koniq-swin-t", ["train.batch_size=1e9"]).train.batch_size == 10**9
    assert load_config("koniq-swin-t", ["train.max_steps=2e3"]).train.max_steps == 2000


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


def _commands(help_text: str) -> list[str]:
    """The example commands of a --help, continuation lines joined, comments dropped."""
    block = help_text.split("examples:\n", 1)[1].split("\n\n", 1)[0]
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [" ".join(line.split("  # ")[0].split()) for line in joined.splitlines() if not line.strip().startswith("#")]


def test_every_subcommand_documents_every_option(capsys, monkeypatch):
    """Each command's --help exits 0 with its own usage line and examples, no option of any command
    is left without a help text, and at 80 columns no line runs past the edge: prose re-wrapped,
    the example commands broken with continuations so that they are the same commands as on a
    wide terminal."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(COMMANDS)

    def help_of(name: str, columns: int) -> str:
        monkeypatch.setenv("COLUMNS", str(columns))
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([name, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    for name, sub in commands.choices.items():
        bare = [a.option_strings or a.dest for a in sub._actions
                if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
        assert not bare, f"{name}: options without help: {bare}"
        text = help_of(name, 80)
        assert f"usage: iqa-dist {name}" in text and "examples:" in text, name
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert not wide, (name, wide)
        assert _commands(text) == _commands(help_of(name, 250)), name
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
