"""Pack a CelebA root or any image folder into webdataset shards.

    distvae pack --src data/celeba --out shards/celeba                                   # original JPEG/PNG bytes
    distvae pack --src data/celeba --out shards/celeba64 --resolution 64 --workers 8     # pre-cropped 64x64 uint8 .npy
    distvae pack --src ~/photos --out shards/photos --resolution 128 --format png        # any folder, any sizes

Writes OUT/NAME-SPLIT-000000.tar, -000001.tar, ... (SPLIT = train/val/test, --shard-size samples each) and then
OUT/manifest.json, and beside each shard its index, NAME-SPLIT-000000.tar.idx (the members' offsets, 32 bytes a
sample: a resumed run opens a shard without reading its headers; see seekable.py). Samples are written in a
random order drawn from --seed (--order source keeps the source order): a folder sorted by class, identity or
date would otherwise give shards, and so batches, of one kind. Each sample is two USTAR members, `KEY.EXT`
(jpg/png holding the original bytes, or npy/png/jpg when pre-resized) followed by `KEY.json` (compact, sorted
keys: src, split, attrs?, identity?, and crop + resolution when pre-resized, so the stream never crops such a
sample again). Member metadata is fixed, so the same input gives byte-identical shards for any --workers.

CelebA roots keep the partition file's order and split; crop = torchvision CenterCrop(168) then resize.
Plain folders take every jpg/jpeg/png/webp at any depth, split by a hash of the relative path (adding files never
moves others), apply EXIF orientation, crop the centre square of the shorter side, then resize; big JPEGs are
decoded with PIL's DCT scaling (draft) when that still leaves at least twice the target size. Crop and resize are
`distvae.data.decode`'s, the very code the training stream runs on original bytes. Transparency is composited on white.
Files that cannot be decoded are skipped, never packed; both lists land in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import stat
import sys
import tarfile
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from distvae.data.decode import CELEBA_CROP, center_box, crop_side, draft, fit
from distvae.data.seekable import INDEX_SUFFIX, write_index
from distvae.errors import UserError

FORMAT = "distvae-shards-v1"
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
TAR_MTIME = 946684800  # 2000-01-01, for every member: repacks are byte-identical
PARTITION, ATTRS, IDENTITY = "list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt"
# The file-name extensions each decoded format is expected under (a mismatch is reported as a conversion).
NATURAL_EXTS = {"JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
MODE_NAMES = {"L": "grayscale (L)", "1": "1-bit (1)", "P": "palette (P)", "F": "32-bit float (F)"}


@dataclass(frozen=True)
class _Item:
    rel: str  # path relative to the image folder, as written to KEY.json "src"
    path: str
    key: str
    split: str
    attrs: tuple[int, ...] | None = None
    identity: int | None = None
    skip: str | None = None  # known bad before reading (duplicate key, no attribute row, unlistable folder)


@dataclass(frozen=True)
class _Options:
    resolution: int
    image_format: str
    crop: str | None  # "celeba-center-168" | "shorter-side-center" | None
    exif: bool
    max_pixels: int


class _Skip(Exception):
    """A file that must not be packed; the message is the manifest's reason."""


# ----------------------------------------------------------------------------------------------- sources


def _scan_celeba(root: Path) -> tuple[list[_Item], list[str] | None]:
    attr_names, attrs = _read_attrs(root / ATTRS) if (root / ATTRS).is_file() else (None, {})
    identities = {}
    if (root / IDENTITY).is_file():
        for lineno, parts in _rows(root / IDENTITY):
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{root / IDENTITY}:{lineno}: expected 'FILE IDENTITY', got {' '.join(parts)!r}")
            identities[parts[0]] = int(parts[1])
    items, keys = [], set()
    for lineno, parts in _rows(root / PARTITION):
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"{root / PARTITION}:{lineno}: expected 'FILE 0|1|2', got {' '.join(parts)!r}")
        fname, code = parts
        key = Path(fname).stem.replace(".", "_")  # webdataset groups members by the name before the first dot
        skip = None
        if key in keys:
            skip = f"duplicate sample key {key!r} (same name stem as an earlier file)"
        elif attr_names is not None and fname not in attrs:
            skip = f"no row in {ATTRS}"  # every sample of a set with attributes carries them
        keys.add(key)
        items.append(_Item(fname, str(root / "img_align_celeba" / fname), key, SPLITS[int(code)],
                           attrs.get(fname), identities.get(fname), skip))
    return items, attr_names


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return [(lineno, line.split()) for lineno, line in enumerate(lines, 1) if line.strip()]


def _read_attrs(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    rows = _rows(path)  # a count line, the attribute names, then `FILE 1 -1 ...`
    if len(rows) < 2:
        raise UserError(f"{path}: expected a count line and a line of attribute names")
    names, attrs = rows[1][1], {}
    for lineno, parts in rows[2:]:
        if len(parts) != len(names) + 1 or not set(parts[1:]) <= {"1", "-1", "0"}:
            raise UserError(f"{path}:{lineno}: expected a file name and {len(names)} values of 1/-1")
        attrs[parts[0]] = tuple(1 if v == "1" else 0 for v in parts[1:])
    return names, attrs


def _scan_folder(root: Path, val_fraction: float, test_fraction: float) -> list[_Item]:
    found: dict[str, str | None] = {}  # relative POSIX path -> skip reason known from the walk

    def unlistable(exc: OSError) -> None:
        found[Path(exc.filename).relative_to(root).as_posix()] = f"cannot list folder: {exc.strerror}"

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        # Folders named like images are listed (and skipped by the worker) but still walked into.
        for name in dirnames + filenames:
            if name.lower().endswith(IMAGE_EXTS):
                found[(Path(dirpath) / name).relative_to(root).as_posix()] = None
    items = []
    for index, rel in enumerate(sorted(found)):
        digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # per-file, so adding files never moves others
        split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        items.append(_Item(rel, str(root / rel), f"{index:08d}", split, skip=found[rel]))
    return items


# ----------------------------------------------------------------------------------------------- one file


def _process(opts: _Options, path: str) -> tuple[str | None, bytes | None, str | None]:
    """(ext, bytes, conversion note) for a good file, (None, None, skip reason) for a bad one. Never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/palette/bomb warnings: our own checks report what matters
            return _load(opts, path)
    except _Skip as skip:
        return None, None, str(skip)
    except Image.DecompressionBombError as exc:
        return None, None, f"too large: {exc}"
    except Exception as exc:  # any decoder failure, whatever its type: one bad file never stops the pack
        return None, None, "cannot decode: " + (" ".join(str(exc).split()) or type(exc).__name__)


def _read(path: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _Skip("dangling symlink" if os.path.islink(path) else "missing (no such file)") from None
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _Skip("is a directory")
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO or a device could block forever
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        raise _Skip(f"not a regular file ({kind})")
    if st.st_size == 0:
        raise _Skip("empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror}") from None


def _load(opts: _Options, path: str) -> tuple[str, bytes, str | None]:
    data = _read(path)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _Skip("not an image (PIL cannot identify it)") from None
    fmt, (w, h) = im.format, im.size
    if w * h > opts.max_pixels:  # from the header, before any pixel is decoded
        raise _Skip(f"too large: {w}x{h} = {w * h:,} pixels > max_pixels {opts.max_pixels:,}")
    # The training stream's crop rule and resize (decode.fit), so packed pixels are what training would make.
    side = crop_side(w, h, CELEBA_CROP if opts.crop == "celeba-center-168" else 0)
    scale = 1.0
    if opts.crop == "shorter-side-center" and fmt in ("JPEG", "MPO") and min(w, h) >= 2 * opts.resolution:
        scale = draft(im, opts.resolution, side, "RGB")  # DCT scaling: several times faster on big photos
    im.load()  # decode everything now: truncated files fail here, not in the training stream
    orientation = im.getexif().get(0x0112, 1) if opts.exif else 1
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        if orientation >= 5:  # a quarter turn: the box is taken in the upright image
            w, h = h, w
    rgb, notes = _to_rgb(im)
    if opts.resolution:
        pixels = fit(rgb, opts.resolution, center_box(w, h, side), scale)
        return opts.image_format, _encode(pixels, opts.image_format), "; ".join(notes) or None
    # Original bytes only when any decoder will see the very same 8-bit RGB pixels we did.
    suffix = os.path.splitext(path)[1].lower()
    if fmt == "PNG" and rgb is im and data[24:25] != b"\x08":  # IHDR bit depth; PIL keeps the high byte of 16
        notes.append(f"{data[24]}-bit PNG reduced to 8 bits")
    if orientation in range(2, 9):
        notes.append(f"EXIF orientation {orientation} applied")
    if fmt not in ("JPEG", "MPO", "PNG"):
        notes.append(f"{fmt} image")
    renamed = [f"{fmt} data in a {suffix} file"] if suffix not in NATURAL_EXTS.get(fmt, ()) else []
    if not notes:
        ext = "jpg" if fmt in ("JPEG", "MPO") else "png"
        return ext, data, "; ".join(renamed + [f"stored as {ext} (original bytes)"]) if renamed else None
    return "png", _encode(rgb, "png"), "; ".join(renamed + notes + ["stored as png (lossless)"])


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """8-bit RGB; returns the same object when no conversion was needed."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im, []
    if mode.startswith("I"):  # 16-bit (or int) grayscale: convert("RGB") would clip everything above 255 to white
        gray = (np.clip(np.asarray(im), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), [f"16-bit grayscale ({mode}) scaled to 8 bits"]
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"), [f"alpha ({mode}) composited on white"]
    return im.convert("RGB"), [f"{MODE_NAMES.get(mode, mode)} converted to RGB"]


def _encode(image: Image.Image | np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "npy":
        np.lib.format.write_array(buf, np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), allow_pickle=False)
        return buf.getvalue()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image_format == "png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's job: it cleans up and terminates


@contextlib.contextmanager
def _mapped(opts: _Options, paths: list[str], workers: int):
    """Results in input order, from `workers` processes (or in-process for one)."""
    work = partial(_process, opts)
    if workers <= 1 or len(paths) <= 1:
        yield map(work, paths)
        return
    chunksize = max(1, min(32, len(paths) // (workers * 8)))
    with multiprocessing.Pool(min(workers, len(paths)), initializer=_ignore_sigint) as pool:  # exit = terminate
        yield pool.imap(work, paths, chunksize=chunksize)


# ----------------------------------------------------------------------------------------------- output


class _ShardWriter:
    """One split's shards, in order; a shard gets its final name only once it is complete."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.shards: list[dict] = []
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._final = self.out / f"{self.prefix}-{len(self.shards):06d}.tar"
            self._partial = self.out / f".{self._final.name}.partial"
            self._tar = tarfile.open(self._partial, "w", format=tarfile.USTAR_FORMAT)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.samples += 1
        if self._count == self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        digest = hashlib.sha256()
        with open(self._partial, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        os.replace(self._partial, self._final)
        write_index(str(self._final))  # the members' offsets: random access opens a shard with one small read
        self.shards.append({"file": self._final.name, "samples": self._count, "sha256": digest.hexdigest()})
        self._count = 0

    def abort(self) -> None:
        if self._tar is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            self._tar = None
            self._partial.unlink(missing_ok=True)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    old = sorted(out.glob("*.tar")) + sorted(out.glob(f"*.tar{INDEX_SUFFIX}")) + \
        [p for p in [out / "manifest.json"] if p.exists()]
    if old and not force:
        raise UserError(f"{out} already holds shards; pass --force to replace them or choose another --out")
    for path in old + sorted(out.glob(".*.partial")):  # .partial files are leftovers of a killed pack
        path.unlink()


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int):
    """Yields advance(); a rich bar on stderr only when asked for and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("pack", total=total)
        yield lambda: bar.advance(task)


# ----------------------------------------------------------------------------------------------- pack


def pack(src, out, name=None, resolution=0, image_format="npy", workers=1, shard_size=1000,
         val_fraction=0.1, test_fraction=0.1, force=False, progress=True, max_pixels=50_000_000,
         order="shuffled", seed=0) -> dict:
    """Pack `src` (a CelebA root or any image folder) into shards in `out`; returns the manifest."""
    _check_args(resolution, image_format, workers, shard_size, val_fraction, test_fraction, max_pixels)
    if order not in ("shuffled", "source"):
        raise UserError(f"--order {order!r}: choose shuffled (the default) or source")
    source = os.path.abspath(os.path.expanduser(str(src)))
    root, out_path = Path(source), Path(os.path.expanduser(str(out)))
    if not root.is_dir():
        raise UserError(f"--src {src} {'is not a folder' if root.exists() else 'does not exist'}")
    kind, items, attr_names = _scan(root, src, val_fraction, test_fraction)
    if order == "shuffled":  # folders sorted by class, identity or date must not give one-class shards
        items = [items[index] for index in np.random.default_rng([seed, 0x0DE5]).permutation(len(items))]
    if not items:
        raise UserError(f"no images in {src} (looked for .jpg/.jpeg/.png/.webp files at any depth)")
    if name is None:
        name = "celeba" if kind == "celeba" else re.sub(r"[^A-Za-z0-9._-]+", "_", root.name).strip("._") or "images"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it starts every shard file name)")
    _prepare_out(out_path, force)

    crop = None if not resolution else "celeba-center-168" if kind == "celeba" else "shorter-side-center"
    opts = _Options(resolution, image_format, crop, kind == "folder", max_pixels)
    writers = {split: _ShardWriter(out_path, f"{name}-{split}", shard_size) for split in SPLITS}
    skipped, converted = [], []
    try:
        # The pool starts (forks) before rich's refresh thread does.
        with _mapped(opts, [i.path for i in items if not i.skip], workers) as results, \
                _progress_bar(progress, len(items)) as advance:
            for item in items:
                advance()
                ext, data, note = (None, None, item.skip) if item.skip else next(results)
                if ext is None:
                    skipped.append({"file": item.rel, "reason": note})
                    continue
                if note:
                    converted.append({"file": item.rel, "reason": note})
                writers[item.split].add([(f"{item.key}.{ext}", data), (f"{item.key}.json", _sample_json(item, opts))])
        for writer in writers.values():
            writer.finish()
    except BaseException:  # including KeyboardInterrupt: no partial shard survives, no manifest is written
        for writer in writers.values():
            writer.abort()
        raise
    total = sum(w.samples for w in writers.values())
    if total == 0:
        first = skipped[0]
        raise UserError(f"no readable images in {src}: all {len(skipped)} skipped (first: {first['file']}: "
                        f"{first['reason']})")
    manifest = {
        "format": FORMAT, "name": name, "source": source, "source_kind": kind,
        "resolution": resolution or None, "image_format": image_format if resolution else None, "crop": crop,
        "order": order, "order_seed": seed if order == "shuffled" else None,
        "attr_names": attr_names,
        "splits": {split: {"samples": w.samples, "shards": w.shards} for split, w in writers.items()},
        "skipped": skipped, "converted": converted,
    }
    tmp = out_path / ".manifest.json.partial"  # written last: its presence means every shard is complete
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_path / "manifest.json")
    _print_summary(manifest, out_path, total)
    return manifest


def _scan(root: Path, src, val_fraction: float, test_fraction: float):
    """(source kind, items in source order, attribute names or None)."""
    if (root / "img_align_celeba").is_dir() and (root / PARTITION).is_file():
        return ("celeba", *_scan_celeba(root))
    if (root / "img_align_celeba").is_dir():
        print(f"distvae pack: warning: {src} has img_align_celeba/ but no {PARTITION}; "
              "packing it as a plain image folder", file=sys.stderr)
    return "folder", _scan_folder(root, val_fraction, test_fraction), None


def _sample_json(item: _Item, opts: _Options) -> bytes:
    # A pre-cropped sample says so itself, so shards copied without their manifest are never cropped twice.
    meta = {"src": item.rel, "split": item.split, "attrs": item.attrs and list(item.attrs), "identity": item.identity,
            "crop": opts.crop, "resolution": opts.resolution or None}
    return json.dumps({k: v for k, v in meta.items() if v is not None}, sort_keys=True, separators=(",", ":")).encode()


def _check_args(resolution, image_format, workers, shard_size, val_fraction, test_fraction, max_pixels) -> None:
    if resolution < 0:
        raise UserError(f"--resolution {resolution}: use 0 (original bytes) or a positive size")
    if image_format not in ("npy", "png", "jpg"):
        raise UserError(f"--format {image_format!r}: choose npy, png or jpg")
    if workers < 1 or shard_size < 1 or max_pixels < 1:
        raise UserError("--workers, --shard-size and max_pixels must be at least 1")
    if not (0 <= val_fraction <= 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1] "
                        "and add up to at most 1")


def _print_summary(manifest: dict, out: Path, total: int) -> None:
    splits = manifest["splits"]
    parts = [f"{s} {splits[s]['samples']:,} ({len(splits[s]['shards'])})" for s in SPLITS]
    n_train = len(splits["train"]["shards"])
    parts[0] = parts[0][:-1] + (" shard)" if n_train == 1 else " shards)")
    skipped, converted = manifest["skipped"], manifest["converted"]
    print(f"packed {total:,} images into {out}: {' / '.join(parts)}; converted {len(converted):,}, "
          f"skipped {len(skipped):,} (listed in {out / 'manifest.json'})")
    for entry in skipped[:10]:
        print(f"  skipped {entry['file']}: {entry['reason']}")
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10:,} more")
