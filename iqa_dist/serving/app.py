"""`iqa-dist serve`'s HTTP API (FastAPI): one or more trained models behind one batching queue.

    GET  /         the page (page.html, shipped in the package: no CDN, no network fetch)
    GET  /healthz  {"status": "ok", "models", "device", "waiting", "max_queue"}
    GET  /card     each model's id, scale and model card
    POST /score    multipart: `files` (one or more images), `grid` (true: each image's quality map
                   too), `crops` (the map's patches), `model` (ids to score with; default all)

Every answer to bad input names the file and the reason: a body over the limit 413, an image
over the pixel limit 413, an unreadable or too small image 400 (predict's reason), a missing or
wrong field 422 (FastAPI's validation), a full queue 503, a missing or wrong token 401. Nothing
reads a server-side path; uploads live in memory, or in the temporary folder while they are
parsed (Starlette spools large parts there).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
# time, and the token check's name objects (`bearer`, `basic`) local to the function that makes it.
import asyncio
import secrets
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated, Hashable

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials, HTTPBearer, HTTPAuthorizationCredentials
from PIL import Image
import anyio
from starlette.datastructures import Headers

from ..errors import first_line
from ..scoring.maps import DEFAULT_CROPS
from ..scoring.predict import Scorer
from . import TOKEN_ENV
from .batcher import Batcher, Job, QueueFull
from .uploads import UploadError, quiet_bomb_warnings, read_image

MAX_CROPS = 400  # the most patches a map may ask for: a 20 x 20 grid


@dataclass
class Served:
    """One model the server scores with, under the id requests and answers name it by."""

    id: str
    scorer: Scorer


@dataclass(kw_only=True)
class ServeSettings:
    """`iqa-dist serve`'s limits and batching (its options)."""

    max_batch: int = 16  # images the worker scores together at most
    max_wait_ms: float = 10.0  # how long the worker waits for a batch to fill after its first image, ms
    max_queue: int = 256  # images waiting at most; a request that would go past it is answered 503
    max_body_mb: float = 64.0  # request body limit, MB (413)
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # pixels of one image as its header declares (413)
    map_crops: int = DEFAULT_CROPS  # patches of a quality map when a request does not say
    # uploads decoded at once (threads). On the CPU 1: the model already runs on every core, and
    # more decoders beside it only take turns with it (bench serve, 16 clients on 2 busy cores, a
    # run each: 0.71x predict's images/s with a decoder per request, 0.91x with one); on a GPU the
    # cores (`serve` sets it, as predict's decoding workers)
    decoders: int = 1
    token: str = ""  # when set, every request needs it: `Authorization: Bearer TOKEN` (or as Basic's password)


class ServeApp(FastAPI):
    """FastAPI whose answer to a body over the limit says the limit. FastAPI's `max_body_size`
    counts what is received and answers through the exception handlers, except for a body whose
    Content-Length already says it is too large: that one it answers "Content Too Large" alone,
    so it is answered here first, before a byte of it is read."""

    too_large = "request body over this server's limit"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.max_body_size is not None:
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_size:
                return await JSONResponse({"detail": self.too_large}, 413)(scope, receive, send)
        await super().__call__(scope, receive, send)


def create_app(models: list[Served], settings: ServeSettings) -> ServeApp:
    """The API over `models` (ids unique), its batching worker started and stopped with the app."""
    quiet_bomb_warnings()
    by_id = {m.id: i for i, m in enumerate(models)}
    batcher = Batcher(lambda key, images: _run(models, key, images), settings.max_batch,
                      settings.max_wait_ms / 1000, settings.max_queue)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    decoders = anyio.CapacityLimiter(settings.decoders)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = ServeApp(title="iqa-dist", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                   dependencies=[Depends(_token_check(settings.token))] if settings.token else [],
                   max_body_size=int(settings.max_body_mb * 2**20))
    app.too_large = f"request body over this server's limit of {settings.max_body_mb:g} MB (serve --max-body-mb)"
    app.state.batcher = batcher

    @app.exception_handler(UploadError)
    async def bad_upload(_: Request, e: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, e.status)

    @app.exception_handler(QueueFull)
    async def full(_: Request, e: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": "1"})

    @app.exception_handler(413)
    async def too_large(_: Request, e: HTTPException) -> JSONResponse:  # Starlette's own says only "Content Too Large"
        return JSONResponse({"detail": app.too_large}, 413)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": list(by_id), "device": str(models[0].scorer.device),
                "waiting": batcher.waiting, "max_queue": settings.max_queue}

    @app.get("/card")
    async def card() -> dict:
        return {"models": [_about(m, settings) for m in models]}

    @app.post("/score")
    async def score(files: Annotated[list[UploadFile], File(description="one or more images")],
                    grid: Annotated[bool, Form(description="also return each image's quality map")] = False,
                    crops: Annotated[int | None, Form(ge=1, le=MAX_CROPS, description="the map's patches")] = None,
                    model: Annotated[list[str] | None, Form(description="ids of the models to score with")] = None,
                    ) -> dict:
        unknown = [m for m in model or [] if m not in by_id]
        if unknown:
            raise HTTPException(422, f"model {unknown[0]!r}: this server serves {', '.join(by_id)}")
        chosen = [by_id[m] for m in dict.fromkeys(model)] if model else list(range(len(models)))
        uploads = [(f.filename or f"file {i + 1}", await f.read()) for i, f in enumerate(files)]
        arrays = await anyio.to_thread.run_sync(_read_all, uploads, [models[i].scorer for i in chosen],
                                                settings.max_pixels, limiter=decoders)
        n = crops or settings.map_crops
        keys = [(i, kind) for i in chosen for kind in ((0, n) if grid else (0,))]  # kind 0: the score, n: a map
        jobs = [Job((i, kind), arrays[u][_policy(models[i].scorer)]) for u in range(len(uploads)) for i, kind in keys]
        futures = batcher.submit(jobs)
        try:
            done = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as e:  # noqa: BLE001 (the worker's error, whatever the model raised: named, one line)
            raise HTTPException(500, f"scoring failed: {type(e).__name__}: {first_line(e)}") from None
        results = iter(done)
        images = []
        for name, _ in uploads:
            rows = {}
            for i, kind in keys:
                row = rows.setdefault(i, {"model": models[i].id, **_scale(models[i].scorer)})
                value = next(results)
                if kind:
                    row["grid"] = value.to_json()
                else:
                    row["score"] = round(float(value), 4)
            images.append({"name": name, "results": list(rows.values())})
        return {"models": [models[i].id for i in chosen], "images": images}

    return app


def _policy(scorer: Scorer) -> tuple[str, int, bool]:
    """How a model's new images are prepared: its resize, patch side and EXIF choice."""
    return scorer.resize, scorer.size, scorer.exif


def _read_all(uploads: list[tuple[str, bytes]], scorers: list[Scorer], max_pixels: int) -> list[dict]:
    """Each upload decoded once per distinct preparation policy of the chosen models."""
    policies = list(dict.fromkeys(_policy(s) for s in scorers))
    return [{p: read_image(data, name, *p, max_pixels) for p in policies} for name, data in uploads]


def _run(models: list[Served], key: Hashable, images: list[np.ndarray]) -> list:
    """The worker's call for one group of jobs: scores (kind 0) or quality maps of `kind` patches."""
    index, kind = key
    scorer = models[index].scorer
    return scorer.map_arrays(images, kind) if kind else list(scorer.score_arrays(images))


def _scale(scorer: Scorer) -> dict:
    trained = scorer.card.datasets.get(scorer.scale_name)
    return {"scale": scorer.scale_name, "range": trained.score_range if trained else None}


def _about(m: Served, settings: ServeSettings) -> dict:
    s = m.scorer
    return {"id": m.id, **_scale(s), "units": s.units, "protocol": s.card.protocol, "patches": s.card.test_patch_num,
            "patch": s.size, "map_crops": settings.map_crops, "card": asdict(s.card)}


def _token_check(token: str):
    """A dependency that lets a request through only with the token: `Authorization: Bearer TOKEN`
    (scripts), or as HTTP Basic's password (a browser asks for it once and sends it with every
    request of the page)."""
    bearer, basic = HTTPBearer(auto_error=False), HTTPBasic(auto_error=False)

    async def check(b: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                    c: Annotated[HTTPBasicCredentials | None, Depends(basic)]) -> None:
        given = b.credentials if b else c.password if c else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, f"{'a wrong' if given else 'no'} token: this server needs the one it was "
                                     f"started with (Authorization: Bearer TOKEN; serve --token or ${TOKEN_ENV})",
                                headers={"WWW-Authenticate": 'Basic realm="iqa-dist", Bearer'})

    return check
