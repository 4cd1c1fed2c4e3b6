"""`distvae pack`: shard layout, manifest, pre-resized pixels, bad files, determinism, interruption, errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import distvae.data.pack as pack_module
from distvae.data.pack import pack
from distvae.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ATTR_NAMES = [f"Attr_{i}" for i in range(40)]
PARTITION = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 0]  # file 11 is listed but missing on disk
MANIFEST_KEYS = {"format", "name", "source", "source_kind", "resolution", "image_format", "crop", "attr_names",
                 "splits", "skipped", "converted", "order", "order_seed"}


def _face(rng: np.random.Generator, w: int = 178, h: int = 218) -> Image.Image:
    """A smooth gradient plus noise: structured enough that a wrong crop or resize changes the pixels."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    noise = rng.integers(-40, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def make_celeba(root: Path, n_on_disk: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(PARTITION))]
    for name in names[:n_on_disk]:
        _face(rng).save(root / "img_align_celeba" / name, quality=90)
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, PARTITION)))
    rows = [f"{n} " + " ".join("1" if (i + j) % 3 == 0 else "-1" for j in range(40)) for i, n in enumerate(names)]
    (root / "list_attr_celeba.txt").write_text(f"{len(names)}\n{' '.join(ATTR_NAMES)}\n" + "\n".join(rows) + "\n")
    (root / "identity_CelebA.txt").write_text("".join(f"{n} {100 + i}\n" for i, n in enumerate(names)))
    return root


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> Path:
    return make_celeba(tmp_path_factory.mktemp("celeba"))


def samples(tar_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {ext: bytes})] in member order, checking each sample is image-then-json."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            assert (member.mtime, member.mode, member.uid, member.gid, member.uname, member.gname) == (
                pack_module.TAR_MTIME, 0o644, 0, 0, "", "")
            if not out or out[-1][0] != key:
                assert ext != "json", f"{member.name}: metadata before the image"
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(member).read()
    return out


def all_samples(out: Path, manifest: dict, split: str) -> list[tuple[str, dict[str, bytes]]]:
    return [s for shard in manifest["splits"][split]["shards"] for s in samples(out / shard["file"])]


def decode(sample: dict[str, bytes]) -> np.ndarray:
    """The image of a sample as an array; PIL images must already be 8-bit RGB."""
    (ext,) = [e for e in sample if e != "json"]
    if ext == "npy":
        return np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    im = Image.open(io.BytesIO(sample[ext]))
    im.load()
    assert im.mode == "RGB", f"{ext} member in mode {im.mode}"
    return np.asarray(im)


class Hang(BaseException):
    """Not an Exception, so the packer's per-file `except Exception` cannot swallow it."""


@contextlib.contextmanager
def alarm(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""
    def timeout(signum, frame):
        raise Hang(f"pack did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------- CelebA


def test_celeba_original_bytes(celeba, tmp_path):
    out = tmp_path / "shards"
    manifest = pack(celeba, out, shard_size=4, progress=False, order="source")
    assert set(manifest) == MANIFEST_KEYS
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == "distvae-shards-v1" and manifest["name"] == "celeba"
    assert manifest["source"] == str(celeba.resolve()) and manifest["source_kind"] == "celeba"
    assert (manifest["resolution"], manifest["image_format"], manifest["crop"]) == (None, None, None)
    assert manifest["attr_names"] == ATTR_NAMES
    assert manifest["skipped"] == [{"file": "000011.jpg", "reason": "missing (no such file)"}]
    assert manifest["converted"] == []
    splits = manifest["splits"]
    assert [splits[s]["samples"] for s in ("train", "val", "test")] == [6, 2, 2]
    assert [sh["samples"] for sh in splits["train"]["shards"]] == [4, 2]
    assert [sh["file"] for sh in splits["train"]["shards"]] == ["celeba-train-000000.tar", "celeba-train-000001.tar"]
    listed = {sh["file"] for s in splits.values() for sh in s["shards"]}
    assert {p.name for p in out.iterdir()} == listed | {f + ".idx" for f in listed} | {"manifest.json"}
    for split in splits.values():
        for shard in split["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
            assert len(samples(out / shard["file"])) == shard["samples"]

    for split, indices in (("train", [1, 2, 3, 4, 5, 6]), ("val", [7, 8]), ("test", [9, 10])):
        got = all_samples(out, manifest, split)
        assert [key for key, _ in got] == [f"{i:06d}" for i in indices]
        for (key, sample), i in zip(got, indices):
            assert set(sample) == {"jpg", "json"}
            assert sample["jpg"] == (celeba / "img_align_celeba" / f"{key}.jpg").read_bytes()
            assert sample["json"] == json.dumps(json.loads(sample["json"]), sort_keys=True,
                                                separators=(",", ":")).encode()
            meta = json.loads(sample["json"])
            attrs = [1 if (i - 1 + j) % 3 == 0 else 0 for j in range(40)]
            assert meta == {"src": f"{key}.jpg", "split": split, "attrs": attrs, "identity": 99 + i}


@pytest.mark.parametrize("image_format", ["npy", "png", "jpg"])
def test_celeba_preresized_pixels(celeba, tmp_path, image_format):
    r = 24
    manifest = pack(celeba, tmp_path, resolution=r, image_format=image_format, progress=False)
    assert (manifest["resolution"], manifest["image_format"], manifest["crop"]) == (r, image_format,
                                                                                     "celeba-center-168")
    got = all_samples(tmp_path, manifest, "train") + all_samples(tmp_path, manifest, "test")
    assert len(got) == 8
    for key, sample in got:
        assert image_format in sample
        array = decode(sample)
        assert array.dtype == np.uint8 and array.shape == (r, r, 3)
        source = Image.open(celeba / "img_align_celeba" / f"{key}.jpg").convert("RGB")
        w, h = source.size
        top, left = int(round((h - 168) / 2)), int(round((w - 168) / 2))  # torchvision CenterCrop(168)
        expected = np.asarray(source.crop((left, top, left + 168, top + 168)).resize((r, r), Image.BILINEAR))
        if image_format == "jpg":
            assert np.abs(array.astype(int) - expected).mean() < 4
        else:
            np.testing.assert_array_equal(array, expected)


def test_img_align_celeba_without_partition_is_a_folder(celeba, tmp_path, capsys):
    src = tmp_path / "noparts"
    (src / "img_align_celeba").mkdir(parents=True)
    for name in ("000001.jpg", "000002.jpg"):
        (src / "img_align_celeba" / name).write_bytes((celeba / "img_align_celeba" / name).read_bytes())
    manifest = pack(src, tmp_path / "out", val_fraction=0, test_fraction=0, progress=False, order="source")
    assert manifest["source_kind"] == "folder" and manifest["name"] == "noparts"
    assert "no list_eval_partition.txt" in capsys.readouterr().err
    meta = [json.loads(s["json"]) for _, s in all_samples(tmp_path / "out", manifest, "train")]
    assert [m["src"] for m in meta] == ["img_align_celeba/000001.jpg", "img_align_celeba/000002.jpg"]


# ----------------------------------------------------------------------------------------------- bad files


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 48-bit RGB, and a lying header needs no pixels)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(im: Image.Image, path: Path, fmt: str, **kwargs) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kwargs)
    return path.read_bytes()


GOOD = ["dir.jpg/inner.jpg", "good.JPG", "sub/deeper/good.png", "sub/tiny.jpeg"]
CONVERTED = {  # file -> words its reason must contain (resolution 0)
    "cmyk.jpg": "CMYK converted to RGB", "gray.jpg": "grayscale (L) converted to RGB",
    "gray16.png": "16-bit grayscale (I;16) scaled to 8 bits", "palette.png": "alpha (P) composited on white",
    "rgba.png": "alpha (RGBA) composited on white", "photo.webp": "WEBP image",
    "png_named.jpg": "PNG data in a .jpg file; stored as png (original bytes)",
    "rotated.jpg": "EXIF orientation 6 applied", "rgb16.png": "16-bit PNG reduced to 8 bits",
}
SKIPPED = {
    "bomb.png": "too large", "dangling.jpg": "dangling symlink", "dir.jpg": "is a directory",
    "empty.jpg": "empty file (0 bytes)", "fifo.jpg": "not a regular file (FIFO)", "huge.png": "too large: 10000x10000",
    "text.jpg": "not an image", "truncated.jpg": "cannot decode: image file is truncated",
}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "photos"
    rng = np.random.default_rng(1)
    _save(_face(rng, 40, 30), root / "good.JPG", "JPEG")
    _save(_face(rng, 50, 70), root / "sub" / "deeper" / "good.png", "PNG")
    _save(_face(rng, 5, 7), root / "sub" / "tiny.jpeg", "JPEG")  # smaller than any resolution: upscaled
    _save(_face(rng, 60, 40), root / "dir.jpg" / "inner.jpg", "JPEG")  # a folder named like an image
    full = _save(_face(rng, 200, 150), root / "truncated.jpg", "JPEG")
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("not a candidate at all\n")
    _save(_face(rng, 30, 30), root / "png_named.jpg", "PNG")
    _save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), root / "cmyk.jpg", "JPEG")
    _save(_face(rng, 30, 20).convert("L"), root / "gray.jpg", "JPEG")
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 16-bit values whose high bytes are 0..255
    _save(Image.fromarray(ramp), root / "gray16.png", "PNG")
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:5] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    _save(Image.fromarray(rgba, "RGBA"), root / "rgba.png", "PNG")
    _save(_face(rng, 16, 16).convert("P"), root / "palette.png", "PNG", transparency=0)
    _save(_face(rng, 24, 16), root / "photo.webp", "WEBP")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _save(_face(rng, 40, 20), root / "rotated.jpg", "JPEG", exif=exif)
    rows = b"".join(b"\0" + np.full((8, 3), 0x1234, ">u2").tobytes() for _ in range(6))
    (root / "rgb16.png").write_bytes(_png(8, 6, 16, 2, rows))
    (root / "huge.png").write_bytes(_png(10000, 10000, 8, 2, b"\0" * 10))  # header only: nothing to decode
    (root / "bomb.png").write_bytes(_png(20000, 20000, 8, 2, b"\0" * 10))  # beyond PIL's own bomb limit
    os.symlink(root / "missing-target.jpg", root / "dangling.jpg")
    os.mkfifo(root / "fifo.jpg")
    return root


def test_bad_files_original_bytes(bad_folder, tmp_path):
    with alarm(30):
        manifest = pack(bad_folder, tmp_path, val_fraction=0, test_fraction=0, progress=False, order="source")
    assert manifest["name"] == "photos" and manifest["source_kind"] == "folder"
    skipped = {e["file"]: e["reason"] for e in manifest["skipped"]}
    converted = {e["file"]: e["reason"] for e in manifest["converted"]}
    assert sorted(skipped) == sorted(SKIPPED) and sorted(converted) == sorted(CONVERTED)
    for name, words in SKIPPED.items():
        assert words in skipped[name], (name, skipped[name])
    for name, words in CONVERTED.items():
        assert words in converted[name], (name, converted[name])
    got = all_samples(tmp_path, manifest, "train")
    assert manifest["splits"]["train"]["samples"] == len(got) == len(GOOD) + len(CONVERTED)
    by_src = {json.loads(s["json"])["src"]: s for _, s in got}
    assert sorted(by_src) == sorted(GOOD + list(CONVERTED))
    for src, sample in by_src.items():
        decode(sample)  # every packed image is complete 8-bit RGB
        if src in GOOD:  # untouched originals
            assert sample[{"png": "png"}.get(src.rsplit(".", 1)[1], "jpg")] == (bad_folder / src).read_bytes()
    assert by_src["png_named.jpg"]["png"] == (bad_folder / "png_named.jpg").read_bytes()
    assert "jpg" not in by_src["cmyk.jpg"] and "png" in by_src["cmyk.jpg"]
    np.testing.assert_array_equal(decode(by_src["gray16.png"])[..., 0].ravel(), np.arange(256))  # not clipped white
    rgba = decode(by_src["rgba.png"])
    assert (rgba[0, 0] == (255, 0, 0)).all() and (rgba[-1, -1] == (255, 255, 255)).all()
    assert decode(by_src["rotated.jpg"]).shape == (40, 20, 3)  # 40x20 stored, shown 20 wide and 40 high
    assert (decode(by_src["rgb16.png"]) == 0x12).all()
    keys = [key for key, _ in got]
    assert all(len(k) == 8 and k.isdigit() for k in keys) and keys == sorted(keys)


def test_bad_files_preresized_two_workers(bad_folder, tmp_path):
    with alarm(30):
        manifest = pack(bad_folder, tmp_path, resolution=16, workers=2, shard_size=3, progress=False)
    assert manifest["crop"] == "shorter-side-center"
    assert sorted(e["file"] for e in manifest["skipped"]) == sorted(SKIPPED)
    # Pre-resized samples are all re-encoded; only real pixel conversions are reported.
    assert sorted(e["file"] for e in manifest["converted"]) == ["cmyk.jpg", "gray.jpg", "gray16.png", "palette.png",
                                                               "rgba.png"]
    got = [s for split in ("train", "val", "test") for s in all_samples(tmp_path, manifest, split)]
    assert len(got) == len(GOOD) + len(CONVERTED) == sum(s["samples"] for s in manifest["splits"].values())
    for _, sample in got:
        array = decode(sample)
        assert array.dtype == np.uint8 and array.shape == (16, 16, 3)


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_text("not an image")
    with pytest.raises(UserError, match="no readable images"):
        pack(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- determinism, readers


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("resolution", [0, 20])
def test_repack_is_byte_identical_for_any_worker_count(bad_folder, celeba, tmp_path, resolution):
    for src in (celeba, bad_folder):
        options = dict(resolution=resolution, shard_size=3, progress=False, force=True)
        with alarm(30):
            one = pack(src, tmp_path / "one", workers=1, **options)
            two = pack(src, tmp_path / "two", workers=2, **options)
        assert one == two
        assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


@pytest.mark.parametrize("resolution", [0, 32])
def test_gnu_tar_and_plain_webdataset_read_the_shards(celeba, tmp_path, resolution):
    import webdataset as wds

    manifest = pack(celeba, tmp_path, resolution=resolution, shard_size=4, progress=False, order="source")
    shard = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    listing = subprocess.run(["tar", "-tf", str(shard)], capture_output=True, text=True, check=True)
    ext = "jpg" if resolution == 0 else "npy"
    assert listing.stdout.split() == [f"00000{i}.{e}" for i in range(1, 5) for e in (ext, "json")]
    assert listing.stderr == ""

    urls = [str(tmp_path / sh["file"]) for split in manifest["splits"].values() for sh in split["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb"):
        image = sample[ext]
        assert image.shape == ((218, 178, 3) if resolution == 0 else (32, 32, 3))
        assert sample["json"]["src"] == sample["__key__"] + ".jpg"
        seen += 1
    assert seen == 10


# ----------------------------------------------------------------------------------------------- interruption, errors


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_pack_leaves_no_partial_shard_and_no_manifest(celeba, tmp_path, monkeypatch, error):
    real, calls = pack_module._process, []

    def failing(opts, path):
        calls.append(path)
        if len(calls) == 5:
            raise error("simulated failure")
        return real(opts, path)

    monkeypatch.setattr(pack_module, "_process", failing)
    with pytest.raises(error):
        pack(celeba, tmp_path, shard_size=2, workers=1, progress=False, order="source")
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob(".*"))  # no partial shard or manifest left behind
    finished = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in finished] == ["celeba-train-000000.tar", "celeba-train-000001.tar"]
    for path in finished:  # what kept its final name is complete
        assert len(samples(path)) == 2


def test_missing_empty_and_occupied_outputs_are_user_errors(celeba, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        pack(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images in"):
        pack(tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    pack(celeba, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="already holds shards; pass --force"):
        pack(celeba, tmp_path / "out", progress=False)
    (tmp_path / "out" / "celeba-train-000099.tar").write_bytes(b"stale")
    pack(celeba, tmp_path / "out", force=True, progress=False)
    assert not (tmp_path / "out" / "celeba-train-000099.tar").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distvae", "pack", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_errors_are_one_line_and_force_replaces(celeba, tmp_path):
    for src in (tmp_path / "missing", tmp_path):  # missing, then empty
        result = _cli("--src", src, "--out", tmp_path / "o")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("distvae pack: error: ")
    assert _cli("--src", celeba, "--out", tmp_path / "out", "--resolution", "16").returncode == 0
    result = _cli("--src", celeba, "--out", tmp_path / "out")
    assert result.returncode == 2 and "--force" in result.stderr and "Traceback" not in result.stderr
    result = _cli("--src", celeba, "--out", tmp_path / "out", "--force", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"packed 10 images into {tmp_path / 'out'}: train 6 (1 shard) / val 2 (1) / "
                                    "test 2 (1); converted 0, skipped 1")
    assert "skipped 000011.jpg: missing (no such file)" in result.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["resolution"] is None


def test_samples_are_written_in_a_seeded_random_order_by_default(tmp_path):
    """A folder sorted by class must not become one-class shards: the default order is a seeded shuffle."""
    src = tmp_path / "sorted"
    rng = np.random.default_rng(5)
    for cls in range(4):
        (src / f"class{cls}").mkdir(parents=True)
        for i in range(10):
            _face(rng, 24, 24).save(src / f"class{cls}" / f"{i:02d}.png")
    kwargs = dict(val_fraction=0, test_fraction=0, shard_size=10, progress=False)
    source = pack(src, tmp_path / "source", order="source", **kwargs)
    shuffled = pack(src, tmp_path / "shuffled", **kwargs)
    again = pack(src, tmp_path / "again", **kwargs)
    reseeded = pack(src, tmp_path / "reseeded", seed=1, **kwargs)
    assert (shuffled["order"], shuffled["order_seed"], source["order"], source["order_seed"]) == (
        "shuffled", 0, "source", None)

    def classes_per_shard(out, manifest):
        return [len({json.loads(sample["json"])["src"].split("/")[0] for _, sample in samples(out / shard["file"])})
                for shard in manifest["splits"]["train"]["shards"]]

    assert classes_per_shard(tmp_path / "source", source) == [1, 1, 1, 1]  # control: what source order gives
    assert sum(classes_per_shard(tmp_path / "shuffled", shuffled)) >= 10  # about 3 of 4 classes per shard
    srcs = lambda out, manifest: [json.loads(s["json"])["src"] for shard in manifest["splits"]["train"]["shards"]  # noqa: E731
                                  for _, s in samples(out / shard["file"])]
    assert sorted(srcs(tmp_path / "shuffled", shuffled)) == srcs(tmp_path / "source", source)  # same samples
    assert [sh["sha256"] for sh in again["splits"]["train"]["shards"]] == [
        sh["sha256"] for sh in shuffled["splits"]["train"]["shards"]]  # same seed, same bytes
    assert srcs(tmp_path / "reseeded", reseeded) != srcs(tmp_path / "shuffled", shuffled)
    with pytest.raises(UserError, match="--order 'random'"):
        pack(src, tmp_path / "bad", order="random", **kwargs)
