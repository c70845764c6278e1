"""Swin HyperIQA: shapes, gradients, per-image target nets, backbones, parameter counts."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from iqa_dist.config import ModelConfig, load_config
from iqa_dist.errors import UserError
from iqa_dist.models.hyperiqa import build_model, parameter_counts

from .conftest import TINY_SWIN_KWARGS as TINY_SWIN

TINY = dict(pretrained="none", img_size=112, hyper_hidden=[64, 32], backbone_kwargs=TINY_SWIN)


def tiny(**kw) -> torch.nn.Module:
    return build_model(ModelConfig(**{**TINY, **kw}))


def test_output_is_one_score_per_image():
    torch.manual_seed(0)
    m = tiny().eval()
    assert m(torch.randn(3, 3, 112, 112)).shape == (3,)
    assert m(torch.randn(1, 3, 112, 112)).shape == (1,)


@pytest.mark.parametrize("fusion", ["concat", "attention", "last"])
def test_every_parameter_gets_a_gradient(fusion):
    torch.manual_seed(0)
    m = tiny(fusion=fusion, dropout=0.0, drop_path=0.0)
    m(torch.randn(4, 3, 112, 112)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_each_image_gets_its_own_target_net():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 3, 112, 112)
    feats = m.stages(x)
    weights, biases = m.hyper(m.fuse(feats))
    assert [tuple(w.shape) for w in weights] == [(2, 112, 224), (2, 56, 112), (2, 28, 56), (2, 14, 28), (2, 1, 14)]
    assert [tuple(b.shape) for b in biases] == [(2, 112), (2, 56), (2, 28), (2, 14), (2, 1)]
    for w in weights:
        assert not torch.allclose(w[0], w[1])
    # the batched target net equals running each image alone
    with torch.no_grad():
        both = m(x)
        alone = torch.stack([m(x[i:i + 1])[0] for i in range(2)])
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)


def test_swin_nhwc_and_resnet_nchw_fuse_to_the_same_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    swin = build_model(ModelConfig(pretrained="none", backbone_kwargs=dict(embed_dim=32, depths=[1, 1, 1, 1])))
    assert swin.channels_last_features
    raw = swin.backbone(x)
    assert raw[0].shape == (2, 56, 56, 32)  # timm gives NHWC; the model converts once
    s_feats = swin.stages(x)
    assert [tuple(f.shape) for f in s_feats] == [(2, 32, 56, 56), (2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7)]
    resnet = build_model(ModelConfig(pretrained="none", backbone="resnet18"))
    assert not resnet.channels_last_features
    r_feats = resnet.stages(x)
    assert [f.shape[2:] for f in r_feats] == [f.shape[2:] for f in s_feats]
    assert swin.fuse(s_feats).shape == (2, 32 + 64 + 128 + 256, 7, 7)
    assert resnet.fuse(r_feats).shape == (2, 64 + 128 + 256 + 512, 7, 7)


@pytest.mark.parametrize("preset, backbone, lo, hi", [
    ("koniq-swin-t", None, 29.0, 30.0),  # phase one: ~28M + ~2M
    ("koniq-swin-t", "swin_small_patch4_window7_224", 50.0, 51.5),
    ("koniq-swin-b-long", None, 88.0, 90.0),
    ("koniq-resnet50", None, 27.0, 28.0),
])
def test_parameter_counts(preset, backbone, lo, hi):
    overrides = ["model.pretrained=none"] + ([f"model.backbone={backbone}"] if backbone else [])
    counts = parameter_counts(build_model(load_config(preset, overrides).model))
    assert lo <= counts["total"] / 1e6 <= hi, counts
    if preset == "koniq-swin-t" and not backbone:
        assert 27.0 <= counts["backbone"] / 1e6 <= 28.5 and 1.5 <= counts["hyper"] / 1e6 <= 2.5


def test_swin_t_scores_a_224_batch():
    model = build_model(load_config("koniq-swin-t", ["model.pretrained=none"]).model).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2,)


def test_local_weight_file_is_loaded(tmp_path):
    kwargs = TINY["backbone_kwargs"]
    torch.manual_seed(1)
    source = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, **kwargs)
    path = tmp_path / "swin.safetensors"
    save_file(source.state_dict(), path)
    m = tiny(pretrained=str(path))
    torch.testing.assert_close(m.backbone.state_dict()["patch_embed.proj.weight"], source.patch_embed.proj.weight)
    with pytest.raises(UserError, match="no such file"):
        tiny(pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="Unknown model"):
        build_model(ModelConfig(pretrained="none", backbone="swin_nonexistent"))


def test_swin_features_are_read_in_place_with_the_same_math():
    """Swin's NHWC stages feed LDA and fusion as views (no layout copy); the 1x1 LDA conv done
    as a linear map over channels equals the conv on a contiguous copy."""
    torch.manual_seed(0)
    m = tiny(dropout=0.0, drop_path=0.0).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        feats = m.stages(x)
        assert not feats[0].is_contiguous()  # a view of timm's NHWC tensor
        for lda, f in zip(m.lda, feats):
            torch.testing.assert_close(lda(f, nhwc=True), lda(f.contiguous()), rtol=1e-5, atol=1e-5)
