"""`iqa-dist serve`: the API scores as `predict` does (maps beside), 16 clients under load each
get their own image's score while every kind of bad input gets its status and reason, a full
queue answers 503 and then serves on, and the page in a real headless Chromium shows predict's
scores. Servers run in a thread of this process (uvicorn, on a port the OS picks)."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import iqa_dist
import numpy as np
import pytest
from PIL import Image

from iqa_dist.serving.app import ServeSettings, Served, create_app
from iqa_dist.serving.server import address, listen

from . import fixtures
from .conftest import TINY_SIZE, here

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUNDS = 12  # requests per client in the load test, after 2 rounds of warm-up
ABS = 2e-4  # scores of 0-100 are answered and written to 4 decimals; batches of other sizes move the 6th digit


@contextmanager
def running(app):
    """The app served by uvicorn in a thread of this process until the block ends: its address."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn's own flag: the app's startup has run and the socket accepts
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield address(sock)
    finally:
        server.should_exit = True
        thread.join(30)


def upload(path: Path, name: str | None = None) -> dict:
    return {"files": (name or path.name, path.read_bytes(), "image/png")}


def predicted(model: Path, paths: list[Path]) -> dict[str, tuple[float | None, str]]:
    """`iqa-dist predict`'s (score, reason) of each file, by file name, the paths in its reasons
    written as the bare name (as an upload is known)."""
    out = here("predict", str(model), *map(str, paths), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    return {Path(r["path"]).name: (float(r["score"]) if r["score"] else None, r["error"].replace(r["path"],
                                                                                              Path(r["path"]).name))
            for r in rows}


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """16 small images of different sizes and textures: one per client."""
    folder = tmp_path_factory.mktemp("serve-images")
    paths = [folder / f"img{i:02d}.png" for i in range(16)]
    for i, p in enumerate(paths):
        fixtures.image(p, (160 + 8 * i, 120 + 4 * i), seed=100 + i)
    return paths


@pytest.fixture(scope="module")
def expected(single_run, images) -> dict[str, float]:
    return {name: score for name, (score, _) in predicted(single_run, images).items()}


@pytest.fixture(scope="module")
def server(single_run):
    """The tiny run served with a token, a 1 MB body limit and a 1-megapixel image limit."""
    app = create_app([Served(single_run.name, iqa_dist.load_model(single_run, "cpu"))],
                     ServeSettings(max_body_mb=1, max_pixels=1_000_000, token=TOKEN, max_queue=64))
    with running(app) as url:
        yield url, app


def test_score_answers_predicts_score_its_scale_and_the_map(server, single_run, images, expected):
    url, _ = server
    two = images[:2]
    r = httpx.post(f"{url}/score", files=[("files", upload(p)["files"]) for p in two],
                   data={"grid": "true", "crops": "6"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["models"] == [single_run.name]
    grid = iqa_dist.load_model(single_run, "cpu")
    grid.card = replace(grid.card, protocol="grid")
    for image, path, on_grid in zip(body["images"], two, grid.score(two, crops=6)):
        [result] = image["results"]
        assert image["name"] == path.name and result["model"] == single_run.name
        assert (result["scale"], result["range"]) == ("synthetic", [0.0, 100.0])
        assert result["score"] == pytest.approx(expected[path.name], abs=ABS)
        qmap = result["grid"]
        with Image.open(path) as im:
            assert (qmap["width"], qmap["height"], qmap["patch"]) == (*im.size, TINY_SIZE)
        assert len(qmap["scores"]) == len(qmap["origins"]) == 6
        assert qmap["score"] == pytest.approx(on_grid, abs=ABS) and np.mean(qmap["scores"]) == pytest.approx(on_grid,
                                                                                                           abs=ABS)
    health = httpx.get(f"{url}/healthz", headers=AUTH).json()
    assert health["status"] == "ok" and health["models"] == [single_run.name] and health["device"] == "cpu"
    [card] = httpx.get(f"{url}/card", headers=AUTH).json()["models"]
    assert card["id"] == single_run.name and card["card"]["test_patch_num"] == 2 and card["units"].startswith("score")
    page = httpx.get(f"{url}/", headers=AUTH)
    assert page.status_code == 200 and "<title>iqa-dist</title>" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//|fetch\(\s*["'`](https?:)?//""", page.text)  # no CDN


def bad_inputs(http: httpx.Client, stranger: httpx.Client, good: Path, folder: Path) -> dict[str, httpx.Response]:
    """Every kind of bad request, each once: `http` sends the token, `stranger` none."""
    folder.mkdir(exist_ok=True)
    fixtures.image(folder / "small.png", (50, 40), seed=1)
    fixtures.image(folder / "cut.jpg", (200, 150), seed=2)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])
    (folder / "junk.jpg").write_bytes(b"this is not an image")
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'

    def post(name: str, content: bytes, **kw) -> httpx.Response:
        return http.post("/score", files={"files": (name, content, "image/png")}, **kw)

    return {
        "body": post("big.png", os.urandom(3 * 2**19)),  # 1.5 MB, declared in Content-Length
        "streamed body": http.post("/score", content=iter([part, *[b"x" * 2**16] * 24]),  # chunked: no length
                                   headers={"content-type": "multipart/form-data; boundary=b"}),
        "pixels": post("wide.png", fixtures.png_header(2000, 1000)),  # over the server's 1 MP
        "bomb": post("bomb.png", fixtures.png_header(20000, 20000)),  # over PIL's own bomb limit
        **{name: post(name, (folder / name).read_bytes()) for name in ("junk.jpg", "small.png", "cut.jpg")},
        "field": http.post("/score", files={"file": upload(good)["files"]}),
        "crops": post(good.name, good.read_bytes(), data={"grid": "true", "crops": "0"}),
        "model": post(good.name, good.read_bytes(), data={"model": "nope"}),
        "no token": stranger.post("/score", files=upload(good)),
        "wrong token": stranger.post("/score", files=upload(good), headers={"Authorization": "Bearer nope"}),
    }


def test_sixteen_clients_get_their_own_scores_while_bad_input_is_refused(server, single_run, images, expected,
                                                                         tmp_path):
    """16 concurrent clients, each sending its own image ROUNDS times, all answered with that
    image's predict score, nothing kept per request; meanwhile every bad input gets its status
    and a reason (an image's, predict's reason for the same file), and the server serves on."""
    url, app = server
    scores = sorted(expected.values())
    assert min(np.diff(scores)) > 10 * ABS  # a mixed-up answer could not pass for the right one

    # one connection per client for the whole test: each new httpx.Client loads the CA bundle into
    # OpenSSL (~1 MB of native memory a time, in this same process), which is not the server's
    http = {p: httpx.Client(base_url=url, headers=AUTH, timeout=60) for p in [*images, "bad"]}
    stranger = httpx.Client(base_url=url, timeout=60)

    def client(path: Path, rounds: int) -> list[tuple[int, str, float]]:
        got = []
        for _ in range(rounds):
            r = http[path].post("/score", files=upload(path))
            image = r.json()["images"][0] if r.status_code == 200 else {"name": r.text, "results": [{}]}
            got.append((r.status_code, image["name"], image["results"][0].get("score")))
        return got

    with ThreadPoolExecutor(17) as pool:
        warm = pool.submit(bad_inputs, http["bad"], stranger, images[0], tmp_path)  # PIL's plugins load once
        list(pool.map(client, images, [2] * len(images)))  # warm-up: connections, allocator, batch shapes
        warm.result()
        gc.collect()
        before, objects, batches = rss_mb(), len(gc.get_objects()), app.state.batcher.batches
        answers = pool.map(client, images, [ROUNDS] * len(images))
        bad = pool.submit(bad_inputs, http["bad"], stranger, images[0], tmp_path).result()
        answers = list(answers)
        gc.collect()
        grown, kept = rss_mb() - before, len(gc.get_objects()) - objects
    for client_ in [*http.values(), stranger]:
        client_.close()
    for path, got in zip(images, answers):
        assert got == [(200, path.name, pytest.approx(expected[path.name], abs=ABS))] * ROUNDS
    assert app.state.batcher.batches - batches < len(images) * ROUNDS  # requests shared batches
    # Nothing is kept per request: a request held anywhere (its upload, form, arrays, job, futures)
    # would leave 10+ objects, 2,000+ in all; what stays is connections' timers and the bad
    # answers this test holds (~600). The process's memory is bounded too, loosely: in a run this
    # short its RSS still creeps while glibc's per-thread arenas and oneDNN's kernel cache fill
    # (measured: +60 MB over the first ~1,500 requests of this load, +3 MB over the next 700).
    assert kept < 1000, f"{kept} objects more after {len(images) * ROUNDS} requests"
    assert grown < 128, f"memory grew by {grown:.0f} MB over {len(images) * ROUNDS} requests"

    reasons = {name: why for name, (_, why) in predicted(single_run, [tmp_path / n for n in
                                                                      ("junk.jpg", "small.png", "cut.jpg")]).items()}
    assert all(reasons.values())
    statuses = {
        "body": (413, "request body over this server's limit of 1 MB (serve --max-body-mb)"),
        "streamed body": (413, "request body over this server's limit of 1 MB (serve --max-body-mb)"),
        "pixels": (413, "wide.png: 2000x1000 is 2,000,000 pixels, over this server's limit of 1,000,000 "
                        "(serve --max-pixels)"),
        "bomb": (413, "bomb.png: too many pixels to decode (Image size (400000000 pixels) exceeds limit of"),
        **{name: (400, f"{name}: {why}") for name, why in reasons.items()},
        "field": (422, "files"), "crops": (422, "crops"), "model": (422, "model 'nope': this server serves"),
        "no token": (401, "no token: this server needs the one it was started with"),
        "wrong token": (401, "a wrong token"),
    }
    for kind, (status, reason) in statuses.items():
        r = bad[kind]
        assert r.status_code == status, (kind, r.status_code, r.text)
        detail = r.json()["detail"]
        assert reason in (detail if isinstance(detail, str) else json.dumps(detail)), (kind, detail)
    assert "cannot identify image file 'junk.jpg'" in bad["junk.jpg"].json()["detail"]  # named as uploaded
    assert f"smaller than the {TINY_SIZE}-px patch" in bad["small.png"].json()["detail"]
    assert bad["no token"].headers["www-authenticate"].startswith("Basic")  # a browser asks for it
    again = httpx.post(f"{url}/score", files=upload(images[3]), headers=AUTH)
    assert again.status_code == 200 and again.json()["images"][0]["results"][0]["score"] == pytest.approx(
        expected[images[3].name], abs=ABS)


def test_a_full_queue_answers_503_and_then_serves_on(single_run, images, monkeypatch):
    """The worker held on its first image; two more fill the 2-image queue; the next request is
    refused with 503 and why, at once; released, the three held ones are answered and the
    server takes new requests. An error of the model itself (a GPU out of memory) is the one 500,
    named, and the worker serves on."""
    scorer = iqa_dist.load_model(single_run, "cpu")
    entered, release = threading.Event(), threading.Event()
    score_arrays = scorer.score_arrays

    def held(arrays, *args, **kwargs):
        entered.set()
        release.wait(30)
        return score_arrays(arrays, *args, **kwargs)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(a second line)")

    monkeypatch.setattr(scorer, "score_arrays", held)
    monkeypatch.setattr(scorer, "map_arrays", out_of_memory)
    app = create_app([Served("held", scorer)], ServeSettings(max_batch=1, max_wait_ms=0, max_queue=2))
    with running(app) as url, ThreadPoolExecutor(3) as pool:
        def post(path: Path) -> httpx.Response:
            return httpx.post(f"{url}/score", files=upload(path), timeout=60)

        first = pool.submit(post, images[0])
        assert entered.wait(30)
        queued = [pool.submit(post, p) for p in images[1:3]]
        deadline = time.monotonic() + 30
        while app.state.batcher.waiting < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        full = post(images[3])
        release.set()
        held_answers = [f.result().status_code for f in (first, *queued)]
        failed = httpx.post(f"{url}/score", files=upload(images[4]), data={"grid": "true"}, timeout=60)
        after = post(images[5])
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert "2 image(s) are waiting to be scored and this request brings 1: the queue holds 2" in full.json()["detail"]
    assert held_answers == [200, 200, 200]
    assert failed.status_code == 500
    assert failed.json()["detail"] == "scoring failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert after.status_code == 200


def test_the_worker_skips_requests_that_went_away_and_serves_on():
    """A job whose future was cancelled before the worker took it (asyncio cancels it when its
    client hangs up) is dropped, not scored and not answered; the jobs beside it are, grouped by
    kind, and the worker goes on."""
    from iqa_dist.serving.batcher import Batcher, Job

    gate, calls = threading.Event(), []

    def run(key: int, images: list[np.ndarray]) -> list[int]:
        calls.append((key, [int(i[0, 0, 0]) for i in images]))
        gate.wait(30)
        return [10 * key + int(i[0, 0, 0]) for i in images]

    def image(value: int) -> np.ndarray:
        return np.full((1, 1, 3), value, np.uint8)

    batcher = Batcher(run, max_batch=4, max_wait_s=0, max_queue=8)
    batcher.start()
    [first] = batcher.submit([Job(1, image(1))])
    deadline = time.monotonic() + 30
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    second, third, fourth = batcher.submit([Job(1, image(2)), Job(2, image(3)), Job(1, image(4))])
    assert second.cancel()
    gate.set()
    assert (first.result(30), third.result(30), fourth.result(30)) == (11, 23, 14) and second.cancelled()
    [fifth] = batcher.submit([Job(1, image(5))])
    assert fifth.result(30) == 15
    batcher.stop()
    assert calls == [(1, [1]), (2, [3]), (1, [4]), (1, [5])]  # one call per kind, in the order they came


def test_serve_options_and_a_taken_port_are_one_line(single_run, monkeypatch):
    code = here("serve")
    assert code.returncode == 2 and "nothing to serve" in code.stderr and "Traceback" not in code.stderr
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        code = here("serve", str(single_run), "--port", str(port))
    assert code.returncode == 2 and f"--port {port}: cannot listen there" in code.stderr, code.stderr
    code = here("serve", str(single_run), "--max-batch", "0")
    assert code.returncode == 2 and "--max-batch 0: must be at least 1" in code.stderr
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as where the [serve] extra is not installed
    code = here("serve", str(single_run))
    assert code.returncode == 2 and "pip install 'iqa-dist[serve]'" in code.stderr and "Traceback" not in code.stderr


def chromium() -> tuple[str, str]:
    """Chromium and its driver, or the test skips saying what is missing (CI installs them)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run "
                    "installs them as root)")
    return browser, driver


def test_the_page_in_chromium_shows_predicts_scores_and_maps(single_run, images, expected, tmp_path):
    """Two models side by side: a fixture image picked in the page's file input comes back with
    each model's score, the one `predict` gives the file with that model, and each map drawn; the
    screenshot is saved under tmp_path (its path printed)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (in the dev extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from iqa_dist.bench.serving import write_model
    from iqa_dist.config import load_config

    browser, driver_path = chromium()
    other = write_model(tmp_path / "other", load_config("demo"), "tiny")  # a second model: random weights, KonIQ's scale
    served = [Served(single_run.name, iqa_dist.load_model(single_run, "cpu")),
              Served("other", iqa_dist.load_model(other, "cpu"))]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,720"):
        options.add_argument(flag)
    with running(create_app(served, ServeSettings())) as url:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            driver.get(f"{url}/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            driver.find_element(By.ID, "files").send_keys(str(images[0]))
            cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "td.score[data-score]")
                               if len(d.find_elements(By.CSS_SELECTOR, "td.score[data-score]")) == 2 else False)
            shown = {c.get_attribute("data-model"): (float(c.get_attribute("data-score")), c.text) for c in cells}
            drawn = driver.execute_script(
                "return [...document.querySelectorAll('.shot canvas')].map(c => [c.width, c.height,"
                " c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 == 3 && v)])")
            shot = tmp_path / "page.png"
            driver.save_screenshot(str(shot))
            print(f"screenshot of the page: {shot}")
        finally:
            driver.quit()
    with Image.open(images[0]) as im:
        size = im.size
    assert drawn == [[*size, True], [512, 384, True]]  # each map at its model's image size (other: KonIQ's resize)
    other_score = predicted(other, [images[0]])[images[0].name][0]
    for model, score in ((single_run.name, expected[images[0].name]), ("other", other_score)):
        assert shown[model][0] == pytest.approx(score, abs=ABS)
        assert shown[model][1].startswith(f"{score:.2f}")  # what a person reads
