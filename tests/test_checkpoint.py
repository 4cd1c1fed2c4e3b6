"""Checkpoint policy: naming, completion marker, keep-last-k, "latest", loading without code."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from distvae.checkpoint import Checkpointer, complete_checkpoints, load_tensors, resolve_checkpoint
from distvae.config import load_config
from distvae.errors import UserError
from distvae.runtime import StopFlag, check_launch
from distvae.train import lr_factor


def save(checkpointer: Checkpointer, step: int) -> None:
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpointer.save(step, model.state_dict(), optimizer.state_dict(), {"last_epoch": step}, {"note": "x"})


@pytest.fixture
def checkpointer(tmp_path):
    return Checkpointer(tmp_path / "checkpoints", every_steps=10, keep_last=3, rank=0, barrier=lambda: None)


def test_names_marker_and_keep_last(checkpointer):
    for step in (10, 20, 30, 40, 50):
        save(checkpointer, step)
    names = sorted(p.name for p in checkpointer.root.iterdir())
    assert names == ["step-00000030", "step-00000040", "step-00000050"]
    assert json.loads((checkpointer.root / "step-00000050" / "COMPLETE").read_text())["step"] == 50
    assert checkpointer.due(40) and not checkpointer.due(41)


def test_latest_ignores_incomplete_and_temporary_folders(checkpointer):
    save(checkpointer, 10)
    save(checkpointer, 20)
    (checkpointer.root / "step-00000030").mkdir()  # killed before its marker: not a checkpoint
    (checkpointer.root / ".tmp-step-00000040").mkdir()
    assert checkpointer.latest().name == "step-00000020"
    assert [step for step, _ in complete_checkpoints(checkpointer.root)] == [10, 20]
    assert resolve_checkpoint(checkpointer.root / "latest").name == "step-00000020"
    assert resolve_checkpoint(checkpointer.root.parent).name == "step-00000020"  # the run dir
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_checkpoint(checkpointer.root / "step-00000030")
    save(checkpointer, 50)
    assert not (checkpointer.root / ".tmp-step-00000040").exists()  # stray temp folders are cleaned up


def test_keep_last_never_below_two(tmp_path):
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep_last=1, rank=0, barrier=lambda: None)
    for step in (1, 2, 3):
        save(checkpointer, step)
    assert len(complete_checkpoints(tmp_path)) == 2


def test_files_load_without_unpickling_code(checkpointer):
    save(checkpointer, 10)
    folder = checkpointer.latest()
    assert set(load_file(folder / "model.safetensors")) == {"weight", "bias"}
    assert "state" in load_tensors(folder / "optimizer.pt")
    assert "cpu" in load_tensors(folder / "rng-rank00000.pt")
    json.loads((folder / "train_state.json").read_text())
    class Evil:  # noqa: E306
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, folder / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_tensors(folder / "optimizer.pt")


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config("tiny", ["train.max_steps=110", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.55)
    assert lr_factor(cfg, 110) == pytest.approx(0.1)
    constant = load_config("tiny", ["train.lr_schedule=constant", "train.warmup_steps=0"])
    assert lr_factor(constant, 500) == 1.0


def test_launch_trap_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2"):
        check_launch(num_processes=1)
    check_launch(num_processes=2)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(num_processes=1)


def test_stop_flag_records_the_signal():
    import os
    import signal

    flag = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        flag.install()
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal_name == "SIGUSR1"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
