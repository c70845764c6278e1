"""Pretrained weights: which file a run started from, and fetching it for offline clusters.

`model.backbone` names a timm model with its weights tag (e.g. `resnet50.tv_in1k`: torchvision's
ImageNet weights, which the original HyperIQA used; `resnet50` alone would be timm's default tag,
another recipe). With `model.pretrained=hub` timm reads the tag's file from the Hugging Face cache,
downloading it when the hub is reachable. Compute nodes of a cluster usually are not: fetch on a
login node with `iqa-dist weights fetch`, then train with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import socket
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


def hub_unreachable() -> str:
    """Why the Hugging Face hub cannot be reached from here ("" when it can): HF_HUB_OFFLINE, or no
    connection to its endpoint within seconds. Asked before a download, because huggingface_hub
    retries an unreachable hub with backoff for most of a minute before it gives up."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached from here ({e.strerror or type(e).__name__})"
    return ""


def missing_hub_weights(backbone: str, why: str) -> UserError:
    """The start-up error when the tag's file is neither cached nor downloadable, with the ways out."""
    from huggingface_hub import constants

    return UserError(f"model.backbone={backbone!r}: its pretrained weights ({hub_repo(backbone)}) are not in the "
                     f"Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be downloaded ({why}). Fetch them "
                     f"on a machine with internet that shares HF_HOME (iqa-dist weights fetch --model.backbone "
                     f"{backbone}) and train with HF_HUB_OFFLINE=1, or give the file: --model.pretrained=FILE")


def ensure_hub_weights(backbone: str) -> None:
    """Fails at once, in one line, when the tag's weights are neither cached nor downloadable."""
    if cached_hub_file(backbone) is None and (why := hub_unreachable()):
        raise missing_hub_weights(backbone, why)


def fetch(cfg: ModelConfig) -> dict:
    """Downloads the tag's weights into the Hugging Face cache (no-op when cached); returns provenance."""
    if cfg.pretrained != "hub":
        raise UserError(f"weights fetch: model.pretrained={cfg.pretrained!r}; only hub weights are fetched")
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if cached_hub_file(cfg.backbone) is None and (why := hub_unreachable()):
        raise UserError(f"weights fetch: {why}, so {hub_repo(cfg.backbone)} cannot be downloaded: run it on a "
                        f"machine with internet that shares HF_HOME ({constants.HF_HOME}), e.g. a login node, or copy "
                        "the weights file over and train with --model.pretrained=FILE")
    try:
        timm.create_model(cfg.backbone, pretrained=True)
    except (LocalEntryNotFoundError, OSError) as e:
        raise missing_hub_weights(cfg.backbone, type(e).__name__) from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"model.backbone={cfg.backbone!r}: {e}") from None
        raise
    return provenance(cfg)
