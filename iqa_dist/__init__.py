"""iqa-dist: distributed multi-GPU training of Swin HyperIQA for blind image quality assessment.

Pipeline: dataset files (sources.py, splits.py) -> cache (cache.py builds, store.py reads) ->
device augmentation (augment.py) -> model (model.py) -> metrics (evaluate.py, metrics.py,
protocol.py) -> run directory (rundir.py, card.py). train.py holds the loop; commands/ holds the
CLI's subcommands, cli.py dispatches. "Phase one", named in comments, is the study this project
continues: the README's "Reproducing the papers" defines it and gives its table. Importing the
package is cheap: torch loads on first use.
"""

__version__ = "0.1.0"
__all__ = ["load_config", "build_model", "load_model", "__version__"]


_LAZY = {"load_config": "config", "build_model": "models.hyperiqa", "load_model": "scoring.predict"}  # name -> module


def __getattr__(name: str):
    # lazy, so that `import iqa_dist.decode` (in decode worker processes) does not import torch
    if name not in _LAZY:
        raise AttributeError(f"module 'iqa_dist' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
