"""torch.compile as `train` and `bench` use it: one place that says what is compiled and where
the kernels are cached.

The training step compiles the model and the training augmentation (`compile_step`); evaluation
compiles the model's own fp32 forward (`compile_model(..., "evaluation")`). Kernels go to
`inductor_cache`, beside the data cache, so a second run or a resumed one reuses them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from rich.console import Console

from .. import USER_INDUCTOR_CACHE
from ..config import Config
from ..data.augment import Augmenter
from ..data.cache import cache_root


def inductor_cache(cfg: Config) -> Path:
    """Where compiled kernels are cached: $TORCHINDUCTOR_CACHE_DIR when the user set it, else beside
    the data cache (a shared file system on a cluster), so a second run or a resumed one reuses them
    instead of compiling again. Set before every torch.compile call: inductor reads it when it
    compiles. The user's value is the one iqa_dist saw when it was imported: by now importing
    timm has set the variable to torch's own default (a per-user temp folder)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = USER_INDUCTOR_CACHE or str(cache_root(cfg) / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_step(model, augmenter: Augmenter, cfg: Config, console: Console):
    """What train.compile compiles for a training step, in `train` and `bench train` alike: the
    training augmentation (a few fused kernels) and the model. Returns the model to call."""
    if cfg.train.compile:
        inductor_cache(cfg)
        augmenter.compile(cfg.train.compile_backend)
    return compile_model(model, cfg, console)


def compile_model(model, cfg: Config, console: Console, what: str = "training"):
    """torch.compile of a model (train.compile), the kernels cached by `inductor_cache`; the model
    itself without train.compile. The first call's time (the compilation) is printed."""
    if not cfg.train.compile:
        return model
    inductor_cache(cfg)
    mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    compiled = torch.compile(model, mode=mode, backend=cfg.train.compile_backend)
    started: list[float] = []

    def before(module, args) -> None:
        started.append(time.perf_counter())

    def after(module, args, output) -> None:
        console.print(f"torch.compile ({what}): the first forward took {time.perf_counter() - started[0]:.1f} s "
                      f"(compiling; kernels cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})", highlight=False)
        hooks[0].remove()
        hooks[1].remove()

    hooks = [compiled.register_forward_pre_hook(before), compiled.register_forward_hook(after)]
    return compiled
