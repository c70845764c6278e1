"""Fixtures in the two published HyperIQA formats, written from the originals' code: the layer
names and shapes of SSL92/hyperIQA's HyperNet(16, 112, 224, 112, 56, 28, 14, 7) (models.py) and
of pyiqa's HyperNet (pyiqa/archs/hypernet_arch.py), with RANDOM values, saved as each saves them;
and each original's forward, rebuilt from those names alone (tests/test_fidelity.py's
`original_hypernet`), to compare an import with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

HYPER_IN, SIZES = 112, [224, 112, 56, 28, 14, 1]  # hyper-network channels; target-net widths

# SSL92's head: ResNetBackbone's LDA layers (res.*), then HyperNet's conv1 and generators
SSL92_HEAD = {
    "res.lda1_pool.0.weight": (16, 256, 1, 1), "res.lda1_fc.weight": (16, 16 * 64), "res.lda1_fc.bias": (16,),
    "res.lda2_pool.0.weight": (32, 512, 1, 1), "res.lda2_fc.weight": (16, 32 * 16), "res.lda2_fc.bias": (16,),
    "res.lda3_pool.0.weight": (64, 1024, 1, 1), "res.lda3_fc.weight": (16, 64 * 4), "res.lda3_fc.bias": (16,),
    "res.lda4_fc.weight": (224 - 16 * 3, 2048), "res.lda4_fc.bias": (224 - 16 * 3,),
    "conv1.0.weight": (1024, 2048, 1, 1), "conv1.0.bias": (1024,), "conv1.2.weight": (512, 1024, 1, 1),
    "conv1.2.bias": (512,), "conv1.4.weight": (HYPER_IN, 512, 1, 1), "conv1.4.bias": (HYPER_IN,),
    **{k: v for i in range(1, 5) for k, v in {
        f"fc{i}w_conv.weight": (SIZES[i - 1] * SIZES[i] // 49, HYPER_IN, 3, 3),
        f"fc{i}w_conv.bias": (SIZES[i - 1] * SIZES[i] // 49,),
        f"fc{i}b_fc.weight": (SIZES[i], HYPER_IN), f"fc{i}b_fc.bias": (SIZES[i],)}.items()},
    "fc5w_fc.weight": (14, HYPER_IN), "fc5w_fc.bias": (14,), "fc5b_fc.weight": (1, HYPER_IN), "fc5b_fc.bias": (1,),
}
# pyiqa's names for the same layers (Sequential indices: Conv2d, AvgPool2d, Flatten, Linear; the
# pooled generators are AdaptiveAvgPool2d, Flatten, Linear)
PYIQA_NAMES = {
    **{f"res.lda{i + 1}_pool.0.weight": f"lda_modules.{i}.0.weight" for i in range(3)},
    **{f"res.lda{i + 1}_fc.{p}": f"lda_modules.{i}.3.{p}" for i in range(3) for p in ("weight", "bias")},
    **{f"res.lda4_fc.{p}": f"lda_modules.3.2.{p}" for p in ("weight", "bias")},
    **{f"conv1.{j}.{p}": f"conv1.{j}.{p}" for j in (0, 2, 4) for p in ("weight", "bias")},
    **{f"fc{i + 1}w_conv.{p}": f"fc_w_modules.{i}.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"fc5w_fc.{p}": f"fc_w_modules.4.2.{p}" for p in ("weight", "bias")},
    **{f"fc{i + 1}b_fc.{p}": f"fc_b_modules.{i}.2.{p}" for i in range(5) for p in ("weight", "bias")},
}


def resnet50_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ResNet-50 without its classifier under torchvision's names (SSL92's `res.*` and pyiqa's
    timm `base_model.*` alike), every tensor random: BatchNorm statistics too."""
    import torchvision

    torch.manual_seed(seed)
    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    for k, v in state.items():
        norm = ".bn" in k or k.startswith("bn") or "downsample.1." in k
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000)
        elif k.endswith("running_var") or norm and k.endswith("weight"):
            state[k] = torch.rand_like(v) * 0.5 + 0.75  # positive scales near 1: activations stay finite
        elif norm:  # bias, running_mean
            state[k] = torch.randn_like(v) * 0.05
    return state


def ssl92_state(resnet: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """HyperNet(16, 112, 224, 112, 56, 28, 14, 7).state_dict() in its module order, random values
    (Kaiming-normal scale, as the original initialises)."""
    g = torch.Generator().manual_seed(seed)
    head = {k: torch.randn(shape, generator=g) * (2 / (shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1))) ** 0.5
            if len(shape) > 1 else torch.randn(shape, generator=g) * 0.05 for k, shape in SSL92_HEAD.items()}
    res_head = {k: v for k, v in head.items() if k.startswith("res.")}
    return {**{f"res.{k}": v for k, v in resnet.items()}, **res_head,
            **{k: v for k, v in head.items() if not k.startswith("res.")}}


def save_ssl92(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)  # demo.py: model_hyper.load_state_dict(torch.load(path)): the state dict itself
    return path


def save_pyiqa(ssl92: dict[str, torch.Tensor], path: Path) -> Path:
    """The same weights as pyiqa's HyperNet holds them, saved as basicsr's save_network does:
    {"params": state_dict}."""
    state = {**{f"base_model.{k[4:]}": v for k, v in ssl92.items() if k.startswith("res.") and "lda" not in k},
             **{PYIQA_NAMES[k]: v for k, v in ssl92.items() if k in PYIQA_NAMES}}
    torch.save({"params": state}, path)
    return path


def _conv(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=b is not None, device="meta")
    conv.weight = nn.Parameter(w)
    if b is not None:
        conv.bias = nn.Parameter(b)
    return conv


def _fc(state: dict, name: str) -> SimpleNamespace:
    return SimpleNamespace(weight=state[f"{name}.weight"], bias=state[f"{name}.bias"])


def ssl92_modules(state: dict[str, torch.Tensor]) -> SimpleNamespace:
    """The SSL92 file's tensors, by their own names, as the modules test_fidelity's
    `original_hypernet` reads: torchvision's ResNet-50 (SSL92's ResNetBackbone is its structure)
    for the stages, then lda{i}_pool/lda{i}_fc, conv1, fc{i}w_conv, fc5w_fc, fc{i}b_fc."""
    import torchvision

    with torch.device("meta"):  # every tensor comes from the file
        res = torchvision.models.resnet50()
    missing = res.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("res.") and "lda" not in k},
                                  strict=False, assign=True).missing_keys
    assert missing == ["fc.weight", "fc.bias"], missing
    res.eval()

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        x = res.maxpool(res.relu(res.bn1(res.conv1(x))))
        out = []
        for layer in (res.layer1, res.layer2, res.layer3, res.layer4):
            x = layer(x)
            out.append(x)
        return out

    lda = [SimpleNamespace(conv=SimpleNamespace(weight=state[f"res.lda{i}_pool.0.weight"]),
                           fc=_fc(state, f"res.lda{i}_fc")) for i in (1, 2, 3)]
    lda.append(SimpleNamespace(fc=_fc(state, "res.lda4_fc")))
    reduce = [_conv(state[f"conv1.{j}.weight"], state[f"conv1.{j}.bias"]) for j in (0, 2, 4)]
    hyper = SimpleNamespace(reduce=reduce, weight_convs=[_fc(state, f"fc{i}w_conv") for i in range(1, 5)],
                            last_weight=_fc(state, "fc5w_fc"), bias_fcs=[_fc(state, f"fc{i}b_fc") for i in range(1, 6)])
    return SimpleNamespace(backbone=stages, lda=lda, hyper=hyper)
