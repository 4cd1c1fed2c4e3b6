"""The attribute rows a conditional run keeps in its checkpoints, and conditions drawn from them.

CelebA's 40 attributes are correlated (Male with Goatee, Bald never with Bangs, one hair colour at a
time), so a condition put together from independent marginals is often a face no photo shows. A
conditional run stores up to ROWS real attribute rows of its training split, spread evenly over it, in
every checkpoint (`attributes.safetensors`: uint8 rows, the names in its metadata). Sampling with
`--attr Smiling=1 --attr Eyeglasses=0` then draws whole rows among those that agree with what was
given, so the attributes not given follow their joint distribution given the ones that were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from distvae.data.seekable import SeekableShards
from distvae.data.shards import Shard, ShardError, is_seekable, read_manifest, read_samples
from distvae.errors import UserError

ROWS = 4096
FILE = "attributes.safetensors"


@dataclass
class AttributeTable:
    names: list[str]
    rows: np.ndarray  # uint8 (N, len(names)) of 0/1, real rows of the training split

    def save(self, folder: Path) -> None:
        save_file({"rows": np.ascontiguousarray(self.rows, dtype=np.uint8)}, str(folder / FILE),
                  metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, folder: Path) -> AttributeTable | None:
        path = folder / FILE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as handle:
            names = json.loads(handle.metadata()["names"])
        return cls(names, load_file(str(path))["rows"])

    def parse(self, given: list[str]) -> dict[int, int]:
        """`NAME=0|1` arguments -> {attribute index: value}; a one-line UserError naming what is wrong."""
        fixed = {}
        for text in given:
            name, sep, value = text.partition("=")
            if name not in self.names:
                raise UserError(f"--attr {text}: unknown attribute {name!r}; this model knows "
                                f"{', '.join(self.names)}")
            if not sep or value not in ("0", "1", "-1"):
                raise UserError(f"--attr {text}: give NAME=1 or NAME=0 (-1 also means absent, as in CelebA's lists)")
            fixed[self.names.index(name)] = int(value == "1")
        return fixed

    def draw(self, fixed: dict[int, int], count: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """(float (count, D) conditions, how many stored rows agree with `fixed`), rows drawn with replacement."""
        agree = np.ones(len(self.rows), dtype=bool)
        for column, value in fixed.items():
            agree &= self.rows[:, column] == value
        candidates = np.flatnonzero(agree)
        if len(candidates) == 0:
            wanted = ", ".join(f"{self.names[c]}={v}" for c, v in fixed.items())
            raise UserError(f"none of the {len(self.rows)} training attribute rows in the checkpoint has {wanted}: "
                            f"this combination was not seen in training; give fewer --attr")
        picks = torch.randint(len(candidates), (count,), generator=generator).numpy()
        return torch.from_numpy(self.rows[candidates[picks]].astype(np.float32)), len(candidates)


def attribute_names(spec: str, shards: list[Shard], cond_dim: int) -> list[str]:
    """The attribute names of the shards' manifest (`attr_names`), or attr_00, attr_01, ... without one."""
    names = read_manifest(spec, shards).get("attr_names") or []
    return list(names) if len(names) == cond_dim else [f"attr_{i:02d}" for i in range(cond_dim)]


def collect(spec: str, shards: list[Shard], cond_dim: int, limit: int = ROWS) -> AttributeTable:
    """Up to `limit` attribute rows at evenly spaced positions of the split (read by index where possible)."""
    total = sum(shard.samples for shard in shards)
    wanted = sorted({i * total // min(limit, total) for i in range(min(limit, total))}) if total else []
    starts = np.cumsum([0] + [shard.samples for shard in shards])
    rows, reader = [], SeekableShards(keep_maps=4, keep_indexes=len(shards))
    try:
        for number, shard in enumerate(shards):
            here = [p - int(starts[number]) for p in wanted if starts[number] <= p < starts[number + 1]]
            if not here:
                continue
            try:
                if is_seekable(shard.url):
                    samples = (reader.sample(shard.url, index) for index in here)
                else:
                    chosen = set(here)
                    samples = (s for _, s in read_samples(shard.url, here[0], here[-1] + 1, chosen.__contains__))
                for sample in samples:
                    attrs = json.loads(sample.get("json", b"{}")).get("attrs")
                    if attrs is not None and len(attrs) == cond_dim:
                        rows.append(attrs)
            except (OSError, ShardError, ValueError):
                continue  # a damaged shard gives fewer rows; the training stream reports it
    finally:
        reader.close()
    if not rows:
        raise UserError(f"model.cond_dim={cond_dim} but no sample of the training shards carries {cond_dim} "
                        f"attributes")
    return AttributeTable(attribute_names(spec, shards, cond_dim), np.asarray(rows, dtype=np.uint8))
