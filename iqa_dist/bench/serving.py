"""`iqa-dist serve` under load against `predict` on the same files, measured side by side.

The server is the real command (`iqa-dist serve MODEL --port 0` in its own process, as a user runs
it); N client threads of this process send the files one per request (HTTP keep-alive, each
client its own share) and check every answer; `predict` is `scoring.predict.score_files` in this
process, what `iqa-dist predict` runs, with its default workers. Both score the same randomly
initialised model from the same model directory: the tiny Swin on a CPU, Swin-T on a GPU.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from ..artifacts.card import ModelCard, TrainedOn
from ..config import Config
from ..models.hyperiqa import build_model
from .inputs import BACKBONES, source_images
from .timing import rate_of, sync

START_TIMEOUT_S = 120.0  # the server's start: imports and the model's load


def write_model(folder: Path, cfg: Config, backbone: str) -> Path:
    """A randomly initialised model directory (weights + card) of `backbone` (BACKBONES), scored
    on KonIQ's 1-5 scale with KonIQ's resize and the config's test protocol."""
    name, kwargs, size = BACKBONES[backbone]
    model_cfg = replace(cfg.model, backbone=name, pretrained="none", img_size=size, backbone_kwargs=kwargs)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    card = ModelCard(model=asdict(model_cfg), datasets={"koniq10k": TrainedOn({}, [1.0, 5.0], "512x384")},
                     protocol=cfg.data.test_protocol, test_patch_num=cfg.data.test_patch_num)
    card.write(folder, {})
    return folder


class Server:
    """`iqa-dist serve MODEL` in a process of its own, on a port the OS picks; its address read
    from the line it prints."""

    def __init__(self, model: Path, device: torch.device, options: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "iqa_dist", "serve", str(model), "--port", "0",
                                      "--device", str(device), *options], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.url, seen = "", []
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stdout:
            seen.append(line)
            if line.startswith("serving ") and " at http://" in line:
                self.url = line.split(" at ", 1)[1].split("/ ", 1)[0]
            if self.url and "Application startup complete" in line:  # uvicorn's line: the app now answers
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise RuntimeError("iqa-dist serve did not start:\n" + "".join(seen[-20:]))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keeps its pipe from filling

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client_round(url: str, files: list[tuple[str, bytes]], clients: int, latencies: list[float]) -> None:
    """Every file sent once, one per request, by `clients` threads at once (a share each, over
    one keep-alive connection each); each answer's latency appended; any answer but 200 raises."""
    import httpx

    failures: list[str] = []

    def client(share: list[tuple[str, bytes]]) -> None:
        with httpx.Client(base_url=url, timeout=120.0) as http:
            for name, data in share:
                start = time.perf_counter()
                r = http.post("/score", files={"files": (name, data, "image/jpeg")})
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200 or r.json()["images"][0]["name"] != name:
                    failures.append(f"{name}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(files[c::clients],)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} request(s) failed, e.g. {failures[0]}")


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_serve(cfg: Config, n_images: int, clients: list[int], max_batch: int, max_wait_ms: float,
                device: torch.device, work: Path, console: Console, repeats: int) -> dict:
    """Images/s and latency (p50, p99) of `serve` at each number of concurrent clients, and
    `predict`'s images/s on the same KonIQ-size JPEGs, same model, same device; `vs_predict`: the
    median over blocks of serve's rate over predict's in the block just before."""
    from ..data.feed import default_workers
    from ..scoring.predict import load_model, score_files

    backbone = "tiny" if device.type == "cpu" else "swin-t"
    folder = write_model(work / f"serve-model-{backbone}", cfg, backbone)
    paths = sorted(str(f) for f in (source_images(work / "koniq", n_images) / "1024x768").glob("*.jpg"))
    files = [(Path(p).name, Path(p).read_bytes()) for p in paths]
    scorer = load_model(folder, device)
    workers = default_workers(device)
    console.print(f"serve: {len(files)} KonIQ-size JPEGs, {backbone} model at {scorer.size} px, "
                  f"{scorer.card.test_patch_num} {scorer.card.protocol} patches each; clients {clients}, batches of "
                  f"up to {max_batch}, {max_wait_ms:g} ms wait", highlight=False)
    def predict() -> None:
        list(score_files(scorer, paths, list(range(len(paths))), workers=workers))

    server = Server(folder, device, ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)])
    # Interleaved, a block each in turn (predict, then serve at each client count), so that a
    # machine whose load drifts (other jobs on shared cores) weighs on both sides alike
    blocks: dict = {"predict": [], **{n: [] for n in clients}}
    latencies: dict[int, list[float]] = {n: [] for n in clients}
    try:
        predict()  # warm-up: the model's first batches
        for n in clients:
            client_round(server.url, files, n, [])  # warm-up: connections, the first batches
        for _ in range(repeats):
            blocks["predict"].append(len(paths) / timed(predict, device))
            for n in clients:
                blocks[n].append(len(files) / timed(lambda: client_round(server.url, files, n, latencies[n]), device))
    finally:
        server.stop()
    base = rate_of(blocks["predict"])
    rows = []
    for n in clients:
        ms = sorted(1e3 * s for s in latencies[n])
        rate = rate_of(blocks[n])
        # the ratio of each block to predict's block just before it: a pair under the same load
        paired = [b / a for a, b in zip(blocks["predict"], blocks[n])]
        rows.append({"clients": n, "images_per_s": rate, "p50_ms": statistics.median(ms),
                     "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], "requests": len(ms),
                     "vs_predict": statistics.median(paired), "vs_predict_blocks": paired, "blocks": blocks[n]})
    return {"predict": base, "predict_blocks": blocks["predict"], "blocks": len(blocks["predict"]), "rows": rows, "images": len(files), "backbone": backbone, "img_size": scorer.size,
            "protocol": scorer.card.protocol, "patches": scorer.card.test_patch_num, "predict_workers": workers,
            "max_batch": max_batch, "max_wait_ms": max_wait_ms}
