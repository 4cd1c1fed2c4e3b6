"""pipe: and http shards: the sequential reader, its manifests, and its workers across epochs."""

import functools
import http.server
import threading

import pytest
from test_stream import ids_of, make_stream, take, write_shards

from distvae.data.shards import resolve_shards
from distvae.errors import UserError


@pytest.fixture
def uneven(tmp_path):  # test_stream's shards of uneven sizes
    write_shards(tmp_path / "uneven", [37, 5, 61, 12, 29])
    return resolve_shards(str(tmp_path / "uneven" / "manifest.json"))


def test_pipe_and_http_give_the_same_batches(tmp_path):
    """Sequential sources read the same data in the same order; local files, read by the global plan,
    give the same samples over an epoch in another order."""
    files = write_shards(tmp_path / "web", [9, 14, 11])
    local = [ids_of(b) for b in take(make_stream(resolve_shards(",".join(files))), 8)]
    local_sequential = [ids_of(b) for b in take(make_stream(resolve_shards(",".join(files)), train=False), 8)]
    piped = [ids_of(b) for b in take(make_stream(resolve_shards(",".join(f"pipe:cat {f}" for f in files))), 8)]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "web"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        by_pattern = resolve_shards(base + "/toy-train-{000000..000002}.tar")
        assert [s.samples for s in by_pattern] == [9, 14, 11]  # counts from the manifest served beside them
        served = [ids_of(b) for b in take(make_stream(by_pattern), 8)]
        by_manifest = [ids_of(b) for b in take(make_stream(resolve_shards(base + "/manifest.json")), 8)]
    finally:
        server.shutdown()
    assert piped == served == by_manifest
    for order in (local, piped):  # one epoch: 8 batches of 4 of the 34 samples, none twice
        assert len(set(sum(order, []))) == 32 and set(sum(order, [])) <= set(range(34))
    assert local != piped  # the plan's order, not the shard-and-buffer order
    assert sum(local_sequential, []) == list(range(32))  # validation: in order


def test_a_piped_manifest_gives_every_shard_its_count_without_streaming_any(tmp_path, monkeypatch):
    """`pipe:CMD .../manifest.json`: the shards are the same command on each shard's name, the counts are the
    manifest's. Without it, every pipe: shard is streamed once at start-up to count its samples."""
    import distvae.data.shards as shards_module

    files = write_shards(tmp_path / "web", [9, 14, 11])
    listed = [ids_of(b) for b in take(make_stream(resolve_shards(",".join(f"pipe:cat {f}" for f in files))), 8)]
    monkeypatch.setattr(shards_module, "scan_shard", lambda url: pytest.fail(f"{url} was streamed to count it"))
    folder = tmp_path / "web"
    by_manifest = resolve_shards(f"pipe:dd status=none bs=1M if={folder}/manifest.json")
    assert [(s.url, s.samples) for s in by_manifest] == [
        (f"pipe:dd status=none bs=1M if={folder}/toy-train-00000{i}.tar", n) for i, n in enumerate([9, 14, 11])]
    assert [ids_of(b) for b in take(make_stream(by_manifest), 8)] == listed
    with pytest.raises(UserError, match="has no split 'val'"):
        resolve_shards(f"pipe:cat {folder}/manifest.json#val")
    with pytest.raises(UserError, match=f"cannot read shard manifest pipe:cat {folder}/missing/manifest.json"):
        resolve_shards(f"pipe:cat {folder}/missing/manifest.json")


def test_workers_live_across_epochs_on_pipe_shards_and_keep_the_per_epoch_order(uneven, monkeypatch):
    """pipe: shards: one DataLoader for the whole run too. Its batches are each epoch's logical workers taken in
    turn (what a DataLoader per epoch gave), across boundaries where 28 batches do not divide among 3 workers."""
    import distvae.data.stream as stream_module
    from distvae.data.batches import sequential_batches

    made = []
    original = stream_module.DataLoader
    monkeypatch.setattr(stream_module, "DataLoader", lambda *a, **k: made.append(1) or original(*a, **k))
    piped = resolve_shards(",".join(f"pipe:cat {shard.url}" for shard in uneven))
    stream = make_stream(piped, num_workers=3, batch_size=5, hflip=True)
    assert not stream.spec.planned and stream.batches_per_epoch == 28
    expected = []
    for epoch in range(3):
        logical = [list(sequential_batches(stream.spec, epoch, worker)) for worker in range(3)]
        expected += [logical[batch % 3][batch // 3]["images"].tolist() for batch in range(28)]
    assert [b.images.tolist() for b in take(stream, 3 * 28)] == expected
    assert len(made) == 1
    resumed = make_stream(piped, num_workers=3, batch_size=5, hflip=True)  # mid-epoch, then across two boundaries
    resumed.seek(0, 20)
    assert [b.images.tolist() for b in take(resumed, 60)] == expected[20:80]
    assert (resumed.epoch, resumed.batch) == (2, 24)
