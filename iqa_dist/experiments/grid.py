"""The members of a sweep: configs (a grid of --set axes, or phase one's regulariser
ablation) crossed with repeats (seeded splits or training seeds).
"""

from __future__ import annotations

from ..config import ENVIRONMENT, flatten, load_config
from ..errors import UserError

# Phase one's regularisers, each as the overrides that switch it off.
REGULARISERS = {
    "dropout": ["model.dropout=0"],
    "drop_path": ["model.drop_path=0"],
    "weight_decay": ["optim.weight_decay=0"],
    "jitter": ["augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0"],
}
# none, each regulariser alone (the others off), all: the base preset's values where one is on
ABLATION = {
    "none": [o for off in REGULARISERS.values() for o in off],
    **{f"{name}-only": [o for other, off in REGULARISERS.items() if other != name for o in off]
       for name in REGULARISERS},
    "all": [],
}


def grid_configs(axes: list[str]) -> list[tuple[str, list[str]]]:
    """--set KEY=V1,V2 axes -> [(config name, overrides)], their cartesian product in the order
    given. A name says the settings by the key's last part: "lr=1e-5,drop_path=0.1"."""
    parsed = []
    for axis in axes:
        key, eq, values = axis.partition("=")
        if not eq or not key or not values.strip(","):
            raise UserError(f"sweep grid: --set {axis!r}: expected KEY=V1,V2,... (e.g. --set optim.lr=1e-5,2e-5)")
        parsed.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise UserError(f"sweep grid: --set names {', '.join(k for k in keys if keys.count(k) > 1)} twice")
    short = [k.split(".")[-1] if [x.split(".")[-1] for x in keys].count(k.split(".")[-1]) == 1 else k for k in keys]
    configs = [("", [])]
    for (key, values), label in zip(parsed, short):
        configs = [(f"{name},{label}={v}".lstrip(","), [*overrides, f"{key}={v}"]) for name, overrides in configs
                   for v in values]
    return configs


def repeats(by: str, n: int) -> list[tuple[str, list[str]]]:
    """The repeats every config runs: "splits" (seeded random splits, a training seed each),
    "seeds" (the preset's split, N training seeds), or none (one run)."""
    if by == "splits":
        return [(f"split{i:02d}", ["data.split=random", f"data.split_seed={i}", f"train.seed={i}"]) for i in range(n)]
    if by == "seeds":
        return [(f"seed{i:02d}", [f"train.seed={i}"]) for i in range(n)]
    return [("", [])]


def crossed(configs: list[tuple[str, list[str]]], reps: list[tuple[str, list[str]]],
         base_overrides: list[str]) -> list[dict]:
    """Every (config, repeat) member: {"name", "config", "repeat", "overrides"}. A member's name
    says both ("lr=1e-5,split03"), or the one that varies."""
    out = []
    for config, overrides in configs:
        for repeat, extra in reps:
            name = ",".join(x for x in (config, repeat) if x)
            out.append({"name": safe_name(name), "config": config, "repeat": repeat,
                        "overrides": [*base_overrides, *overrides, *extra]})
    return out


def safe_name(name: str) -> str:
    """A member name as a run name (run.name's characters): anything else, e.g. a path's /, becomes _."""
    return "".join(c if c.isascii() and c.isalnum() or c in "._=,+-" else "_" for c in name)


def members(kind: str, base_overrides: list[str], n: int, axes: list[str] = (), by: str = "") -> list[dict]:
    """The members of a sweep: one grid of configs x repeats. `ablation` is the grid of phase
    one's regularisers (none, each alone, all), `splits` one config over N splits, `grid` the
    --set axes crossed; each times the repeats `by` (splits, seeds) gives."""
    if kind == "ablation":
        return crossed(list(ABLATION.items()), repeats(by, n), base_overrides)
    if kind == "splits":
        return crossed([("", [])], repeats("splits", n), base_overrides)
    if kind == "grid":
        if not axes:
            raise UserError("sweep grid: give at least one --set KEY=V1,V2 (e.g. --set optim.lr=1e-5,2e-5)")
        return crossed(grid_configs(list(axes)), repeats(by, n), base_overrides)
    raise UserError(f"sweep: unknown kind {kind!r} (grid, ablation, splits, cross, collect)")


def equal_configs(preset: str, specs: list[dict]) -> dict[str, tuple[str, str]]:
    """config -> (the earlier config it equals, why in words), for every config of `specs` whose
    resolved config is an earlier one's: it would train the same runs again and its paired
    difference would be 0 by construction (an ablation of regularisers the preset already has at
    0, a grid value written twice). Each config is compared on its first repeat; the repeats add
    the same overrides to every config."""
    first = {}
    for m in specs:
        first.setdefault(m["config"], m)
    resolved = {c: {k: v for k, v in flatten(load_config(preset, m["overrides"]).to_dict()).items() if k not in ENVIRONMENT}
                for c, m in first.items()}
    out = {}
    for i, (config, flat) in enumerate(resolved.items()):
        other = next((c for c in list(resolved)[:i] if c not in out and resolved[c] == flat), None)
        if other is not None:
            out[config] = (other, _why(first[config]["overrides"], first[other]["overrides"], flat))
    return out


def _why(mine: list[str], theirs: list[str], flat: dict) -> str:
    """What the two configs were meant to differ in, and why they do not: "model.dropout=0.0 in both"."""
    a, b = (dict(o.split("=", 1) for o in overrides) for overrides in (mine, theirs))
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}={flat.get(k)}" for k in keys) + " in both" if keys else "the same overrides"


def equal_hint(kind: str) -> str:
    """What to do about configs that train the same."""
    if kind == "ablation":
        return "give the preset's regularisers values (e.g. --model.dropout=0.3) or use a preset that has them"
    return "give --set values that differ"
