"""`iqa-dist bench`."""

from __future__ import annotations

import argparse

from ..errors import UserError
from .options import add_config_arguments, add_preset, config_from, positive

NAME = "bench"
# bench.run.BENCHES (imported only when a bench runs: it loads torch), then the two that are not benches
WHAT = ("augment", "data", "train", "eval", "scaling", "kernels", "predict", "graph", "profile", "serve",
        "summary", "all")
USAGE = "iqa-dist bench WHAT [options] [--SECTION.FIELD=VALUE ...]"
HELP = "measure the data pipeline, training and evaluation throughput"
DESCRIPTION = """\
Throughput figures measured side by side in one run, printed as tables and written to a JSON file
with the machine: the data pipeline against phase one's, the augmentation against torchvision's,
the real training step against the model-only step and a plain timm classifier of the same
backbone (the anchor), evaluation images/s, and the step's kernel budget (device kernels and
host syncs per step, counted on any device).

examples:
  iqa-dist bench train --batch 12,24,48,96,192 --precisions bf16   # the per-GPU batch table
  iqa-dist bench all --batch 96 --steps 20 --workers 8 --compile
  iqa-dist bench scaling --batch 12,24,48,96,192 --global-batch 96   # projected epoch time on 1-64 GPUs
  iqa-dist bench kernels --backbones swin-t   # kernels and host syncs per step (+ the sync check on a GPU)
  iqa-dist bench graph --batch 12,24,48,96,192   # train.cuda_graph vs eager, and 50 steps' equality
  iqa-dist bench profile --batch 96 --steps 5 --compile   # per part host and device ms, device idle, eager vs compiled
  iqa-dist bench predict --images 48 --workers 2   # predict before/after decoding in workers; torch vs onnxruntime
  iqa-dist bench serve --images 48 --clients 1,16   # serve's images/s, p50/p99 latency vs predict's images/s
  iqa-dist bench summary --work-dir runs/gpu-bench   # gpu_bench.sh's figures as one JSON and a markdown table"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, metavar="WHAT",
                   help=f"which figures: {', '.join(WHAT)} (summary: one JSON and a markdown table from a "
                   "launch/gpu_bench.sh folder)")
    p.add_argument("--images", type=int, default=24, help="data, predict: KonIQ-size source JPEGs [24]")
    p.add_argument("--batch", default="32", help="patches per batch; train takes a comma list [32; use 96 on a GPU]")
    p.add_argument("--steps", type=int, default=6, help="timed batches per figure, after warm-up, in 3 blocks whose "
                   "median is the figure and whose spread is printed beside it [6]")
    p.add_argument("--workers", type=int, default=2, help="data: DataLoader workers of phase one's pipeline; predict: decoding workers [2]")
    p.add_argument("--backbones", default="", help="train: comma list of tiny,swin-t,swin-s,swin-b "
                   "[tiny on CPU, swin-t,swin-s,swin-b on GPU]")
    p.add_argument("--precisions", default="", help="train: comma list of fp32,bf16 [fp32 on CPU, both on GPU]")
    p.add_argument("--compile", action="store_true", help="train, eval, kernels: also measure torch.compile")
    p.add_argument("--device", default=None, help="cuda, cpu [default: cuda when available]")
    p.add_argument("--global-batch", type=int, default=96, help="scaling: the global batch projected [96]")
    p.add_argument("--intra-gbps", type=float, default=360.0,
                   help="scaling: all-reduce bus bandwidth per GPU within a node, GB/s [360: NVLink, H100/H200]")
    p.add_argument("--inter-gbps", type=float, default=45.0,
                   help="scaling: all-reduce bus bandwidth per GPU across nodes, GB/s [45: a 400 Gb/s NIC per GPU]")
    p.add_argument("--check-steps", type=int, default=50, help="graph: graphed steps compared with the same steps "
                   "run eagerly [50]")
    p.add_argument("--clients", default="1,16", help="serve: concurrent clients, comma list, a figure each [1,16]")
    p.add_argument("--max-batch", type=int, default=16, help="serve: the server's --max-batch [16]")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="serve: the server's --max-wait-ms [10]")
    p.add_argument("--output", default="", help="JSON file [default runs/bench-WHAT-TIME.json]")
    p.add_argument("--work-dir", default="", help="where source JPEGs and caches go [a temporary folder]")
    add_preset(p, "koniq-swin-t")
    # all bench reads: the patch, and for train and kernels the weight EMA and self-distillation from it
    add_config_arguments(p, ["model.img_size", "data.train_patch_num", "data.test_patch_num", "train.ema_decay",
                             "optim.distill_weight"])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bench.inputs import BACKBONES

    if args.what == "summary":
        from ..bench.summary import summary

        folder = Path(args.work_dir or "runs/gpu-bench")
        if not folder.is_dir():
            raise UserError(f"--work-dir {folder}: no such folder (the OUT_DIR of launch/gpu_bench.sh)")
        print(summary(folder, Path(args.output) if args.output else folder / "gpu-bench.json"), end="")
        return 0

    batches = [b.strip() for b in str(args.batch).split(",")]
    if not all(b.isdigit() and int(b) > 0 for b in batches):
        raise UserError(f"--batch {args.batch}: expected positive whole numbers, comma-separated (e.g. 12,24,48,96)")
    for option, given, known in (("--backbones", args.backbones, BACKBONES), ("--precisions", args.precisions,
                                                                              ("fp32", "bf16"))):
        unknown = [x for x in given.split(",") if x not in known] if given else []
        if unknown:
            raise UserError(f"{option}: {unknown[0]!r} is not one of {', '.join(known)}")
    clients = [c.strip() for c in str(args.clients).split(",")]
    if not all(c.isdigit() and int(c) > 0 for c in clients):
        raise UserError(f"--clients {args.clients}: expected positive whole numbers, comma-separated (e.g. 1,16)")
    positive("--max-batch", args.max_batch)
    if args.max_wait_ms < 0:
        raise UserError(f"--max-wait-ms {args.max_wait_ms:g}: must be 0 or more")
    positive("--steps", args.steps)
    positive("--check-steps", args.check_steps)
    positive("--images", args.images)
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU is visible on this machine")
    import tempfile

    import torch

    from ..bench.run import BenchSettings, run_bench
    from ..bench.show import show, warn_noisy
    from ..output import console

    settings = BenchSettings(
        device=torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        work=Path(args.work_dir or tempfile.mkdtemp(prefix="iqa-bench-")), batches=[int(b) for b in batches],
        steps=args.steps, images=args.images, workers=args.workers, compile=args.compile,
        backbones=args.backbones.split(",") if args.backbones else [],
        precisions=args.precisions.split(",") if args.precisions else [],
        check_steps=args.check_steps, global_batch=args.global_batch, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
        clients=[int(c) for c in clients], max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    report = run_bench(args.what, config_from(args), settings, Path(args.output) if args.output else None)
    show(report)
    warn_noisy(report, console(stderr=True))
    return 0
