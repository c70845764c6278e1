"""Reading a config: a preset (a shipped name or a YAML file), then `section.field=value`
overrides, type-checked against the schema; and a run's saved `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import UserError
from .schema import DATASET_FIELDS, SECTIONS, Config, DataConfig, all_keys


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("iqa_dist.presets").iterdir() if p.name.endswith(".yaml"))


def _read_preset(preset: str) -> tuple[dict, str]:
    """Returns the raw mapping and the preset's name."""
    path = Path(preset)
    if preset in preset_names():
        text = resources.files("iqa_dist.presets").joinpath(f"{preset}.yaml").read_text()
        name = preset
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        text, name = path.read_text(), str(path)
    else:
        hint = difflib.get_close_matches(preset, preset_names(), n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(f"preset {preset!r} is neither a shipped preset ({', '.join(preset_names())}) nor a YAML file{more}")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"preset {name}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"preset {name}: expected a mapping of sections, got {type(raw).__name__}")
    raw.pop("preset", None)
    return raw, name


def _unknown(key: str, candidates: Sequence[str], where: str) -> UserError:
    hint = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    more = f"; did you mean {hint[0]!r}?" if hint else ""
    return UserError(f"{where}: unknown key {key!r}{more}")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Checks `value` against the field type; ints are accepted for floats, scalars for strings."""
    origin = typing.get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        number = _number(value)  # 1e9 is a whole number too (YAML reads it as a string, 1.0e9 as a float)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
    elif origin is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{key}={value!r}: must be a finite number")
            return number
    elif origin is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a field type this function does not know is a programming error
        raise TypeError(f"{key}: unsupported config type {typ}")
    name = getattr(origin, "__name__", str(origin))
    raise UserError(f"{key}={value!r}: expected {name}, got {type(value).__name__}")


def _number(value: Any) -> float | None:
    """A YAML value as a number, or None: YAML 1.1 reads "1e-3" and "1e9" (no dot) as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _set(tree: dict, key: str, value: Any, where: str) -> None:
    """Sets `section.field` (or `section.dictfield.key`) in the nested raw mapping."""
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise _unknown(key, all_keys(), where)
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[parts[0]])}
    if len(parts) < 2 or parts[1] not in fields:
        raise _unknown(key, all_keys(), where)
    section = tree.setdefault(parts[0], {})
    if len(parts) == 2:
        section[parts[1]] = value
    elif fields[parts[1]].default_factory is dict and len(parts) == 3:  # model.backbone_kwargs.embed_dim=32
        section.setdefault(parts[1], {})[parts[2]] = value
    else:
        raise _unknown(key, all_keys(), where)


def parse_override(text: str) -> tuple[str, Any]:
    """`section.field=value` -> (key, value); the value is read as YAML (numbers, lists, true/false)."""
    key, sep, raw = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise UserError(f"override {text!r}: expected section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(raw: dict, preset: str = "", where: str = "config") -> Config:
    """Typed, validated Config from a nested mapping (unknown keys and wrong types fail)."""
    hints = typing.get_type_hints
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise _unknown(name, list(SECTIONS), where)
        if not isinstance(value, dict):
            raise UserError(f"{where}: section {name!r} must be a mapping, got {value!r}")
        cls = SECTIONS[name]
        types = hints(cls)
        kwargs = {}
        for key, val in value.items():
            if key not in types:
                raise _unknown(f"{name}.{key}", all_keys(), where)
            kwargs[key] = _coerce(val, types[key], f"{name}.{key}")
        sections[name] = cls(**kwargs)
    return Config(**sections, preset=preset)


def load_config(preset: str, overrides: Sequence[str] = ()) -> Config:
    """A shipped preset name or a YAML path, then `section.field=value` overrides."""
    raw, name = _read_preset(preset)
    for key, value in raw.items():
        if key in SECTIONS and not isinstance(value, dict):
            raise UserError(f"preset {name}: section {key!r} must be a mapping")
    return with_overrides(raw, overrides, preset=name, where=f"preset {name}")


def with_overrides(raw: dict, overrides: Sequence[str], preset: str = "", where: str = "config") -> Config:
    """A Config from a nested mapping (e.g. a run's saved data section) plus overrides."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        if _field_type(key) is str:  # a string field takes the text as typed: YAML would read `no` as False
            value = text.partition("=")[2].strip()
        _set(raw, key, value, "override")
    return build_config(raw, preset=preset, where=where)


def _field_type(key: str):
    """The declared type of `section.field`, or None for unknown or nested keys."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or "." in name:
        return None
    return typing.get_type_hints(SECTIONS[section]).get(name)


def load_config_for(preset: str, overrides: Sequence[str] = ()) -> Config:
    """load_config, except that when the overrides switch data.dataset away from the preset's,
    the preset's dataset-specific fields (score column, resize, split, ...) fall back to the new
    dataset's defaults unless the overrides set them too (e.g. evaluating a KonIQ preset on SPAQ)."""
    cfg = load_config(preset, overrides)
    base = load_config(preset)
    if cfg.data.dataset == base.data.dataset:
        return cfg
    given = {parse_override(o)[0] for o in overrides}
    fresh = DataConfig()
    reset = {f: getattr(fresh, f) for f in DATASET_FIELDS if f"data.{f}" not in given}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **reset))


def config_from_yaml(path: Path) -> Config:
    """A resolved config saved with a run (`config.yaml`)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    preset = raw.pop("preset", "")
    return build_config(raw, preset=preset, where=str(path))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping (`Config.to_dict()`, a run's config.yaml) as dotted keys:
    {"optim": {"lr": 1e-5}} -> {"optim.lr": 1e-5}; dict-valued fields too (model.backbone_kwargs.embed_dim)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
