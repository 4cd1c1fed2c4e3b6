"""Finding shards and reading them fast.

Shard specs accepted wherever a config asks for shards (`data.train_shards`, `data.val_shards`):

    shards/celeba/celeba-train-{000000..000039}.tar        brace pattern
    shards/a.tar,shards/b.tar                              comma-separated list
    shards/celeba/manifest.json                            the packer's manifest (split from the role,
    shards/celeba/manifest.json#val                        or named after '#')
    http://host/celeba/celeba-train-{000000..000039}.tar   http(s) URLs
    pipe:aws s3 cp s3://bucket/celeba-train-000000.tar -   any command that writes a tar to stdout

Every shard needs a sample count (the stream plans equal work for every rank before reading) and the
crop done to it at pack time (so the stream never crops twice): both come from the `manifest.json` next
to the shards when there is one, otherwise from one pass over the tar (the count from its headers, the
crop from the first sample's JSON, which `distvae pack --resolution` writes into every sample).

`read_samples` is a lean tar reader for the training stream: webdataset's generic pipeline costs
0.13-0.2 ms per sample before any decoding, more than a pre-resized 64 px image takes to load. It
parses USTAR/GNU headers itself, groups members into samples by key, and skips the payload of samples
it does not need (a seek for local files), so resuming mid-epoch never reads what it skips.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import mmap
import os
import re
import select
import signal
import subprocess
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from distvae.errors import UserError


@dataclass(frozen=True)
class Shard:
    url: str  # local path, http(s):// URL or pipe:command
    samples: int  # number of samples (image + metadata groups) in the tar
    cropped: str | None = None  # crop done at pack time ("celeba-center-168", "shorter-side-center"); None = none
    sha256: str = ""  # the file's checksum, from the manifest ("" when no manifest lists it)


class ShardError(Exception):
    """A shard that cannot be read to the end (truncated, corrupt header, failed download)."""


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _split_list(spec: str) -> list[str]:
    """Split on commas that are not inside braces ({000..009} and {a,b} stay whole)."""
    parts, depth, current = [], 0, ""
    for char in spec:
        depth += char == "{"
        depth -= char == "}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def _read_json(url: str) -> dict | None:
    try:
        if _is_remote(url):
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.loads(response.read())
        path = Path(url)
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _sibling(url: str, name: str) -> str | None:
    if url.startswith("pipe:"):
        return None
    if _is_remote(url):
        return urllib.parse.urljoin(url, name)
    return str(Path(url).parent / name)


def _shards_in_manifest(manifest: dict) -> dict[str, tuple[int, str | None, str]]:
    """File name -> (samples, crop done at pack time, sha256) of every shard a manifest lists."""
    found = {}
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            found[shard["file"]] = shard["samples"], manifest.get("crop"), shard.get("sha256", "")
    return found


def read_manifest(spec: str, shards: list[Shard]) -> dict:
    """The manifest a spec names, or the one beside its first shard; {} when there is none."""
    url = spec.partition("#")[0]
    if not url.endswith(".json"):
        url = _sibling(shards[0].url, "manifest.json") if shards else None
    return (_read_json(url) or {}) if url else {}


def resolve_shards(spec: str, split: str = "train") -> list[Shard]:
    """Turn a shard spec into shards with sample counts; a one-line UserError when that is impossible."""
    if not spec.strip():
        raise UserError("no shards given: set data.train_shards (a brace pattern, a list, or a manifest.json)")
    manifest_url, _, manifest_split = spec.partition("#")
    if manifest_url.endswith(".json"):
        manifest = _read_json(manifest_url)
        if manifest is None:
            raise UserError(f"cannot read shard manifest {manifest_url}: run `distvae pack` first or fix the path")
        split = manifest_split or split
        if split not in manifest.get("splits", {}):
            raise UserError(f"manifest {manifest_url} has no split {split!r}; it has {sorted(manifest['splits'])}")
        entries = manifest["splits"][split]["shards"]
        if not entries:
            raise UserError(f"manifest {manifest_url} lists no shards for split {split!r}")
        cropped = manifest.get("crop")
        return [Shard(_sibling(manifest_url, entry["file"]), entry["samples"], cropped, entry.get("sha256", ""))
                for entry in entries]

    urls = [url for part in _split_list(spec) for url in braceexpand(part)]
    listed_by_manifest: dict[str, dict[str, tuple[int, str | None, str]]] = {}
    shards = []
    for url in urls:
        if not url.startswith("pipe:") and not _is_remote(url) and not Path(url).is_file():
            raise UserError(f"shard {url} does not exist (from {spec!r})")
        manifest_url = _sibling(url, "manifest.json")
        if manifest_url is not None and manifest_url not in listed_by_manifest:
            listed_by_manifest[manifest_url] = _shards_in_manifest(_read_json(manifest_url) or {})
        listed = listed_by_manifest.get(manifest_url, {}).get(url.rsplit("/", 1)[-1])
        if listed is None:
            count, first = scan_shard(url)
            listed = count, first.get("crop"), ""
        shards.append(Shard(url, *listed))
    return shards


# ---------------------------------------------------------------------------------------------------------
# Reading tars


READ_TIMEOUT = 120.0  # seconds without a byte from a pipe: or http shard before it counts as unreadable


class _Source:
    """A byte stream with read(n) and skip(n): mmap for local files, a pipe or a socket otherwise.

    Pipes and http give up after `timeout` seconds without a byte (ShardError), so a stuck command or
    a dead bucket shows up as unreadable samples instead of blocking the run forever.
    """

    def __init__(self, url: str, timeout: float = READ_TIMEOUT):
        self.url, self.process, self.map, self.file, self.pipe = url, None, None, None, None
        self.position, self.timeout = 0, timeout
        self.buffered, self.buffered_at = b"", 0  # pipes: bytes read ahead, and how many of them were used
        if url.startswith("pipe:"):
            # Its own process group: closing kills the whole command (`sh -c` children included).
            self.process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
            self.pipe = self.process.stdout.fileno()
        elif _is_remote(url):
            self.file = urllib.request.urlopen(url, timeout=timeout)
        else:
            with open(url, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def _chunk(self, size: int) -> bytes:
        if self.pipe is None:
            try:
                return self.file.read(size)
            except TimeoutError:
                raise ShardError(f"sent nothing for {self.timeout:g} s (data.read_timeout_s)") from None
        if self.buffered_at == len(self.buffered):  # read ahead: tar headers are 512 bytes, syscalls are not free
            ready, _, _ = select.select([self.pipe], [], [], self.timeout)
            if not ready:
                raise ShardError(f"sent nothing for {self.timeout:g} s (data.read_timeout_s)")
            self.buffered, self.buffered_at = os.read(self.pipe, 1 << 20), 0
        end = min(len(self.buffered), self.buffered_at + size)
        chunk, self.buffered_at = self.buffered[self.buffered_at : end], end
        return chunk

    def read(self, size: int) -> bytes:
        if self.map is not None:
            data = self.map[self.position : self.position + size]
            self.position += len(data)
            return data
        chunks, remaining = [], size
        while remaining:
            chunk = self._chunk(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def skip(self, size: int) -> bool:
        if self.map is not None:
            self.position += size
            return self.position <= len(self.map)
        while size:
            chunk = self._chunk(min(size, 1 << 20))
            if not chunk:
                return False
            size -= len(chunk)
        return True

    def close(self) -> None:
        if self.map is not None and not isinstance(self.map, bytes):
            self.map.close()
        if self.file is not None:
            self.file.close()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.stdout.close()
            self.process.wait()


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = path up to the first dot of the file name


def _members(source) -> Iterator[tuple[str, int, int]]:
    """Yield (name, size, padded size) of regular files; the caller must read or skip `padded` bytes.

    Before each yield, `source.member_start` is the offset of the member's first header (its GNU long
    name or pax header included): where a random-access read of it starts.
    """
    long_name, prefix_at = None, None
    while True:
        header_at = source.position
        header = source.read(512)
        if len(header) < 512:
            raise ShardError("ends before the tar end marker (truncated)")
        if header == bytes(512):
            return
        if header[257:262] != b"ustar":
            raise ShardError("has a corrupt tar header")
        size = _octal(header[124:136])
        padded = (size + 511) & ~511
        kind = header[156:157]
        if kind in (b"L", b"x"):  # GNU long name / pax header: the next member's real name
            prefix_at = header_at if prefix_at is None else prefix_at
            payload = source.read(padded)[:size]
            if kind == b"L":
                long_name = payload.rstrip(b"\0").decode()
            else:
                for record in payload.decode("utf-8", "replace").splitlines():
                    if " path=" in record:
                        long_name = record.split(" path=", 1)[1]
            continue
        name = long_name or header[:100].rstrip(b"\0").decode()
        if not long_name and header[257:263] == b"ustar\0" and header[345]:  # POSIX prefix (GNU uses it otherwise)
            name = header[345:500].rstrip(b"\0").decode() + "/" + name
        long_name = None
        source.member_start, prefix_at = header_at if prefix_at is None else prefix_at, None
        if kind not in (b"0", b"\0", b"7"):
            if not source.skip(padded):
                raise ShardError("ends inside a member (truncated)")
            continue
        yield name, size, padded


def read_samples(url: str, start: int = 0, stop: int | None = None, wanted=None,
                 timeout: float = READ_TIMEOUT) -> Iterator[tuple[int, dict | None]]:
    """Yield (index, {ext: bytes, "__key__": key}) for samples start <= index < stop of one shard.

    `wanted(index) -> bool` says which samples to load; the others are skipped without reading their
    payload. A shard that ends early, or a pipe/http source silent for `timeout` seconds, raises
    ShardError after the samples before the damage.
    """
    source = _Source(url, timeout)
    try:
        index, key, sample, keep = -1, None, None, False
        for name, size, padded in _members(source):
            match = _KEY.match(name)
            if match is None:
                source.skip(padded)
                continue
            member_key, ext = match.group(1), match.group(2).lower()
            if member_key != key:
                if sample is not None:
                    yield index, sample
                index, key, sample = index + 1, member_key, None
                if stop is not None and index >= stop:
                    return
                keep = index >= start and (wanted is None or wanted(index))
                if keep:
                    sample = {"__key__": key}
            if keep:
                payload = source.read(padded)
                if len(payload) < padded:
                    raise ShardError(f"ends inside member {name} (truncated)")
                sample[ext] = payload[:size]
            elif not source.skip(padded):
                raise ShardError(f"ends inside member {name} (truncated)")
        if sample is not None:
            yield index, sample
    finally:
        source.close()


def count_samples(url: str) -> int:
    """Samples in one shard, from its headers alone (payloads are skipped)."""
    return scan_shard(url)[0]


def scan_shard(url: str) -> tuple[int, dict]:
    """(samples in one shard, the first sample's JSON metadata or {}); only that JSON payload is read."""
    try:
        source = _Source(url)
    except OSError as error:
        raise UserError(f"cannot open shard {url}: {error}") from None
    count, key, first = 0, None, None
    try:
        for name, size, padded in _members(source):
            match = _KEY.match(name)
            if first is None and count <= 1 and match and match.group(2).lower() == "json":
                first = source.read(padded)[:size]
            else:
                source.skip(padded)
            if match and match.group(1) != key:
                count, key = count + 1, match.group(1)
    except (OSError, ShardError) as error:
        raise UserError(f"cannot count the samples of shard {url}: {error}") from None
    finally:
        source.close()
    try:
        meta = json.loads(first) if first else {}
    except ValueError:
        meta = {}
    return count, meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Random access


def is_seekable(url: str) -> bool:
    """Local (or mounted) files can be read at any sample; pipe: and http(s) only from the start."""
    return not url.startswith("pipe:") and not _is_remote(url)


class _MapView:
    """read/skip over a memory map from any offset, for _members."""

    def __init__(self, data, position: int):
        self.map, self.position, self.member_start = data, position, position

    def read(self, size: int) -> bytes:
        data = self.map[self.position : self.position + size]
        self.position += len(data)
        return data

    def skip(self, size: int) -> bool:
        self.position += size
        return self.position <= len(self.map)


@dataclass
class _ShardIndex:
    starts: np.ndarray  # int64 offset of each whole sample's first header
    ends: np.ndarray  # int64 offset just past its last member
    damage: str | None  # why the index stops early, when it does
    npy: np.ndarray  # int64 (offset, size) of each sample's .npy payload; (-1, 0) where it has none
    layout: tuple | None | bool = False  # False: not looked at yet; None: not one fixed layout; else see npy_layout


def _index(url: str, data) -> _ShardIndex:
    view = _MapView(data, 0)
    keys, starts, ends, npy, damage = [], [], [], [], None
    try:
        for name, size, padded in _members(view):
            start, payload = view.member_start, view.position
            if not view.skip(padded):
                raise ShardError(f"ends inside member {name} (truncated)")
            match = _KEY.match(name)
            if match is None:
                continue
            if not keys or match.group(1) != keys[-1]:
                keys.append(match.group(1))
                starts.append(start)
                ends.append(view.position)
                npy.append((-1, 0))
            else:
                ends[-1] = view.position
            if match.group(2).lower() == "npy":
                npy[-1] = (payload, size)
    except ShardError as error:
        damage = str(error)
        if keys:  # the last sample may be cut: only whole samples before the damage count
            starts.pop(), ends.pop(), npy.pop()
    return _ShardIndex(np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), damage,
                       np.asarray(npy, dtype=np.int64).reshape(-1, 2))


def _npy_layout(data, index: _ShardIndex) -> tuple[int, tuple[int, ...]] | None:
    """(header length, shape) when every sample's .npy member is uint8 in C order with one header, else None.

    Pre-resized shards are made so (pack.py): then a sample's pixels sit at a fixed offset in its
    payload and a batch is gathered with one slice a sample, with no tar or npy parsing per sample.
    """
    if not len(index.npy) or (index.npy[:, 0] < 0).any():
        return None
    first, size = (int(value) for value in index.npy[0])
    head = bytes(data[first : first + min(size, 4096)])
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        return None
    field = 4 if head[6] >= 2 else 2
    length = 8 + field + int.from_bytes(head[8 : 8 + field], "little")
    header = head[:length]
    try:
        fields = ast.literal_eval(header[8 + field :].decode("latin1").strip())
    except (ValueError, SyntaxError):
        return None
    shape = tuple(fields.get("shape", ()))
    if fields.get("fortran_order") or np.dtype(fields.get("descr", "O")) != np.uint8 or \
            (index.npy[:, 1] != length + math.prod(shape)).any():
        return None
    if any(bytes(data[offset : offset + length]) != header for offset in index.npy[1:, 0].tolist()):
        return None
    return length, shape


def _map(url: str):
    with open(url, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""


class SeekableShards:
    """Samples of local shards by index, one per data worker (a map does not cross fork/pickle boundaries).

    A shard's member offsets are read from its headers on first use (payloads are not touched) and kept
    as two int64 arrays (16 bytes a sample) for up to `keep_indexes` shards; up to `keep_maps` shards stay
    memory-mapped (each map holds a file descriptor). A shuffle block spans far more shards than are
    mapped at once: reopening a map is cheap, indexing a shard again is not, so the two are kept apart.
    """

    def __init__(self, keep_maps: int = 128, keep_indexes: int = 16384):
        self.keep_maps, self.keep_indexes = keep_maps, keep_indexes
        self.maps: OrderedDict[str, object] = OrderedDict()
        self.indexes: OrderedDict[str, _ShardIndex] = OrderedDict()

    def _shard(self, url: str):
        data = self.maps.get(url)
        if data is None:
            data = self.maps[url] = _map(url)
            while len(self.maps) > self.keep_maps:
                _, old = self.maps.popitem(last=False)
                if not isinstance(old, bytes):
                    old.close()
        self.maps.move_to_end(url)
        index = self.indexes.get(url)
        if index is None:
            index = self.indexes[url] = _index(url, data)
            while len(self.indexes) > self.keep_indexes:
                self.indexes.popitem(last=False)
        self.indexes.move_to_end(url)
        return data, index

    def sample(self, url: str, index: int) -> dict:
        """{ext: bytes, "__key__": key} of sample `index`; ShardError when the shard cannot give it."""
        try:
            data, shard = self._shard(url)
        except OSError as error:
            raise ShardError(f"cannot be opened: {error.strerror or error}") from None
        if index >= len(shard.starts):
            raise ShardError(shard.damage or f"holds {len(shard.starts)} samples, fewer than its manifest says")
        view = _MapView(data, int(shard.starts[index]))
        end, sample = int(shard.ends[index]), {}
        for name, size, padded in _members(view):
            match = _KEY.match(name)
            if match is None:
                view.skip(padded)
            else:
                sample.setdefault("__key__", match.group(1))
                sample[match.group(2).lower()] = view.read(padded)[:size]
            if view.position >= end:
                break
        return sample

    def gather_npy(self, url: str, indices: np.ndarray, shape: tuple[int, ...], out: np.ndarray,
                   slots: np.ndarray) -> np.ndarray | None:
        """Copy the pixels of samples `indices` of a fixed-layout npy shard into out[slots]; a bool array says
        which were there (False past a damaged end). None when the shard is not one fixed layout of
        `shape`: the caller decodes its samples one by one instead."""
        try:
            data, shard = self._shard(url)
        except OSError as error:
            raise ShardError(f"cannot be opened: {error.strerror or error}") from None
        if shard.layout is False:
            shard.layout = _npy_layout(data, shard)
        if shard.layout is None or shard.layout[1] not in (shape, shape[:2] if shape[2:] == (1,) else shape):
            return None
        present = indices < len(shard.starts)
        flat, length, count = np.frombuffer(data, dtype=np.uint8), shard.layout[0], math.prod(shape)
        try:
            for slot, offset in zip(slots[present].tolist(), shard.npy[indices[present], 0].tolist()):
                out[slot] = flat[offset + length : offset + length + count].reshape(shape)
        finally:
            del flat  # a live view of a map keeps it from being closed
        return present

    def close(self) -> None:
        for data in self.maps.values():
            if not isinstance(data, bytes):
                data.close()
        self.maps.clear()
        self.indexes.clear()
