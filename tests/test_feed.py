"""feed.py: the input side of `iqa-dist predict`, against decoding each file directly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_dist.data.decode import decode
from iqa_dist.data.feed import batches, default_workers, on_device, read_list
from iqa_dist.data.protocol import patch_origins
from iqa_dist.errors import UserError

SIZE, PATCHES = 96, 3
# Tensor path (torchvision's libjpeg-turbo decode + torch's float antialiased bilinear) vs PIL
# (decode.decode: the same decoder, fixed-point resize), at 512x384 over this file's fixtures:
# measured max |diff| 1, mean 0.16 (0.12 at 224x168); without a resize both are identical (0).
MAX_DIFF, MEAN_DIFF = 1, 0.25


def texture(w: int, h: int, seed: int) -> Image.Image:
    """Smooth random content of w x h (a photo-like JPEG, unlike noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def sideways(path, w: int, h: int, seed: int, orientation: int) -> None:
    """A JPEG stored w x h with an EXIF orientation tag (6: a phone's portrait photo)."""
    im = texture(w, h, seed)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=90)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Good and bad files interleaved, so that batches of 4 mix them."""
    root = tmp_path_factory.mktemp("feed")
    for i, (w, h) in enumerate([(640, 480), (480, 640)] * 3):
        texture(w, h, i).save(root / f"photo{i}.jpg", quality=90)
    sideways(root / "portrait.jpg", 640, 480, 7, 6)
    texture(320, 240, 8).save(root / "frame.png")
    texture(320, 240, 9).convert("L").save(root / "gray.jpg", quality=90)
    texture(320, 240, 10).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    data = (root / "photo0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "notes.jpg").write_text("not an image\n")
    texture(40, 30, 11).save(root / "small.jpg", quality=90)
    names = ["photo0.jpg", "frame.png", "missing.jpg", "photo1.jpg", "portrait.jpg", "notes.jpg", "photo2.jpg",
             "truncated.jpg", "gray.jpg", "photo3.jpg", "small.jpg", "cmyk.jpg", "photo4.jpg", "photo5.jpg"]
    return [str(root / n) for n in names]


def positions_of(paths: list[str]) -> list[int]:
    return [100 + 3 * i for i in range(len(paths))]  # not 0..n-1, so that a mix-up shows


def expected(paths: list[str], resize: str, protocol: str) -> tuple[dict, list]:
    """decode.decode + patch_origins per file: {position: (HWC pixels, origins)}, [(position, reason)]."""
    good, failed = {}, []
    for p, path in zip(positions_of(paths), paths):
        pixels, h, w, why = decode(path, resize, SIZE, True) if os.path.exists(path) else (b"", 0, 0, "no such file")
        if why:
            failed.append((p, why))
        else:
            good[p] = (np.frombuffer(pixels, np.uint8).reshape(h, w, 3),
                       patch_origins(protocol, pixels, h, w, SIZE, PATCHES))
    return good, failed


def fed(paths: list[str], resize: str, protocol: str, workers: int = 0, device: str = "cpu",
        decoder: str = "auto") -> tuple[dict, list, list]:
    """Everything `batches` yields: {position: (HWC pixels, origins)}, failures, the batches."""
    out = list(batches(paths, positions_of(paths), resize=resize, size=SIZE, exif=True, protocol=protocol,
                       patches=PATCHES, batch_images=4, workers=workers, device=torch.device(device), decoder=decoder))
    good, failed = {}, []
    for b in out:
        assert set(b.timings) == {"wait", "gpu_decode", "upload"}
        failed += b.failed
        if b.images is None:
            assert b.positions == []
            continue
        store = b.images.store
        assert store.ids.tolist() == b.positions and store.scores.tolist() == [0.0] * len(b.positions)
        assert b.images.origins.shape == (len(b.positions), PATCHES, 2) and b.images.origins.dtype == torch.int64
        for i, p in enumerate(b.positions):
            good[p] = (store.image(i).copy(), b.images.origins[i].numpy())
    return good, failed, out


@pytest.mark.parametrize("workers,protocol,resize", [(0, "random", "512x384"), (2, "grid", "512x384"),
                                                     (2, "random", "none")])
def test_cpu_path_gives_what_decode_gives(files, workers, protocol, resize):
    """PIL in the workers: pixels, sizes and origins identical to decode.decode + patch_origins, in
    list order, each failure at its position with decode's reason."""
    want, want_failed = expected(files, resize, protocol)
    got, failed, out = fed(files, resize, protocol, workers=workers)
    assert [p for b in out for p in b.positions] == list(want)  # list order
    assert failed == want_failed
    names = dict(zip(positions_of(files), map(os.path.basename, files)))
    small = {"small.jpg": "image is 40x30 after resize (none), smaller than the 96-px patch"}
    assert {names[p]: why.split(":")[0] for p, why in failed} == {
        "missing.jpg": "no such file", "notes.jpg": "unreadable image", "truncated.jpg": "unreadable image",
        **(small if resize == "none" else {})}
    for p, (pixels, origins) in want.items():
        assert np.array_equal(got[p][0], pixels) and np.array_equal(got[p][1], origins)
    assert [len(b.positions) + len(b.failed) for b in out] == [4, 4, 4, 2]


@pytest.mark.parametrize("workers,resize", [(0, "512x384"), (2, "none")])
def test_tensor_path_matches_pil(files, workers, resize):
    """decode="tensor" (torchvision's decoder and a torch resize: the GPU path, run on the CPU):
    the same images decode, at the same sizes, upright, within a stated pixel difference of PIL's;
    the corrupt JPEG falls back to PIL, which reports it; grid origins are the same."""
    want, want_failed = expected(files, resize, "grid")
    got, failed, out = fed(files, resize, "grid", workers=workers, decoder="tensor")
    assert [p for b in out for p in b.positions] == list(want)
    assert failed == want_failed  # truncated.jpg: PIL's reason, from the fallback; small.jpg: decode.fit's wording
    diffs = []
    for p, (pixels, origins) in want.items():
        assert got[p][0].shape == pixels.shape  # portrait.jpg (EXIF 6) comes out 384x512, as PIL turns it
        assert np.array_equal(got[p][1], origins)
        diffs.append(np.abs(got[p][0].astype(int) - pixels))
    diff = np.concatenate([d.ravel() for d in diffs])
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF
    if resize == "none":
        assert diff.max() == 0  # the same libjpeg-turbo decode, and no resize


def test_tensor_path_seeds_random_crops_with_its_own_pixels(files):
    """The random protocol's origins on the tensor path come from the pixels it made (copied to
    the host), so an image gets the crops its pixels say, as everywhere else."""
    got, _, _ = fed(files, "512x384", "random", decoder="tensor")
    for pixels, origins in got.values():
        assert np.array_equal(origins, patch_origins("random", pixels, *pixels.shape[:2], SIZE, PATCHES))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_path_applies_every_exif_orientation(tmp_path, orientation):
    """Each of the 8 EXIF orientations turns the image as PIL's exif_transpose does (the device
    decoder has no EXIF support of its own)."""
    path = str(tmp_path / f"o{orientation}.jpg")
    sideways(path, 160, 112, orientation, orientation)
    want, _ = expected([path], "none", "grid")
    got, failed, _ = fed([path], "none", "grid", decoder="tensor")
    assert not failed and np.array_equal(got[100][0], want[100][0])


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_pil(files, monkeypatch):
    """nvjpeg refuses some JPEGs (CMYK, arithmetic coding, 12 bits) that PIL reads: those files go
    through decode.decode, with their origins, and the batch is exactly the CPU path's."""
    import iqa_dist.data.feed as feed

    monkeypatch.setattr(feed, "decode_jpegs", lambda datas, device: [None] * len(datas))
    for protocol in ("random", "grid"):
        want, want_failed = expected(files, "512x384", protocol)
        got, failed, _ = fed(files, "512x384", protocol, decoder="tensor")
        assert sorted(failed) == sorted(want_failed) and list(got) == list(want)
        for p, (pixels, origins) in want.items():
            assert np.array_equal(got[p][0], pixels) and np.array_equal(got[p][1], origins)


def test_an_unexpected_error_in_one_file_is_one_failed_row(files, monkeypatch):
    import iqa_dist.data.feed as feed

    real = feed.load

    def tripping(position, path, policy):
        if path.endswith("photo3.jpg"):
            raise KeyError("a malformed EXIF block")
        return real(position, path, policy)

    monkeypatch.setattr(feed, "load", tripping)
    _, failed, _ = fed(files, "512x384", "grid")
    tripped = [why for p, why in failed if files[positions_of(files).index(p)].endswith("photo3.jpg")]
    assert tripped == ["unreadable image: KeyError: 'a malformed EXIF block'"]
    assert len(failed) == len(expected(files, "512x384", "grid")[1]) + 1


def test_a_batch_of_bad_files_only(files):
    """A batch where nothing decodes (the corrupt JPEG after its fallback too) has no images; an
    empty list gives no batches."""
    paths = [f for f in files if any(bad in f for bad in ("missing", "notes", "truncated"))]
    got, failed, out = fed(paths, "512x384", "random", decoder="tensor")
    assert got == {} and [b.images for b in out] == [None] and [p for p, _ in failed] == [100, 103, 106]
    assert list(batches([], [], resize="none", size=SIZE, exif=True, protocol="grid", patches=1, batch_images=4,
                        workers=0, device=torch.device("cpu"))) == []


def test_decode_choices():
    kw = dict(resize="none", size=SIZE, exif=True, protocol="grid", patches=1, batch_images=4, workers=0,
              device=torch.device("cpu"))
    with pytest.raises(UserError, match="decode=gpu .*CUDA"):
        next(batches(["a.jpg"], [0], decoder="gpu", **kw))
    with pytest.raises(UserError, match="auto, cpu, gpu, tensor"):
        next(batches(["a.jpg"], [0], decoder="nvjpeg", **kw))
    assert default_workers(torch.device("cpu")) == 0 and 1 <= default_workers(torch.device("cuda")) <= 8
    # auto decodes JPEGs on a GPU only where the crops do not depend on exact pixels (grid)
    cuda = torch.device("cuda")
    assert on_device("auto", cuda, "grid") and not on_device("auto", cuda, "random")
    assert not on_device("auto", torch.device("cpu"), "grid") and on_device("gpu", cuda, "random")


def test_read_list(tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("# my photos\n a.jpg \n\nsub/b c.png\n  # indented comment\nd.jpg")
    assert read_list(str(listing)) == ["a.jpg", "sub/b c.png", "d.jpg"]
    with pytest.raises(UserError, match=r"nowhere\.txt.*No such file"):
        read_list(str(tmp_path / "nowhere.txt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_path_on_cuda_matches_cpu_path(files):
    """decode="auto" on a GPU (nvjpeg, device resize) against PIL in the workers."""
    want, want_failed = expected(files, "512x384", "grid")
    got, failed, out = fed(files, "512x384", "grid", workers=2, device="cuda")
    assert all(b.images.store.pixels.is_cuda for b in out if b.images is not None)
    assert [p for b in out for p in b.positions] == list(want) and failed == want_failed
    for p, (pixels, origins) in want.items():
        assert got[p][0].shape == pixels.shape and np.array_equal(got[p][1], origins)
        assert np.abs(got[p][0].astype(int) - pixels).max() <= MAX_DIFF
