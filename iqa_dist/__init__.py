"""iqa-dist: distributed multi-GPU training of Swin HyperIQA for blind image quality assessment.

The package reads as the pipeline: sources/ (dataset files) -> data/ (decode, cache, store,
splits, plan, device augmentation, test-time patches) -> models/ (HyperIQA) -> training/ (the
step, the loop, selection) -> scoring/ (predictions, metrics, evaluate, predict, quality maps) ->
serving/ (`iqa-dist serve`: the HTTP API and its page) and experiments/ (sweeps, comparisons,
reports), with distributed/ (processes) and artifacts/ (the model card and run directory that
training writes and scoring reads) beside them, bench/ (measurement) and commands/ + cli.py (the
CLI) on top, config/ underneath. "Phase one", named in comments, is the
study this project continues: the README's "Reproducing the papers" defines it and gives its
table. Importing the package is cheap: torch loads on first use.
"""

import os

__version__ = "0.1.0"
# The user's inductor cache folder, read before anything imports timm: importing it imports torch's
# compiler, which sets the variable to torch's own default (training.compile.inductor_cache)
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
__all__ = ["load_config", "build_model", "load_model", "__version__"]


_LAZY = {"load_config": "config", "build_model": "models.hyperiqa", "load_model": "scoring.predict"}  # name -> module


def __getattr__(name: str):
    # lazy, so that `import iqa_dist.data.decode` (in decode worker processes) does not import torch
    if name not in _LAZY:
        raise AttributeError(f"module 'iqa_dist' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
