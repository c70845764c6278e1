"""Any timm backbone with four feature stages: one of each family at a tiny random size builds,
trains two steps through `train`, and its predict equals its evaluate; one that cannot serve is
refused in one line that says why."""

from __future__ import annotations

import json

import iqa_dist
import pytest

from iqa_dist.config import ModelConfig
from iqa_dist.errors import UserError
from iqa_dist.models.hyperiqa import build_model
from iqa_dist.scoring.evaluate import evaluate_model

from .conftest import only_run, train_here

# family -> (timm name, tiny random kwargs); at 64 px every one is a few hundred thousand to 4M parameters
FAMILIES = {
    "convnext": ("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}),
    "efficientnet": ("tinynet_e", {}),  # timm's EfficientNet-B0 at TinyNet's smallest scaling (0.5M parameters)
    "regnet": ("regnetx_002", {}),
    # a ViT: timm's features_only takes its last four blocks through forward_intermediates
    "vit": ("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_backbone_family_trains_and_predicts_as_it_evaluates(family, tiny_overrides, cache_root, tmp_path):
    name, kwargs = FAMILIES[family]
    overrides = [o for o in tiny_overrides if not o.startswith(("model.backbone_kwargs", "model.img_size"))]
    out = train_here([*overrides, f"model.backbone={name}", f"model.backbone_kwargs={json.dumps(kwargs)}",
                      "model.img_size=64", "train.max_steps=2", "train.eval_every=2", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_run"] == 2 and summary["test"]["n"] > 10
    report = evaluate_model(run, "synthetic", "test", [f"data.cache_dir={cache_root}"])
    root = next(p for p in cache_root.glob("synthetic-src-*") if p.is_dir())
    names = report["per_image"]["names"][:4]
    predicted = iqa_dist.load_model(run, "cpu").score([root / n for n in names])
    assert list(predicted) == pytest.approx(report["per_image"]["preds"][:4], abs=1e-4)
    assert report["metrics"]["n"] == summary["test"]["n"]


def test_a_backbone_that_cannot_serve_is_refused_in_one_line():
    tiny = dict(pretrained="none", img_size=64, hyper_hidden=[64], hyper_in=56, target_in=112,
                target_hidden=[56, 28, 14, 7])
    with pytest.raises(UserError, match=r"model.backbone='levit_128': cannot serve as a HyperIQA backbone: timm "
                                        r"cannot give its last four feature stages .*out of range"):
        build_model(ModelConfig(backbone="levit_128", **tiny))  # three stages
    with pytest.raises(UserError, match=r"model.backbone='inception_v3': cannot serve .*features_only"):
        build_model(ModelConfig(backbone="inception_v3", backbone_kwargs={"aux_logits": True}, **tiny))
    with pytest.raises(UserError, match=r"timm's model does not take these settings .*embed_dim"):
        build_model(ModelConfig(backbone="resnet18", backbone_kwargs={"embed_dim": 8}, **tiny))
