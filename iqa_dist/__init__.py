"""iqa-dist: distributed multi-GPU training of Swin HyperIQA for blind image quality assessment.

Pipeline: files -> cache (cache.py) -> device augmentation (augment.py) -> model (model.py)
-> metrics (evaluate.py) -> run directory (rundir.py); train.py holds the loop, cli.py the commands.
"""

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .model import build_model  # noqa: E402

__all__ = ["Config", "load_config", "build_model", "load_model", "__version__"]


def load_model(path, device=None):
    """A trained model directory (or run directory) as a scorer: `load_model(p).score(images)`."""
    from .predict import load_model as _load

    return _load(path, device)
