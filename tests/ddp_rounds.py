"""Run by tests/test_train.py on 2 CPU processes (conftest.launch_function): the real step of the
koniq-swin-t recipe on a tiny Swin (micro-batched, compiled with aot_eager, weight EMA on) for 3
optimizer steps, counting the gradient all-reduce rounds DDP makes (a comm hook sees each bucket;
the last bucket closes a round). Rank 0 writes {"rounds", "steps", "micro"} as JSON."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from iqa_dist.bench.rig import StepRig
from iqa_dist.config import load_config
from iqa_dist.data.store import ImageStore

STEPS = 3


def count_rounds(overrides: list[str], out: str) -> None:
    cfg = load_config("koniq-swin-t", overrides)
    acc = Accelerator(cpu=True)
    rng = np.random.default_rng(0)
    n, h, w = 6, 130, 150
    store = replace(ImageStore.of_images(list(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))),
                    scores=torch.rand(n) * 100)
    rig = StepRig.build(cfg, store, "fp32", 16, torch.device("cpu"), acc=acc)
    rounds = [0]

    def counting(state, bucket):
        rounds[0] += bucket.is_last()
        return allreduce_hook(state, bucket)

    rig.trainer.model.register_comm_hook(None, counting)
    for _ in range(STEPS):
        rig.end_to_end()
    rig.trainer.settle()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"rounds": rounds[0], "steps": STEPS, "micro": len(rig.batches.shares.slices())}))
