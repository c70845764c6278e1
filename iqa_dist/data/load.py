"""What a run trains and validates on: every dataset prepared (cached, split), the training rows
joined into one store with their normalised targets, each validation split sharded over the
processes, and the batch plan over the joined rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from rich.console import Console

from ..config import Config
from ..distributed.shards import shard
from ..errors import UserError
from .cache import describe, prepare
from .plan import BatchPlan, JointPlan
from .store import EvalSet, ImageStore, View
from .targets import Scale


@dataclass
class Data:
    """Every dataset of a run, loaded (`load_data`)."""

    names: list[str]  # the datasets trained on, in data.datasets order (one without joint training)
    weights: list[float]  # their shares of each global batch
    views: dict[str, View]  # each dataset's prepared cache and split
    train: ImageStore  # every training image (or cached patch strip), joined, device-resident when possible
    val: dict[str, EvalSet]  # this process's shard of each dataset's validation images
    scales: dict[str, Scale]  # each dataset's score -> target map, fitted on its training split
    plan: BatchPlan | JointPlan
    test_sets: dict[str, EvalSet] | None = None  # each dataset's test shard, once built (`test`)

    def test(self, cfg: Config, acc: Accelerator) -> dict[str, EvalSet]:
        """This process's shard of each dataset's test split (built once: train.track_test reuses it)."""
        if self.test_sets is None:
            self.test_sets = {name: view.eval_set("test", m.test_protocol, m.test_patch_num, cfg.model.img_size,
                                                  shard(len(view.ids("test")), acc.num_processes, acc.process_index))
                              for (name, view), m in zip(self.views.items(), cfg.data.members())}
        return self.test_sets

    def fingerprint(self) -> dict[str, str]:
        """Each dataset's cache folder: image cache / view, both content hashes (recorded in meta.json)."""
        return {name: v.cache_key() for name, v in self.views.items()}

    def legacy_fingerprint(self) -> dict[str, str]:
        """The same as runs made before files were identified by content recorded it: a run started
        then resumes when its files are unchanged."""
        return {name: v.legacy_key for name, v in self.views.items()}


def resident_device(cfg: Config, nbytes: int, device: torch.device) -> torch.device:
    """Where the training pixels live: the device when they fit in half of its free memory."""
    if cfg.data.resident == "host" or device.type != "cuda":
        return torch.device("cpu") if cfg.data.resident == "host" else device
    if cfg.data.resident == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < free // 2 else torch.device("cpu")


def load_data(cfg: Config, acc: Accelerator, console: Console, recorded: dict[str, str] | None = None) -> Data:
    """Every dataset trained on: prepared (cached, split), its training rows joined into one store
    with their normalised targets, its validation images sharded over the processes. `recorded`:
    a resumed run's cache keys (Data.fingerprint): changed data are refused before any cache is built."""
    # every process calls prepare: a file lock lets one build while the others wait (no
    # collective, whose timeout a first build of a large dataset could exceed)
    members = cfg.data.members()
    views, stores, targets, val, scales = {}, [], [], {}, {}
    cached = cfg.data.train_patches == "cached"
    for m in members:
        view = prepare(replace(cfg, data=m), console, expect=(recorded or {}).get(m.dataset, ""))
        acc.print(describe(view))
        if not len(view.ids("train")):
            raise UserError(f"{m.dataset}: data.split=all keeps every image for evaluation; training needs a train split")
        store = view.patch_store() if cached else view.image_store("train")
        train_scores = view.scores()[view.ids("train")]
        if float(train_scores.max()) == float(train_scores.min()):  # SRCC and PLCC would be undefined ("-")
            raise UserError(f"{m.dataset}: every training image scores {float(train_scores.min()):g}: nothing to learn "
                            f"or rank (is data.score_column={m.score_column or 'the default'} the score?)")
        scales[m.dataset] = Scale.fit(cfg.data.score_norm, train_scores)
        stores.append(store)
        targets.append(scales[m.dataset].to_target(store.scores))
        val[m.dataset] = view.eval_set("val", m.test_protocol, m.test_patch_num, cfg.model.img_size,
                                       shard(len(view.ids("val")), acc.num_processes, acc.process_index))
        views[m.dataset] = view
    train = ImageStore.join(stores, targets) if len(stores) > 1 else replace(stores[0], targets=targets[0].float())
    train = train.to(resident_device(cfg, train.nbytes, acc.device))
    d, weights = cfg.data, cfg.data.weights()
    plan = (JointPlan([len(s) for s in stores], weights, d.train_patch_num, cfg.train.batch_size, cfg.train.seed)
            if len(stores) > 1 else
            BatchPlan(len(train), d.train_patch_num, cfg.train.batch_size, cfg.train.seed,
                      d.cached_patch_num if cached else 0))
    return Data([m.dataset for m in members], weights, views, train, val, scales, plan)
