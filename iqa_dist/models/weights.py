"""Pretrained weights: which file a run started from, and fetching it for offline clusters.

`model.backbone` names a timm model with its weights tag (e.g. `resnet50.tv_in1k`: torchvision's
ImageNet weights, which the original HyperIQA used; `resnet50` alone would be timm's default tag,
another recipe). With `model.pretrained=hub` timm reads the tag's file from the Hugging Face cache,
downloading it when the hub is reachable. Compute nodes of a cluster usually are not: fetch on a
login node with `iqa-dist weights fetch`, then train with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm

from ..config import ModelConfig
from ..errors import UserError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for, in its order


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def full_tag(backbone: str) -> str:
    """`architecture.tag` of a timm name, resolving timm's default tag when none is given."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        return backbone
    arch = backbone.split(".")[0]
    return f"{arch}.{cfg.tag}" if cfg.tag else arch


def hub_repo(backbone: str) -> str:
    """The Hugging Face repository timm downloads `backbone`'s weights from."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"model.backbone={backbone!r}: timm knows no hub weights for it "
                        "(give a weights file with model.pretrained=PATH, or none)")
    return cfg.hf_hub_id.split("@")[0]


def cached_hub_file(backbone: str) -> Path | None:
    """The tag's weight file in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_repo(backbone)
    for name in HUB_FILES:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def provenance(cfg: ModelConfig) -> dict:
    """What the backbone's weights are: source, tag, file and its sha256 (before training)."""
    if cfg.pretrained == "none":
        return {"source": "none", "tag": cfg.backbone, "file": None, "sha256": None}
    if cfg.pretrained == "hub":
        path = cached_hub_file(cfg.backbone)
        return {"source": "hub", "tag": full_tag(cfg.backbone), "repo": hub_repo(cfg.backbone),
                "file": str(path) if path else None, "sha256": sha256(path) if path else None}
    path = Path(cfg.pretrained).expanduser()
    return {"source": "file", "tag": cfg.backbone, "file": str(path.resolve()), "sha256": sha256(path)}


def missing_hub_weights(backbone: str, error: Exception) -> UserError:
    """The start-up error when the tag's file is neither cached nor downloadable."""
    return UserError(f"model.backbone={backbone!r}: its pretrained weights ({hub_repo(backbone)}) are not in the "
                     f"Hugging Face cache and could not be downloaded ({type(error).__name__}). On a machine with "
                     f"internet and the same HF_HOME, run: iqa-dist weights fetch --model.backbone {backbone}")


def fetch(cfg: ModelConfig) -> dict:
    """Downloads the tag's weights into the Hugging Face cache (no-op when cached); returns provenance."""
    if cfg.pretrained != "hub":
        raise UserError(f"weights fetch: model.pretrained={cfg.pretrained!r}; only hub weights are fetched")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        timm.create_model(cfg.backbone, pretrained=True)
    except (LocalEntryNotFoundError, OSError) as e:
        raise missing_hub_weights(cfg.backbone, e) from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"model.backbone={cfg.backbone!r}: {e}") from None
        raise
    return provenance(cfg)
