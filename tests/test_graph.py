"""train.cuda_graph, proven on the CPU where it can be: the keyed uniforms (uniform, the same for any
batch split, a function of the step in device memory), the graphed body ready for capture (the same
buffers every step, no host number in a kernel, no host allocation, no sync), the same training as
the eager step, the latched guard, the refusals. The capture and replay themselves need CUDA: the
tests at the end skip without it (launch/gpu_bench.sh runs them)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from iqa_dist.bench.audit import StepAudit, capture_blockers
from iqa_dist.bench.graphs import equality
from iqa_dist.bench.rig import StepRig
from iqa_dist.config import load_config
from iqa_dist.distributed.shards import Shares
from iqa_dist.errors import UserError
from iqa_dist.training.batches import KeyedNoise, mix32
from iqa_dist.training.graph import GraphedStep, refusal
from iqa_dist.training.guard import BadStep

from .conftest import TINY_SWIN_KWARGS as TINY_SWIN
from .conftest import cli
from .test_audit import store, tiny_recipe

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the keyed uniforms


def test_mix32_is_lowbias32_without_leaving_int64():
    """Against the reference in Python's unbounded integers, at the edges of the 32-bit range."""
    def ref(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 0xDEADBEEF]
    assert mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [ref(x) for x in xs]


def test_keyed_noise_is_uniform_and_keyed_by_seed_step_sample_column():
    noise = KeyedNoise(seed=7, width=16, batch=96, device=CPU)
    u = torch.stack([noise.draw(torch.tensor(s)) for s in range(60)])  # (60, 96, 16): 92,160 numbers
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    flat = np.sort(u.flatten().double().numpy())
    ks = np.max(np.abs(flat - (np.arange(1, flat.size + 1) / flat.size)))
    assert ks < 0.01, ks  # 1.63 / sqrt(n) = 0.0054 is the 1% critical value
    counts = np.histogram(flat, bins=20, range=(0, 1))[0]
    chi2 = ((counts - flat.size / 20) ** 2 / (flat.size / 20)).sum()
    assert chi2 < 43.8, chi2  # 19 degrees of freedom, 0.1% critical value
    assert abs(np.corrcoef(u[:-1].flatten(), u[1:].flatten())[0, 1]) < 0.02  # step s vs step s + 1
    assert abs(np.corrcoef(u[:, :-1].flatten(), u[:, 1:].flatten())[0, 1]) < 0.02  # sample i vs i + 1
    # a function of (seed, step, sample, column) alone: a resumed run, a smaller global batch (its rows
    # are the first samples), or any split over processes and micro-batches reads the same numbers
    assert torch.equal(KeyedNoise(7, 16, 40, CPU).draw(torch.tensor(5)), u[5, :40])
    assert not torch.equal(KeyedNoise(8, 16, 96, CPU).draw(torch.tensor(5)), u[5])
    assert KeyedNoise(7, 0, 96, CPU).draw(torch.tensor(5)) is None
    # the eager step passes the step as a host int, the graphed one as a device tensor: the same bits
    for step in (0, 5, 59, 2**32 + 5):
        assert torch.equal(noise.draw(step), noise.draw(torch.tensor(step)))


def test_keyed_noise_rows_are_the_same_for_every_split_of_the_batch():
    """The graphed body slices the global matrix by each micro-batch's offset: with 1, 2 or 3
    micro-batches (or processes, which take chunks the same way) sample i gets row i."""
    cfg = tiny_recipe()
    full = None
    for micro in (0, 3, 2):
        rig = StepRig.build(load_config("koniq-swin-t", [*_tiny(), f"train.micro_batch_size={micro}"]), store(), "fp32",
                            6, CPU)
        g = GraphedStep(rig.trainer, rig.batches, capture=False)
        g.write(4)
        u = rig.batches.noise.draw(g.step_number.long())
        rows = torch.cat([u[start:start + len(packed)] for start, _, packed in g.inputs])
        full = rows if full is None else full
        assert torch.equal(rows, full) and len(g.inputs) == max(1, 6 // micro if micro else 1)
    assert cfg.model.dropout > 0  # the recipe's regularisers read these rows


def test_keyed_noise_gives_every_process_the_rows_of_one_process():
    """Each process builds its own KeyedNoise and takes the rows of its chunks (Shares), as the
    graphed body does: over 1, 2 or 3 processes, micro-batched or not, the rows add up to the one
    process's matrix, sample for sample."""
    one = KeyedNoise(3, 8, 12, CPU).draw(torch.tensor(9))
    for world in (1, 2, 3):
        for micro in (0, 2):
            rows = {}
            for rank in range(world):
                u = KeyedNoise(3, 8, 12, CPU).draw(torch.tensor(9))
                rows.update({sl.start: u[sl] for sl in Shares.split(12, micro, world, rank).slices()})
            assert torch.equal(torch.cat([rows[k] for k in sorted(rows)]), one), (world, micro)


def _tiny(*extra: str) -> list[str]:
    return ["model.pretrained=none", f"model.backbone_kwargs={json.dumps(TINY_SWIN)}", "model.img_size=64",
            "train.ema_decay=0.9", *extra]


# ---------------------------------------------------------------- capture readiness of the graphed body


def test_the_graphed_body_is_ready_for_capture():
    """Traced over 3 steps, the body a graph would hold (augmentation, keyed noise, forward, loss,
    backward, clipping, the latched guard and its download, the fused update with its device
    learning rate, the EMA): no blocker of the eager step's 4 is left, no host sync, and its inputs
    are the same buffers every step."""
    rig = StepRig.build(tiny_recipe(), store(), "fp32", 4, CPU)
    g = GraphedStep(rig.trainer, rig.batches, capture=False)
    g.step()  # the optimizer's state exists (as after the warm-up)
    inputs = {g.numbers.data_ptr(), *(pixels.data_ptr() for _, pixels, _ in g.inputs)}
    hosts = [h.data_ptr() for h in (*g.host, rig.trainer.guard.host)]  # allocated once (pinned on CUDA)
    device = [*rig.device_tensors(), *g.static_tensors()]
    audit = StepAudit(device, trace=True)
    for s in range(1, 4):
        g.write(s)
        with audit:
            audit.next_step()
            loss, norm = g.body()
        g.finish(s, loss, norm)
        assert {g.numbers.data_ptr(), *(pixels.data_ptr() for _, pixels, _ in g.inputs)} == inputs
        assert [h.data_ptr() for h in (*g.host, rig.trainer.guard.host)] == hosts
    assert capture_blockers(audit.steps_traced) == []
    report = audit.report(3)
    assert report.syncs == [], report.syncs
    assert report.kernels["optimizer"] > 0 and report.kernels["noise"] > 0 and report.kernels["ema"] > 0
    assert rig.trainer.state.step == 4


# ---------------------------------------------------------------- the same training


@pytest.mark.parametrize("rank_weight", [0.0, 0.3])
def test_the_graphed_step_trains_what_the_eager_step_trains(rank_weight):
    """Dropout, drop path and ColorJitter on (both steps read the one keyed stream): the same
    losses step by step, the same weights and EMA to the bit, the same learning rate. With the
    ranking term the global batch's targets and datasets are graph inputs too."""
    shared = store()

    def run(graphed: bool):
        rig = StepRig.build(tiny_recipe(), copy.deepcopy(shared), "fp32", 4, CPU)
        rig.trainer.rank_weight = rig.batches.rank_weight = rank_weight
        g = GraphedStep(rig.trainer, rig.batches, capture=False) if graphed else None
        losses = []
        for _ in range(4):
            g.step() if g else rig.trainer.step(rig.batches.get(rig.trainer.state.step))
            rig.trainer.settle()
            losses.append(rig.trainer.state.loss.total)
        return rig, losses

    (a, la), (b, lb) = run(False), run(True)
    assert la == lb
    assert a.trainer.bare.cfg.dropout > 0 and a.trainer.bare.cfg.drop_path > 0
    for p, q in zip(a.trainer.bare.parameters(), b.trainer.bare.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.trainer.ema.model.parameters(), b.trainer.ema.model.parameters()):
        assert torch.equal(p, q)
    assert a.trainer.lr() == b.trainer.lr() and a.trainer.state.step == b.trainer.state.step == 4


def test_the_equality_check_of_bench_graph_on_the_cpu():
    cfg = tiny_recipe()
    out = equality(cfg, store(), "fp32", 4, 3, CPU)
    assert out["steps"] == 3 and out["loss_max_rel"] == 0 and out["weights_rel"] == 0 and not out["captured"]
    assert out["floor_loss_max_rel"] == 0 and out["first_losses"][0] > 0
    assert math.isfinite(out["last_loss"])


def test_a_bad_step_latches_and_names_the_first_bad_step():
    """A non-finite loss at step 2: the step after it may run before the host reads step 2's flag,
    but the latch skips its update too, so the weights are those after step 1 and BadStep names 2."""
    rig = StepRig.build(tiny_recipe(), store(), "fp32", 4, CPU)
    g = GraphedStep(rig.trainer, rig.batches, capture=False)
    forward = rig.trainer.forward
    rig.trainer.forward = lambda x, noise: forward(x, noise) * (math.nan if g.step_number.item() == 2 else 1.0)
    g.step()
    g.step()
    after_1 = [p.detach().clone() for p in rig.trainer.bare.parameters()]
    with pytest.raises(BadStep) as bad:  # read after step 2 or 3: the host buffer holds the latest latch
        for _ in range(2):
            g.step()
    assert bad.value.step == 2 and bad.value.what == "loss" and rig.trainer.state.step == 2
    assert rig.trainer.lr() == rig.trainer.schedule.lrs(2)[0]  # the rate of the step after the 2 applied ones
    for p, q in zip(rig.trainer.bare.parameters(), after_1):
        assert torch.equal(p, q)


def test_the_graphed_loop_trains_stops_and_resumes_like_an_uninterrupted_run(tiny_overrides, tmp_path, monkeypatch):
    """`iqa-dist train --train.cuda_graph true` through the real loop (evaluation, checkpoints,
    export, the stop file, --resume), on the CPU with its refusal lifted and the body run eagerly
    instead of captured: a run stopped at its first step and resumed ends where an uninterrupted
    one ends (the keyed noise is a function of the step; the learning rate, a device tensor in the
    checkpoint, comes back as a number and becomes the graph's tensor again)."""
    from iqa_dist.training import loop

    from .conftest import RUN, cut_at_first_step, metrics, only_run, train_here

    monkeypatch.setattr(loop, "refusal", lambda **_: "")
    init, made = GraphedStep.__init__, []

    def eager(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "capture": False})
        made.append(self)

    monkeypatch.setattr(GraphedStep, "__init__", eager)
    overrides = [*tiny_overrides, *RUN, "train.cuda_graph=true"]
    ref = train_here([*overrides, f"run.root={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    assert len(made) == 1 and made[0].ran == 6  # every step was the graphed step's
    run = cut_at_first_step(overrides, tmp_path / "cut", monkeypatch)
    again = train_here(overrides, resume=str(run))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    a, b = metrics(only_run(tmp_path / "ref")), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for x, y in zip(a, b):
        assert isinstance(y["lr"], float) and y["lr"] == pytest.approx(x["lr"], rel=1e-6)
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-6)
        assert y["val_srcc"] == pytest.approx(x["val_srcc"], abs=1e-6)
    assert (run / "summary.json").is_file()


def test_a_run_begun_on_the_generator_stream_resumes_on_it_exactly(tiny_overrides, tmp_path, monkeypatch):
    """A run begun before KeyedNoise became the one stream (drawing dropout and drop path from the
    generator, its checkpoint's TrainState without noise_stream) resumes with the stream it began
    with: stopped at its first step and resumed by today's code, it ends where an uninterrupted run
    on that stream ends, to the bit; the keyed stream trains other numbers, so the check can tell."""
    from iqa_dist.training import loop
    from iqa_dist.training.batches import NoiseSource

    from .conftest import RUN, cut_at_first_step, metrics, only_run, train_here

    overrides = [*tiny_overrides, *RUN, "model.dropout=0.3", "model.drop_path=0.2"]
    build = loop.build

    def begun_before(*args, **kwargs):  # what train did then: the generator's uniforms from the first step
        r = build(*args, **kwargs)
        r.batches.noise = NoiseSource(r.cfg.train.seed, r.trainer.bare.noise_width, r.batches.shares.batch_size,
                                      r.acc.device)
        r.trainer.state.noise_stream = "generator"
        return r

    keyed = train_here([*overrides, f"run.root={tmp_path / 'keyed'}"])
    assert keyed.returncode == 0, keyed.stderr[-2000:]
    with monkeypatch.context() as m:
        m.setattr(loop, "build", begun_before)
        ref = train_here([*overrides, f"run.root={tmp_path / 'ref'}"])
        assert ref.returncode == 0, ref.stderr[-2000:]
        run = cut_at_first_step(overrides, tmp_path / "cut", m)
    [checkpoint] = (run / "checkpoints").iterdir()
    state = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    del state["noise_stream"]  # as a checkpoint written before the field existed
    torch.save(state, checkpoint / "custom_checkpoint_0.pkl")
    again = train_here(overrides, resume=str(run))  # today's code, unpatched
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "dropout and drop path from the generator stream it began with" in again.stdout + again.stderr
    a, b, k = metrics(only_run(tmp_path / "ref")), metrics(run), metrics(only_run(tmp_path / "keyed"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    assert [r["train_loss"] for r in b] == [r["train_loss"] for r in a]
    assert [r["val_srcc"] for r in b] == [r["val_srcc"] for r in a]
    assert [r["train_loss"] for r in k] != [r["train_loss"] for r in a]  # the other stream: other numbers


# ---------------------------------------------------------------- what it refuses


def test_train_cuda_graph_refuses_what_it_cannot_graph():
    with pytest.raises(UserError, match="does not take train.compile"):
        load_config("koniq-swin-t", ["train.cuda_graph=true", "train.compile=true"])
    with pytest.raises(UserError, match="fp16: the loss scaler"):
        load_config("koniq-swin-t", ["train.cuda_graph=true", "train.mixed_precision=fp16"])
    assert "needs a CUDA device (this run is on cpu)" in refusal(processes=1, device=CPU)
    assert "one process for now" in refusal(processes=2, device=torch.device("cuda"))
    assert refusal(processes=1, device=torch.device("cuda")) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")
def test_train_cuda_graph_on_a_cpu_fails_in_one_line(tmp_path):
    code, _, err = cli("train", "--preset", "demo", "--train.cuda_graph", "true", f"--run.root={tmp_path}")
    assert code != 0 and "Traceback" not in err
    assert "train.cuda_graph needs a CUDA device (this run is on cpu)" in err
    assert not any(tmp_path.iterdir())  # refused before anything was built or written


# ---------------------------------------------------------------- on a GPU only


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
def test_gpu_graphed_steps_equal_eager_steps():
    """50 steps captured once and replayed against the same 50 steps eager, from the same start."""
    out = equality(tiny_recipe(), store().to(torch.device("cuda")), "bf16", 8, 50, torch.device("cuda"))
    assert out["captured"], out  # no further from eager than eager is from itself (deterministic kernels: 0)
    assert out["loss_max_rel"] <= max(1e-6, 10 * out["floor_loss_max_rel"]), out
    assert out["weights_rel"] <= max(1e-6, 10 * out["floor_weights_rel"]), out


@cuda
def test_gpu_graph_replays_one_launch_per_step():
    """After the capture the host launches the copy of the numbers, one replay, the schedule's and
    loss window's few kernels: the profiler counts the launches of 5 steady steps."""
    device = torch.device("cuda")
    rig = StepRig.build(tiny_recipe(), store().to(device), "bf16", 8, device)
    g = GraphedStep(rig.trainer, rig.batches, capture=True)
    for _ in range(g.warmup + 2):
        g.step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]  # CUPTI: the runtime calls
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            g.step()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel"))]
    replays = [e for e in prof.events() if e.name.startswith("cudaGraphLaunch")]
    assert len(replays) == 5 and len(launches) <= 5 * 12, (len(replays), len(launches))


# ---------------------------------------------------------------- bench profile (the table the GPU run reads)


def test_bench_profile_reduces_a_trace_to_parts(tmp_path):
    from iqa_dist.bench.profile import bench_profile
    from rich.console import Console

    cfg = load_config("koniq-swin-t", _tiny())
    [row] = bench_profile(cfg, "tiny", "fp32", 4, [False], 8, 2, CPU, tmp_path, Console(quiet=True))
    assert row["mode"] == "eager" and row["steps"] == 2 and row["device_idle_ms"] is None
    assert {"host", "augment", "forward", "backward", "optimizer", "guard"} <= set(row["parts"])
    assert all(p["host_ms"] > 0 for p in row["parts"].values())
    assert row["parts"]["forward"]["host_ms"] < row["wall_ms"] and (tmp_path / "profile-tiny-eager.json").is_file()


def test_bench_graph_projects_one_run_over_gpus():
    """At global batch 96, 8 GPUs each run the batch-12 step: 8 x its rate, against one GPU at 96."""
    from iqa_dist.bench.graphs import project

    rows = [{"batch": 12, "eager": 200.0, "graphed": 1000.0}, {"batch": 96, "eager": 1500.0, "graphed": 1800.0},
            {"batch": 40, "eager": 1.0, "graphed": 1.0}]
    out = {r["gpus"]: r for r in project(rows)}
    assert sorted(out) == [1, 8]  # 40 does not divide 96
    assert out[8]["eager"] == 1600 and out[8]["graphed"] == 8000
    assert out[8]["graphed_x_one_gpu"] == pytest.approx(8000 / 1500) and out[1]["eager_x_one_gpu"] == 1
    assert project(rows[:1]) == []  # no measurement at the global batch: nothing to project from
