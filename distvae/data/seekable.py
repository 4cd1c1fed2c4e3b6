"""Reading local shards at any sample: the planned training order, the tools, the cache.

    reader = SeekableShards()
    reader.sample("shards/celeba/celeba-train-000003.tar", 417)      # {"npy": bytes, "json": bytes, "__key__": ...}
    reader.gather_npy(url, indices, (64, 64, 3), out, slots)          # pre-resized pixels straight into a batch

A sample's place in its shard comes from the shard's index: the offsets of its members. `distvae pack`
writes it beside each shard (`NAME.tar.idx`, 32 bytes a sample), so opening a shard costs one small read;
without one (shards made by other tools) the index is read from the tar headers on first use, about 4 ms
for a shard of 400 pre-resized samples. A resume late in an epoch opens about as many shards as a batch
has samples, so this is most of what a resume costs. An index whose shard has changed size since, or
whose offsets do not land on the members it names, is not used: the headers are read instead.
"""

from __future__ import annotations

import ast
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from distvae.data.shards import _KEY, ShardError, _members, _octal, map_file


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
    uniform: int = 0  # from pack's index: the length of the npy header every sample shares (0: not known)


def scan_index(data) -> _ShardIndex:
    """The index from the tar headers (payloads are not touched)."""
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


INDEX_SUFFIX = ".idx"
_INDEX_MAGIC = int.from_bytes(b"DVAEIDX1", "little")


def write_index(url: str) -> str:
    """Write the index of a complete local shard beside it (atomically); returns its path."""
    data = map_file(url)
    try:
        index = scan_index(data)
        if index.damage:
            raise ShardError(index.damage)
        rows = np.column_stack([index.starts, index.ends, index.npy]).astype("<i8")
        layout = _npy_layout(data, index)
        head = np.asarray([_INDEX_MAGIC, len(data), len(rows), layout[0] if layout else 0], dtype="<i8")
    finally:
        if not isinstance(data, bytes):
            data.close()
    path, partial = url + INDEX_SUFFIX, f"{url}{INDEX_SUFFIX}.partial"
    with open(partial, "wb") as handle:
        handle.write(head.tobytes() + rows.tobytes())
    os.replace(partial, path)
    return path


def load_index(url: str, data) -> _ShardIndex | None:
    """The index written by pack, or None when there is none or it does not fit this shard as it is now."""
    try:
        raw = np.fromfile(url + INDEX_SUFFIX, dtype="<i8")
    except (OSError, ValueError):
        return None
    if len(raw) < 4 or raw[0] != _INDEX_MAGIC or raw[1] != len(data) or len(raw) != 4 + 4 * int(raw[2]):
        return None
    rows = raw[4:].reshape(-1, 4)
    for start, end, npy_at, npy_size in rows[[0, -1]].tolist() if len(rows) else []:
        if not _points_at_members(data, start, end, npy_at, npy_size):
            return None
    return _ShardIndex(rows[:, 0].copy(), rows[:, 1].copy(), None, rows[:, 2:].copy(), uniform=int(raw[3]))


def _points_at_members(data, start: int, end: int, npy_at: int, npy_size: int) -> bool:
    """A sample's recorded offsets land on tar headers, and its npy member has the recorded size."""
    def is_header(at: int) -> bool:
        return 0 <= at <= len(data) - 512 and bytes(data[at + 257 : at + 262]) == b"ustar"

    if not (is_header(start) and start < end <= len(data) and (end == len(data) or end % 512 == 0)):
        return False
    return npy_at < 0 or (is_header(npy_at - 512) and _octal(bytes(data[npy_at - 388 : npy_at - 376])) == npy_size)


def _npy_layout(data, index: _ShardIndex) -> tuple[int, tuple[int, ...]] | None:
    """(header length, shape) when every sample's .npy member is uint8 in C order with one header, else None.

    Pre-resized shards are made so (pack.py): then a sample's pixels sit at a fixed offset in its
    payload and a batch is gathered with one slice a sample, with no tar or npy parsing per sample.
    An index that pack wrote says whether every header is the same (`uniform`): comparing them here would
    touch every page of the shard, 19 ms of a 40 ms resume that opens 52 shards.
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
    if index.uniform != length and _npy_headers_differ(data, index.npy[:, 0], header):
        return None
    return length, shape


def _npy_headers_differ(data, offsets: np.ndarray, header: bytes) -> bool:
    flat = np.frombuffer(data, dtype=np.uint8)
    try:  # every sample's npy header at once, one row each
        return bool((flat[offsets[:, None] + np.arange(len(header))] != np.frombuffer(header, np.uint8)).any())
    finally:
        del flat  # a live view of a map keeps it from being closed


def _pixel_rows(data, starts: np.ndarray, count: int) -> np.ndarray | None:
    """The pixels of every sample as rows of one strided view of the map, when the samples lie at one stride
    (pack's shards do: a sample's metadata fits one tar block); None otherwise."""
    if len(starts) == 0 or isinstance(data, bytes):
        return None
    stride = int(starts[1] - starts[0]) if len(starts) > 1 else count
    if stride < count or (len(starts) > 1 and (np.diff(starts) != stride).any()) or starts[-1] + count > len(data):
        return None
    flat = np.frombuffer(data, dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(flat[int(starts[0]):], (len(starts), count), (stride, 1), writeable=False)


class SeekableShards:
    """Samples of local shards by index, one per data worker (a map does not cross fork/pickle boundaries).

    A shard's member offsets come from its index file, or from its headers when it has none (payloads are
    not touched), on first use; they are kept for up to `keep_indexes` shards; up to `keep_maps` shards stay
    memory-mapped (each map holds a file descriptor). A shuffle block spans far more shards than are
    mapped at once: reopening a map is cheap, indexing a shard again is not, so the two are kept apart.
    """

    def __init__(self, keep_maps: int = 128, keep_indexes: int = 16384):
        self.keep_maps, self.keep_indexes = keep_maps, keep_indexes
        self.maps: OrderedDict[str, object] = OrderedDict()
        self.indexes: OrderedDict[str, _ShardIndex] = OrderedDict()
        self.rows: dict[str, np.ndarray | None] = {}  # per mapped shard: its pixels as (samples, bytes) rows, or None

    def _shard(self, url: str):
        data = self.maps.get(url)
        if data is None:
            data = self.maps[url] = map_file(url)
            while len(self.maps) > self.keep_maps:
                old_url, old = self.maps.popitem(last=False)
                self.rows.pop(old_url, None)  # a live view of a map keeps it from being closed
                if not isinstance(old, bytes):
                    old.close()
        self.maps.move_to_end(url)
        index = self.indexes.get(url)
        if index is None:
            index = self.indexes[url] = load_index(url, data) or scan_index(data)
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
        count = math.prod(shape)
        if url not in self.rows:
            self.rows[url] = _pixel_rows(data, shard.npy[:, 0] + shard.layout[0], count)
        rows = self.rows[url]
        if rows is not None and out.flags.c_contiguous:  # one copy for all of them (reshape is then a view)
            out.reshape(len(out), count)[slots[present]] = rows[indices[present]]
            return present
        flat, length = np.frombuffer(data, dtype=np.uint8), shard.layout[0]
        try:
            for slot, offset in zip(slots[present].tolist(), shard.npy[indices[present], 0].tolist()):
                out[slot] = flat[offset + length : offset + length + count].reshape(shape)
        finally:
            del flat  # a live view of a map keeps it from being closed
        return present

    def close(self) -> None:
        self.rows.clear()
        for data in self.maps.values():
            if not isinstance(data, bytes):
                data.close()
        self.maps.clear()
        self.indexes.clear()
