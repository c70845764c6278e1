"""`iqa-dist serve`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError
from ..serving import TOKEN_ENV
from .options import positive

NAME = "serve"
USAGE = "iqa-dist serve MODEL [MODEL ...] [options]"
HELP = "serve trained models over HTTP: an API and a page"
DESCRIPTION = f"""\
Serve one or more trained models (model or run directories) over HTTP: POST /score takes images
(multipart field `files`, one or many) and answers each image's score on the model's scale, with
its quality map (the patch scores on a regular grid) when asked (`grid=true`); GET / is a page
to drop images on, GET /healthz and GET /card describe the server and its models. The images of
concurrent requests are scored together in batches (--max-batch, --max-wait-ms) by one worker,
behind one bounded queue (--max-queue: a request that would pass it is answered 503). It listens
on 127.0.0.1 unless told --host; with --token (or ${TOKEN_ENV}) every request must carry it. One
process serves one device: on a node of N GPUs start one per GPU (--device cuda:K, its own
--port) and put them behind one address (the README shows how).

examples:
  iqa-dist serve runs/my-run   # then open http://127.0.0.1:8000/
  curl -F files=@a.jpg -F files=@b.jpg http://127.0.0.1:8000/score
  iqa-dist serve --model runs/swin-t --model runs/resnet50 --port 8080   # two models side by side
  IQA_DIST_TOKEN=secret iqa-dist serve runs/my-run --host 0.0.0.0 --device cuda:1 --port 8001"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="model directories or run directories")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="one more model (repeatable): every image is scored by each, side by side")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one [8000]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda when available]")
    p.add_argument("--scale", default=None, metavar="DATASET|normalized",
                   help="the scale of the scores (as predict's --scale) [default: the only training dataset's]")
    p.add_argument("--resize-as", default=None, metavar="DATASET",
                   help="resize images as this training dataset's were (as predict's --resize-as)")
    p.add_argument("--token", default=None,
                   help=f"every request must carry it (Authorization: Bearer TOKEN, or as the password the page's "
                        f"browser asks for) [default: ${TOKEN_ENV}; none when unset]")
    p.add_argument("--max-batch", type=int, default=16, help="images scored together at most [16]")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a batch waits to fill after its first image, ms [10]")
    p.add_argument("--max-queue", type=int, default=256,
                   help="images waiting at most; a request that would pass it gets 503 [256]")
    p.add_argument("--decoders", type=int, default=None,
                   help="uploads decoded at once [on the CPU 1: the model uses every core; on a GPU the cores, "
                        "at most 8]")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit, MB (413 beyond) [64]")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixels of one image at most, from its header, before decoding (413 beyond: a decompression "
                        "bomb) [PIL's limit, 89,478,485]")
    p.add_argument("--map-crops", type=int, default=None,
                   help="patches of a quality map when a request does not say (its `crops` field) [48]")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")


def run(args: argparse.Namespace) -> int:
    models = [*args.models, *args.model]
    if not models:
        raise UserError("nothing to serve: give a model or run directory (serve MODEL, or --model MODEL)")
    for option in ("max_batch", "max_queue", "max_pixels", "map_crops", "decoders"):
        positive(f"--{option.replace('_', '-')}", getattr(args, option))
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        raise UserError(f"--max-wait-ms {args.max_wait_ms:g} / --max-body-mb {args.max_body_mb:g}: the wait must be "
                        "0 or more, the body limit more than 0")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: must be 0-65535")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (FastAPI parses form uploads with it)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"serve needs FastAPI, uvicorn and python-multipart ({e.name} is missing): "
                        "pip install 'iqa-dist[serve]'") from None
    from ..artifacts.card import RUN_MODEL_DIR, model_dir
    from ..data.feed import default_workers
    from ..output import console
    from ..scoring.maps import DEFAULT_CROPS
    from ..scoring.predict import load_model
    from ..serving.app import ServeSettings, Served, create_app
    from ..serving.server import address, listen, serve

    folders = [model_dir(m) for m in models]  # a wrong path fails here, before the port is taken
    sock = listen(args.host, args.port)  # before the models load: a port in use is said at once
    ids: list[str] = []
    for folder in folders:
        name = folder.parent.name if folder.name == RUN_MODEL_DIR else folder.name
        ids.append(name if name not in ids else f"{name}-{len(ids) + 1}")
    served = [Served(i, load_model(f, args.device, args.scale, args.resize_as)) for i, f in zip(ids, folders)]
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    defaults = ServeSettings()
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_body_mb=args.max_body_mb, max_pixels=args.max_pixels or defaults.max_pixels,
                             map_crops=args.map_crops or DEFAULT_CROPS, token=token,
                             decoders=args.decoders or max(1, default_workers(served[0].scorer.device)))
    out = console()
    url = address(sock)
    out.print(f"serving {', '.join(f'{s.id} ({Path(f)})' for s, f in zip(served, folders))} on "
              f"{served[0].scorer.device} at {url}/ (POST /score, GET /healthz, GET /card); "
              f"batches of up to {settings.max_batch} images, {settings.max_wait_ms:g} ms wait, queue "
              f"{settings.max_queue}, {settings.decoders} decoder(s); {'token required' if token else 'no token'}",
              highlight=False)
    if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
        console(stderr=True).print(f"[yellow]warning:[/] listening on {args.host} without a token: anyone who "
                                   f"reaches this port can use the models (--token or ${TOKEN_ENV})", highlight=False)
    serve(create_app(served, settings), sock, access_log=args.access_log)
    return 0
