"""Faithful reproduction: the original HyperIQA computation, its optimizer and groups, weights with
provenance, one test-time protocol for training, evaluate and predict, a world-size-free ranking loss."""

from __future__ import annotations

import json
import math
import shutil

import iqa_dist
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from iqa_dist.config import load_config
from iqa_dist.errors import UserError
from iqa_dist.models.hyperiqa import build_model
from iqa_dist.training.losses import sample_losses
from iqa_dist.training.optim import Schedule, build_optimizer, group_sizes

from .conftest import RUN, cli, here, metrics, only_run, run_train, train_here

# ---------------------------------------------------------------- the original computation


def original_hypernet(model, img: torch.Tensor) -> torch.Tensor:
    """HyperIQA as SSL92/hyperIQA's models.py computes it, written here from the paper's equations
    and that code's layer sizes (HyperNet(16, 112, 224, 112, 56, 28, 14, 7)), with the weights of
    `model` (a koniq-resnet50 HyperIQA): ResNet-50 stages, LDA branches (1x1 conv, AvgPool2d(7),
    FC), conv1 (2048-1024-512-112, ReLU), weight-generating 3x3 convs and bias FCs, and the
    target net as grouped 1x1 convolutions (TargetFC), sigmoid after the first four layers."""
    stages = model.backbone(img)  # ResNet-50 layer1..layer4: 256x56x56 ... 2048x7x7
    lda_vec = []
    for i, x in enumerate(stages[:3]):
        branch = model.lda[i]
        pooled = F.avg_pool2d(F.conv2d(x, branch.conv.weight), 7, stride=7)  # lda{i}_pool
        lda_vec.append(F.linear(pooled.reshape(len(x), -1), branch.fc.weight, branch.fc.bias))  # lda{i}_fc
    x4 = stages[3]
    lda_vec.append(F.linear(F.avg_pool2d(x4, 7).reshape(len(x4), -1), model.lda[3].fc.weight, model.lda[3].fc.bias))
    target_in = torch.cat(lda_vec, 1).view(-1, 224, 1, 1)
    reduce = [m for m in model.hyper.reduce if isinstance(m, torch.nn.Conv2d)]
    h = x4
    for conv in reduce:  # conv1: 1x1 convs with ReLU after each
        h = F.relu(F.conv2d(h, conv.weight, conv.bias))
    h = h.view(-1, 112, 7, 7)
    pool = h.mean((2, 3))
    sizes = [224, 112, 56, 28, 14]
    weights = [F.conv2d(h, c.weight, c.bias, padding=1).view(-1, sizes[i + 1], sizes[i], 1, 1)
               for i, c in enumerate(model.hyper.weight_convs)]
    weights.append(F.linear(pool, model.hyper.last_weight.weight, model.hyper.last_weight.bias).view(-1, 1, 14, 1, 1))
    biases = [F.linear(pool, fc.weight, fc.bias) for fc in model.hyper.bias_fcs]

    def target_fc(x, w, b):  # TargetFC: one group per image
        out = F.conv2d(x.view(1, -1, 1, 1), w.reshape(-1, w.shape[2], 1, 1), b.reshape(-1), groups=w.shape[0])
        return out.view(x.shape[0], w.shape[1], 1, 1)

    q = target_in
    for i in range(5):
        q = target_fc(q, weights[i], biases[i])
        if i < 4:
            q = torch.sigmoid(q)
    return q.squeeze()


def test_koniq_resnet50_forward_is_the_original_computation():
    torch.manual_seed(0)
    model = build_model(load_config("koniq-resnet50", ["model.pretrained=none"]).model).eval()
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(img), original_hypernet(model, img), rtol=1e-5, atol=1e-5)


def test_initialisation_is_the_originals():
    """Kaiming-normal for LDA and the target-weight generators; PyTorch's default (uniform,
    std 1/sqrt(3 fan_in)) for the 1x1 convs that reduce the backbone features."""
    torch.manual_seed(0)
    model = build_model(load_config("koniq-resnet50", ["model.pretrained=none"]).model)
    for conv in (m for m in model.hyper.reduce if isinstance(m, torch.nn.Conv2d)):
        fan_in = conv.weight[0].numel()
        assert float(conv.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    for layer in [*model.hyper.weight_convs, model.lda[0].fc]:
        fan_in = layer.weight[0].numel()
        assert float(layer.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)


# ---------------------------------------------------------------- optimizer, groups, schedule


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_one_step_equals_the_closed_form(kind):
    """Adam adds the L2 decay to the gradient; AdamW shrinks the weight separately."""
    lr, wd, g, w0 = 0.1, 0.5, 0.3, 2.0
    model = build_model(load_config("demo", ["model.pretrained=none"]).model)
    cfg = load_config("demo", [f"optim.optimizer={kind}", f"optim.lr={lr}", "optim.lr_ratio=1",
                               f"optim.weight_decay={wd}"])
    opt = build_optimizer(model, cfg, fused=False)
    p = opt.param_groups[0]["params"][0]
    with torch.no_grad():
        for q in model.parameters():
            q.fill_(w0)
            q.grad = torch.full_like(q, g)
    opt.step()
    eps = 1e-8
    if kind == "adam":  # m = (1-b1) g', v = (1-b2) g'^2, g' = g + wd w; bias-corrected step = lr * g'/(|g'| + eps')
        g2 = g + wd * w0
        expected = w0 - lr * g2 / (abs(g2) + eps)
    else:  # w (1 - lr wd) - lr * g/|g|
        expected = w0 * (1 - lr * wd) - lr * g / (abs(g) + eps)
    assert float(p.detach().flatten()[0]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("preset", ["koniq-swin-t", "koniq-resnet50", "koniq-swin-b-long", "demo"])
def test_every_parameter_is_in_exactly_one_group(preset):
    cfg = load_config(preset, ["model.pretrained=none"])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg, fused=False)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    lda = {id(p) for p in model.lda.parameters()}
    group_of = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    assert {group_of[i] for i in lda} == {cfg.optim.lda_group}
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"backbone": cfg.optim.lr,
                                                              "head": cfg.optim.lr * cfg.optim.lr_ratio}
    sizes = group_sizes(opt)
    assert sum(sizes.values()) == sum(p.numel() for p in model.parameters())


def test_koniq_resnet50_is_the_original_solver_but_for_one_stated_departure():
    cfg = load_config("koniq-resnet50")
    o = cfg.optim
    assert (o.optimizer, o.lr, o.lr_ratio, o.weight_decay, o.lda_group, o.schedule) == (
        "adam", 2e-5, 10.0, 5e-4, "backbone", "constant")
    assert cfg.model.backbone == "resnet50.tv_in1k" and cfg.model.pretrained == "hub"
    assert (cfg.data.train_patch_num, cfg.data.test_patch_num, cfg.data.test_protocol) == (25, 25, "random")
    assert o.freeze_hyper_after == 0  # the departure: the hyper network trains after epoch 1
    for preset in ("koniq-swin-t", "koniq-swin-b-long", "koniq-resnet50"):
        assert "." in load_config(preset).model.backbone, f"{preset} pins its weights tag"


def test_freeze_hyper_after_restores_the_originals_frozen_hyper_network():
    cfg = load_config("koniq-resnet50", ["model.pretrained=none", "optim.freeze_hyper_after=1"])
    schedule = Schedule.of(cfg, total_steps=30, steps_per_epoch=10)
    lrs = [schedule.lrs(step) for step in range(25)]
    assert lrs[0] == [2e-5, 2e-4] and lrs[9] == [2e-5, 2e-4]
    assert lrs[10] == [2e-5, 0.0] and lrs[24] == [2e-5, 0.0]  # epoch 2 on: head frozen, backbone constant


# ---------------------------------------------------------------- weights with provenance


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding `resnet18.tv_in1k` (random weights), laid out as the hub
    client writes it: models--timm--resnet18.tv_in1k/{refs/main, snapshots/<rev>/model.safetensors}."""
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "models--timm--resnet18.tv_in1k"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    torch.manual_seed(3)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(weights, repo / "snapshots" / rev / "model.safetensors")
    return home, weights


@pytest.fixture()
def offline_hub(hub_cache, monkeypatch):
    from huggingface_hub import constants

    home, weights = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home, weights


def test_hub_weights_load_offline_with_their_sha256(offline_hub):
    from iqa_dist.config import ModelConfig
    from iqa_dist.models.weights import provenance, sha256

    home, weights = offline_hub
    cfg = ModelConfig(backbone="resnet18.tv_in1k", pretrained="hub", fusion="last", hyper_hidden=[64])
    model = build_model(cfg)
    torch.testing.assert_close(model.backbone.state_dict()["conv1.weight"], weights["conv1.weight"])
    found = provenance(cfg)
    assert found["source"] == "hub" and found["tag"] == "resnet18.tv_in1k" and found["repo"] == "timm/resnet18.tv_in1k"
    assert found["sha256"] == sha256(next(home.rglob("model.safetensors")))
    with pytest.raises(UserError, match=r"iqa-dist weights fetch --model.backbone resnet34.tv_in1k"):
        build_model(ModelConfig(backbone="resnet34.tv_in1k", pretrained="hub", fusion="last", hyper_hidden=[64]))


def test_weights_fetch_and_a_missing_file_fails_before_the_data(offline_hub, tmp_path):
    out = here("weights", "fetch", "--model.backbone", "resnet18.tv_in1k")
    assert out.returncode == 0, out.stderr
    assert "resnet18.tv_in1k" in out.stdout and "sha256 " in out.stdout
    missing = here("train", "--preset", "koniq-swin-t", "--data.root", str(tmp_path / "no-such-folder"),
                   "--run.root", str(tmp_path / "runs"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "iqa-dist weights fetch --model.backbone swin_tiny_patch4_window7_224.ms_in1k" in missing.stderr
    assert "no-such-folder" not in missing.stderr  # the weights are checked before the data
    assert not (tmp_path / "runs").exists()  # and nothing was created


def test_an_unreachable_hub_fails_in_seconds_in_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    """No cached weights and a hub that does not answer (a compute node; here an endpoint that
    refuses): `train` and `weights fetch` each stop at once (huggingface_hub would retry for most of a
    minute first), in one line with the ways out, never telling `weights fetch` to run itself."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    t0 = time.monotonic()
    train = here("train", "--preset", "koniq-swin-t", "--data.root", str(tmp_path), "--run.root", str(tmp_path / "runs"))
    fetch = here("weights", "fetch", "--preset", "koniq-swin-t")
    assert time.monotonic() - t0 < 20
    [line] = train.stderr.strip().splitlines()
    assert train.returncode == 2 and "127.0.0.1 cannot be reached from here" in line, train.stderr
    assert "HF_HUB_OFFLINE=1" in line and "--model.pretrained=FILE" in line and "iqa-dist weights fetch" in line
    [line] = fetch.stderr.strip().splitlines()
    assert fetch.returncode == 2 and "run it on a machine with internet" in line and "--model.pretrained=FILE" in line
    assert "iqa-dist weights fetch" not in line
    assert not (tmp_path / "runs").exists()


def test_run_and_card_record_weights_and_groups(single_run):
    meta = json.loads((single_run / "meta.json").read_text())
    card = json.loads((single_run / "model" / "config.json").read_text())
    for record in (meta, card):
        assert record["weights"]["source"] == "none" and record["weights"]["tag"]
    assert set(meta["parameter_groups"]) == {"backbone", "head"} == set(card["groups"])
    assert card["protocol"] == "random" and card["test_patch_num"] == 2
    assert card["datasets"]["synthetic"]["data"]["split"] == "random"


# ---------------------------------------------------------------- one test-time protocol


def _evaluate_and_predict(run, cache_root):
    from iqa_dist.scoring.evaluate import evaluate_model

    report = evaluate_model(run, "synthetic", "test", [f"data.cache_dir={cache_root}"])
    root = next(p for p in cache_root.glob("synthetic-src-*") if p.is_dir())
    scorer = iqa_dist.load_model(run, "cpu")
    predicted = scorer.score([root / name for name in report["per_image"]["names"]])
    return report["per_image"]["preds"], predicted


def test_predict_reproduces_evaluate_per_image_under_both_protocols(single_run, cache_root, tmp_path):
    evaluated, predicted = _evaluate_and_predict(single_run, cache_root)
    assert len(evaluated) > 10
    assert predicted == pytest.approx(evaluated, abs=1e-4)
    grid_run = tmp_path / "grid"
    shutil.copytree(single_run, grid_run)
    card_file = grid_run / "model" / "config.json"
    card = json.loads(card_file.read_text())
    card["protocol"] = "grid"
    card_file.write_text(json.dumps(card))
    grid_evaluated, grid_predicted = _evaluate_and_predict(grid_run, cache_root)
    assert grid_predicted == pytest.approx(grid_evaluated, abs=1e-4)
    assert grid_evaluated != pytest.approx(evaluated, abs=1e-4)  # the protocol came from the card


# ---------------------------------------------------------------- the ranking loss


def test_ranking_term_sums_to_the_mean_pairwise_hinge():
    torch.manual_seed(0)
    pred, target = torch.randn(12), torch.randn(12)
    target[3] = target[4]  # a tie: not a pair
    dp = pred[:, None] - pred[None, :]
    sign = torch.sign(target[:, None] - target[None, :])
    hinge = F.relu(-dp * sign).sum() / (sign != 0).sum()
    one = torch.zeros(12, dtype=torch.long)  # one dataset
    whole = sample_losses(pred, target, 0.3, (pred, target, one))
    assert float(whole.sum()) == pytest.approx(float((pred - target).abs().sum() + 0.3 * 12 * hinge), rel=1e-6)
    parts = sum(sample_losses(pred[sl], target[sl], 0.3, (pred, target, one), sl.start).sum()
                for sl in (slice(0, 5), slice(5, 12)))
    assert float(parts) == pytest.approx(float(whole.sum()), rel=1e-6)  # splitting the batch changes nothing


def test_ranking_pairs_never_cross_datasets():
    """Samples of different datasets are never a pair: moving one dataset's predictions by any
    amount changes nothing in the other's ranking term, and the term equals each dataset's own."""
    torch.manual_seed(1)
    pred, target = torch.randn(10), torch.randn(10)
    groups = torch.tensor([0] * 6 + [1] * 4)
    base = sample_losses(pred, target, 1.0, (pred, target, groups)) - (pred - target).abs()
    shifted = pred.clone()
    shifted[6:] += 100.0  # dataset 1 far above dataset 0: cross pairs would all be violated
    moved = sample_losses(shifted, target, 1.0, (shifted, target, groups)) - (shifted - target).abs()
    torch.testing.assert_close(moved[:6], base[:6])
    torch.testing.assert_close(moved[6:], base[6:])
    a, b = slice(0, 6), slice(6, 10)
    pairs_a = (torch.sign(target[a, None] - target[None, a]) != 0).sum()
    pairs_b = (torch.sign(target[b, None] - target[None, b]) != 0).sum()
    own_a = F.relu(-(pred[a, None] - pred[None, a]) * torch.sign(target[a, None] - target[None, a])).sum()
    own_b = F.relu(-(pred[b, None] - pred[None, b]) * torch.sign(target[b, None] - target[None, b])).sum()
    assert float(base.sum()) == pytest.approx(float(10 * (own_a + own_b) / (pairs_a + pairs_b)), rel=1e-6)


@pytest.mark.slow
def test_ranking_loss_is_the_same_on_one_and_two_processes(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *RUN, "train.max_steps=4", "train.eval_every=2", "optim.rank_weight=0.3"]
    one = train_here([*overrides, f"run.root={tmp_path / 'one'}"])
    two = run_train([*overrides, f"run.root={tmp_path / 'two'}"], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = metrics(only_run(tmp_path / "one")), metrics(only_run(tmp_path / "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4]
    for x, y in zip(a, b):
        for key in ("train_loss", "val_srcc", "val_plcc"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), key
    code, _, err = cli("train", "--preset", "demo", *[f"--{o}" for o in overrides], "--train.micro_batch_size=4",
                       f"--run.root={tmp_path / 'three'}")
    assert code == 2 and "micro_batch_size" in err and "Traceback" not in err

