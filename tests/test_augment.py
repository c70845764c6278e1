"""Device augmentation: torchvision-exact ColorJitter, order, crops, flips, per-rank draws."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from iqa_dist.config import AugmentConfig
from iqa_dist.data.augment import Augmenter, crop, gray_weights, jitter, jitter_table, sample_jitter, to_unit
from iqa_dist.distributed.shards import Shares

CPU = torch.device("cpu")

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def color_jitter(x: torch.Tensor, brightness, contrast, saturation, hue, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter of x (B, 3, H, W) in [0, 1] through `jitter_table` + `jitter`, as the training
    step runs it: per-sample factors (B,) or None (off), hue shifts (B,) or None, order (B, 4)."""
    ones = torch.ones(len(x))
    factors = torch.stack([ones if f is None else f for f in (brightness, contrast, saturation)], 1)
    table = jitter_table(factors, hue, order).float()
    return jitter(x, table, hue is not None, gray_weights(x.device))


def reference_jitter(x, b, c, s, h, order):
    """torchvision.transforms.functional applied per image, in the given order."""
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [b, c, s, h]
    out = []
    for i in range(len(x)):
        img = x[i]
        for op in order[i].tolist():
            img = fns[op](img, float(factors[op][i]))
        out.append(img)
    return torch.stack(out)


def special_images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.0  # black
    x[1] = 1.0  # white
    x[2] = 0.5  # gray: hue and saturation are undefined
    x[3] = (x[3] > 0.5).float()  # saturated primaries and secondaries
    x[4, 0], x[4, 1:] = 1.0, 0.0  # pure red
    x[5] = x[5] * 0.02  # nearly black
    return x


@pytest.mark.parametrize("seed", range(4))
def test_color_jitter_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    x = special_images(32, seed=seed)
    b, c, s, h, order = sample_jitter(g, 32, AugmentConfig(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5))
    got = color_jitter(x, b, c, s, h, order)
    torch.testing.assert_close(got, reference_jitter(x, b, c, s, h, order), atol=1e-5, rtol=0)


def test_every_order_matches_torchvision():
    x = special_images(24, seed=7)
    order = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per image
    g = torch.Generator().manual_seed(1)
    b, c, s, h, _ = sample_jitter(g, 24, AugmentConfig(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.3))
    torch.testing.assert_close(color_jitter(x, b, c, s, h, order), reference_jitter(x, b, c, s, h, order),
                               atol=1e-5, rtol=0)
    # order matters: reversing it changes the result
    assert not torch.allclose(color_jitter(x, b, c, s, h, order), color_jitter(x, b, c, s, h, order.flip(1)))


def test_factors_cover_ranges_and_orders_are_uniform():
    g = torch.Generator().manual_seed(0)
    n = 24000
    b, c, s, h, order = sample_jitter(g, n, AugmentConfig(brightness=0.1, contrast=0.2, saturation=1.5, hue=0.05))
    for v, lo, hi in [(b, 0.9, 1.1), (c, 0.8, 1.2), (s, 0.0, 2.5), (h, -0.05, 0.05)]:
        assert lo <= v.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < v.max() <= hi
        assert abs(float(v.mean()) - (lo + hi) / 2) < 0.02 * (hi - lo)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24
    chi2 = float(((counts - n / 24) ** 2 / (n / 24)).sum())
    assert chi2 < 49.7  # chi-square, 23 dof, p = 0.001
    none = sample_jitter(g, 5, AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0))
    assert none[:4] == (None, None, None, None)


def test_jitter_runs_before_normalisation_in_float32():
    aug = Augmenter(AugmentConfig(hflip=False, brightness=0.5, contrast=0, saturation=0, hue=0), 8, MEAN, STD, 0)
    white = torch.full((8 * 8 * 3,), 255, dtype=torch.uint8)
    params = aug.draw(1)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug.apply(white, aug.upload(zero, torch.tensor([8]), zero, zero, params, torch.zeros(1), CPU))[0]
    assert out.dtype == torch.float32
    f = float(params.brightness[0])
    expected = (min(1.0, f) - torch.tensor(MEAN)) / torch.tensor(STD)  # jitter in [0,1], then normalise
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    plain = Augmenter(AugmentConfig(hflip=False, brightness=0, contrast=0, saturation=0, hue=0), 8, MEAN, STD, 0)
    packed = plain.upload(zero, torch.tensor([8]), zero, zero, None, torch.zeros(1), torch.device("cpu"))
    out = plain.apply(white, packed, train=False)[0]
    torch.testing.assert_close(out[0, :, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))


def _flat(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = torch.from_numpy(np.concatenate([im.ravel() for im in images]))
    sizes = torch.tensor([im.size for im in images])
    return (flat, torch.cumsum(sizes, 0) - sizes, torch.tensor([im.shape[0] for im in images]),
            torch.tensor([im.shape[1] for im in images]))


def test_crops_lie_inside_each_image_and_differ():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (33, 33), (50, 32)]]
    flat, offsets, heights, widths = _flat(images)
    aug = Augmenter(AugmentConfig(hflip=True), 32, MEAN, STD, seed=3)
    rows = torch.tensor([0, 1, 2] * 100)
    params = aug.draw(len(rows))
    y0, x0 = aug.crop_origin(params, heights[rows], widths[rows])
    assert (y0 >= 0).all() and (x0 >= 0).all()
    assert (y0 + 32 <= heights[rows]).all() and (x0 + 32 <= widths[rows]).all()
    assert len(set(zip(y0[rows == 0].tolist(), x0[rows == 0].tolist()))) > 50  # positions differ per sample
    patches = crop(flat, offsets[rows], widths[rows], y0, x0, params.flip, 32)
    for i in range(0, 300, 37):
        ref = images[int(rows[i])][int(y0[i]):int(y0[i]) + 32, int(x0[i]):int(x0[i]) + 32]
        ref = ref[:, ::-1] if params.flip[i] else ref
        assert np.array_equal(patches[i].numpy(), ref)
    frac = params.flip.float().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / len(rows))  # about half the samples flip
    assert to_unit(patches).shape == (300, 3, 32, 32)
    assert not Augmenter(AugmentConfig(hflip=False), 32, MEAN, STD, 3).draw(100).flip.any()


def test_two_ranks_draw_different_augmentations_reproducibly():
    """Each process applies its share of one global draw: ranks differ, seeds reproduce."""
    global_batch = 16
    draws = [Augmenter(AugmentConfig(), 8, MEAN, STD, seed=5).draw(global_batch) for _ in range(2)]
    torch.testing.assert_close(draws[0].u_y, draws[1].u_y)  # same seed, same draw
    shares = [Shares.split(global_batch, 0, world=2, rank=r).slices()[0] for r in range(2)]
    rank0, rank1 = draws[0][shares[0]], draws[0][shares[1]]
    assert not torch.allclose(rank0.u_y, rank1.u_y) and not torch.allclose(rank0.brightness, rank1.brightness)
    # world-size invariance: sample i gets the same draw whatever the number of processes
    torch.testing.assert_close(torch.cat([rank0.u_x, rank1.u_x]), draws[0].u_x)
    other_seed = Augmenter(AugmentConfig(), 8, MEAN, STD, seed=6).draw(global_batch)
    assert not torch.allclose(other_seed.u_y, draws[0].u_y)


def test_draws_are_a_function_of_seed_and_step_alone():
    """What a resumed run (on any number of processes) draws is what the uninterrupted one drew:
    no generator state carries from step to step."""
    a = Augmenter(AugmentConfig(), 8, MEAN, STD, seed=1)
    first = a.draw(10, step=7)
    a.draw(10, step=3)  # other draws in between change nothing
    torch.testing.assert_close(a.draw(10, step=7).u_y, first.u_y)
    fresh = Augmenter(AugmentConfig(), 8, MEAN, STD, seed=1)
    fresh.load_state_dict(a.state_dict())
    torch.testing.assert_close(fresh.draw(10, step=7).order.float(), first.order.float())
    assert not torch.allclose(a.draw(10, step=8).u_y, first.u_y)
    assert a.state_dict() == {}
