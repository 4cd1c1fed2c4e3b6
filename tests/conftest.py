"""Shared fixtures: one small synthetic face set per test session, packed as the trainer reads it."""

from pathlib import Path

import pytest

from distvae.data.pack import pack
from distvae.data.synth import make_synthetic_celeba

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    return make_synthetic_celeba(tmp_path_factory.mktemp("synth") / "celeba", n=640, seed=0, progress=False)


@pytest.fixture(scope="session")
def jpeg_shards(synth_root, tmp_path_factory) -> Path:
    """Original JPEG bytes, 100 per shard: returns the manifest path."""
    out = tmp_path_factory.mktemp("jpeg") / "shards"
    pack(synth_root, out, name="synth", shard_size=100, progress=False)
    return out / "manifest.json"


@pytest.fixture(scope="session")
def npy32_shards(synth_root, tmp_path_factory) -> Path:
    """Pre-resized to 32 px (the tiny config's resolution), 100 per shard: returns the manifest path."""
    out = tmp_path_factory.mktemp("npy32") / "shards"
    pack(synth_root, out, name="synth", resolution=32, shard_size=100, progress=False)
    return out / "manifest.json"
