"""iqa-dist: distributed multi-GPU training of Swin HyperIQA for blind image quality assessment.

Pipeline: files (sources.py) -> cache (cache.py, decode.py) -> device augmentation (augment.py)
-> model (model.py) -> metrics (evaluate.py) -> run directory (rundir.py); train.py holds the
loop, cli.py the commands. Importing the package is cheap: torch loads on first use.
"""

__version__ = "0.1.0"
__all__ = ["load_config", "build_model", "load_model", "__version__"]


def __getattr__(name: str):
    # lazy, so that `import iqa_dist.decode` (in decode worker processes) does not import torch
    if name == "load_config":
        from .config import load_config

        return load_config
    if name == "build_model":
        from .model import build_model

        return build_model
    if name == "load_model":
        from .predict import load_model

        return load_model
    raise AttributeError(f"module 'iqa_dist' has no attribute {name!r}")
