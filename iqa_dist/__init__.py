"""iqa-dist: distributed multi-GPU training of Swin HyperIQA for blind image quality assessment.

Pipeline: files (sources.py) -> cache (cache.py, decode.py) -> device augmentation (augment.py)
-> model (model.py) -> metrics (evaluate.py) -> run directory (rundir.py); train.py holds the
loop, cli.py the commands. Importing the package is cheap: torch loads on first use.
"""

__version__ = "0.1.0"
__all__ = ["load_config", "build_model", "load_model", "__version__"]


_LAZY = {"load_config": "config", "build_model": "model", "load_model": "predict"}  # name -> module


def __getattr__(name: str):
    # lazy, so that `import iqa_dist.decode` (in decode worker processes) does not import torch
    if name not in _LAZY:
        raise AttributeError(f"module 'iqa_dist' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
