"""Scoring's figures: evaluation images/s (the test protocol's patches), and `predict`'s
images/s with its parts (decoding, upload, the model).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console

from ..config import Config, load_config
from ..data.augment import Augmenter
from ..data.cache import prepare
from ..models.hyperiqa import build_model
from ..scoring.predictions import predict_images
from ..training.compile import compile_model
from .inputs import BACKBONES, source_images
from .timing import measure


def bench_eval(cfg: Config, n_images: int, batch_patches: int, compiles: list[bool], device: torch.device,
               work: Path, repeats: int) -> list[dict]:
    """Images/s of evaluation (`scoring.predictions.predict_images`, what training and `evaluate` run): the
    tiny model on a CPU, Swin-T in bf16 on a GPU, over every test image's protocol patches."""
    name = "tiny" if device.type == "cpu" else "swin-t"
    backbone, kwargs, size = BACKBONES[name]
    root = source_images(work / "koniq", n_images)
    c = load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"model.img_size={size}",
                                     f"data.cache_dir={work / 'cache'}", f"model.backbone={backbone}",
                                     "model.pretrained=none", f"data.test_patch_num={cfg.data.test_patch_num}"])
    c = replace(c, model=replace(c.model, backbone_kwargs=kwargs))
    view = prepare(c, Console(quiet=True))
    n = c.data.test_patch_num
    images = view.eval_set("test", c.data.test_protocol, n, size)
    images = replace(images, store=images.store.to(device))
    model = build_model(c.model).to(device)
    aug = Augmenter.evaluation(size, model.mean, model.std).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rows = []
    for compiled in compiles:
        net = compile_model(model, replace(c, train=replace(c.train, compile=compiled)), Console(quiet=True))

        def run():
            with amp:
                predict_images(net, images, aug, batch_patches, device, fixed_shapes=compiled)

        rate = measure(run, len(images), repeats, device, warmup=1)
        rows.append({"images_per_s": rate, "patches_per_s": rate * n, "images": len(images), "test_patch_num": n,
                     "backbone": name, "img_size": size, "compile": compiled,
                     "precision": "bf16" if device.type == "cuda" else "fp32", "batch_patches": batch_patches})
    return rows


def bench_predict(cfg: Config, n_images: int, workers: int, batch_images: int, device: torch.device, work: Path,
                  console: Console, repeats: int) -> dict:
    """Images/s of `predict` on KonIQ-size JPEGs (resized to 512x384, the test protocol's patches),
    side by side: (a) decoding with PIL in the main thread, then scoring (`Scorer.prepare` +
    `score_arrays`); (b) `scoring.predict.score_files`, decoding in `workers` DataLoader workers
    (JPEGs on the GPU where that changes no score); both score through `predict_images`. And their
    parts: decoding alone in the main thread and in the workers, the upload, the model alone on
    images already decoded on the device; and the model alone on the CPU, torch against
    onnxruntime (`bench_onnx`). The tiny model on a CPU, Swin-T on a GPU."""
    from ..artifacts.card import ModelCard, TrainedOn
    from ..data.feed import batches
    from ..scoring.predict import Scorer, score_files

    name = "tiny" if device.type == "cpu" else "swin-t"
    backbone, kwargs, size = BACKBONES[name]
    model_cfg = replace(cfg.model, backbone=backbone, pretrained="none", img_size=size, backbone_kwargs=kwargs)
    torch.manual_seed(0)
    card = ModelCard(model=asdict(model_cfg), datasets={"koniq10k": TrainedOn({}, [1.0, 5.0], "512x384")},
                     protocol=cfg.data.test_protocol, test_patch_num=cfg.data.test_patch_num)
    scorer = Scorer(build_model(model_cfg), card, device)
    files = sorted(str(f) for f in (source_images(work / "koniq", n_images) / "1024x768").glob("*.jpg"))
    positions = list(range(len(files)))
    console.print(f"predict: {len(files)} KonIQ-size JPEGs, {name} model at {size} px, {card.test_patch_num} "
                  f"patches each, {workers} worker(s)", highlight=False)

    def decode_only(n_workers: int):
        return lambda: [b for b in batches(files, positions, resize=scorer.resize, size=size, exif=scorer.exif,
                                           protocol=card.protocol, patches=card.test_patch_num,
                                           batch_images=batch_images, workers=n_workers, device=device)]

    out = {"decode_main_thread": measure(decode_only(0), len(files), repeats, device, warmup=1),
           "decode_workers": measure(decode_only(workers), len(files), repeats, device, warmup=1), "rows": [],
           "images": len(files), "workers": workers, "batch_images": batch_images, "backbone": name,
           "img_size": size, "protocol": card.protocol}
    decoded = decode_only(0)()
    # the protocol's patch count (the default), and one patch an image: where the model is cheap, as
    # on a GPU, the decoder is what bounds the rate
    for patches in dict.fromkeys((card.test_patch_num, 1)):
        def before():
            for start in range(0, len(files), batch_images):
                scorer.score_arrays([scorer.prepare(f) for f in files[start:start + batch_images]], crops=patches)

        timings: dict[str, float] = {}

        def after():
            for *_, t in score_files(scorer, files, positions, crops=patches, batch_images=batch_images,
                                     workers=workers):
                for k, v in t.items():
                    timings[k] = timings.get(k, 0.0) + v

        images = [replace(b.images, origins=b.images.origins[:, :patches]) for b in decoded]
        row = {"patches": patches, "a_before": measure(before, len(files), repeats, device, warmup=1),
               "b_score_files": measure(after, len(files), repeats, device, warmup=1),
               "model_only": measure(lambda: [scorer.score_set(im) for im in images], len(files), repeats, device,
                                   warmup=1)}
        row["b_seconds_per_image"] = {k: v / ((repeats + 1) * len(files)) for k, v in timings.items()}
        if device.type == "cuda":  # JPEGs decoded by nvjpeg and resized on the GPU (other crops: see data.feed.on_device)
            row["b_decode_gpu"] = measure(lambda: list(score_files(scorer, files, positions, crops=patches,
                                                                 batch_images=batch_images, workers=workers,
                                                                 decoder="gpu")), len(files), repeats, device,
                                        warmup=1)
        row["speedup"] = row["b_score_files"] / row["a_before"]
        out["rows"].append(row)
    out["onnx"] = bench_onnx(scorer, [b.images for b in decoded], work, console, repeats)
    return out


def bench_onnx(scorer, images: list, work: Path, console: Console, repeats: int) -> dict:
    """Images/s of the model alone on the CPU, torch against onnxruntime, on the same decoded
    images and patches (the test protocol's, cut and normalised by the same augmenter): the model
    exported as `iqa-dist export --onnx` writes it (checked against torch there). On a GPU machine
    both still run on the CPU: onnxruntime's CPU provider is what is installed."""
    import importlib.util
    import time

    from ..artifacts.card import WEIGHTS_FILE, write_weights
    from ..scoring.onnx import export_onnx

    missing = [m for m in ("onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # the [onnx] extra is optional: the report says why these figures are absent
        console.print(f"predict: no onnxruntime figures: {', '.join(missing)} not installed (pip install "
                      "'iqa-dist[onnx]')", highlight=False)
        return {"skipped": f"{', '.join(missing)} not installed"}
    folder = work / "onnx-model"
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(scorer.model.state_dict(), folder / WEIGHTS_FILE)
    scorer.card.write(folder, {})
    start = time.perf_counter()
    found = export_onnx(folder, work / "model.onnx")  # a graph that scores otherwise fails the bench
    exported = time.perf_counter() - start
    return {**onnx_rates(folder, work / "model.onnx", images, repeats), "export_s": round(exported, 1),
            "max_rel_diff": found["max_rel_diff"]}


def onnx_rates(folder: Path, onnx_file: Path, images: list, repeats: int) -> dict:
    """Images/s of model directory `folder` in torch and of its ONNX file in onnxruntime, both on
    the CPU, through the one scoring path (`predict_images`) on the same EvalSets."""
    from ..scoring.onnx import OnnxForward
    from ..scoring.predict import load_model
    from ..scoring.predictions import predict_images

    cpu = torch.device("cpu")
    torch_cpu = load_model(folder, cpu)
    onnx = OnnxForward(onnx_file)
    on_cpu = [replace(im, store=im.store.to(cpu)) for im in images]
    n = sum(len(im) for im in on_cpu)

    def run(model):
        return lambda: [predict_images(model, im, torch_cpu.augmenter, 256, cpu) for im in on_cpu]

    out = {"torch_cpu": measure(run(torch_cpu.model), n, repeats, cpu, warmup=1),
           "onnxruntime_cpu": measure(run(onnx), n, repeats, cpu, warmup=1), "threads": torch.get_num_threads()}
    out["speedup"] = out["onnxruntime_cpu"] / out["torch_cpu"]
    return out
