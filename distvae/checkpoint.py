"""Checkpoint policy and files. The training loop only asks `due(step)`, calls `save(...)` and `load(...)`.

Layout of `RUN_DIR/checkpoints/step-00001000/`:

    model.safetensors     the unwrapped model's state_dict, buffers included (BatchNorm statistics)
    ema.safetensors       the EMA of the weights (same keys), only with train.ema_decay > 0
    attributes.safetensors  real attribute rows of the training split, only for conditional models
    optimizer.pt          optimizer state (tensors and numbers: torch.load(weights_only=True))
    scheduler.pt          LR scheduler state (numbers)
    scaler.pt             fp16 GradScaler state, only with train.mixed_precision=fp16
    rng-rank00000.pt      torch RNG states of each rank
    train_state.json      step, samples seen, stream position, tracker run id, the resolved config
    COMPLETE              written last: a folder without it is not a checkpoint

Writing happens in `.tmp-step-00001000/`, renamed to its final name after COMPLETE is on disk, so a
kill at any moment leaves either the previous checkpoints untouched or a stray `.tmp-*` folder that
the next save removes. The newest `checkpoint.keep_last` complete checkpoints are kept (at least 2).
"latest" means the complete checkpoint with the highest step. Nothing here unpickles code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distvae.attributes import AttributeTable
from distvae.errors import UserError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    _fsync_path(path)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole: a reader (a batch script, a resumed run) sees the old text or the new, never a part."""
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("step") is not None
    except ValueError:
        return False


def complete_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; the step comes from the marker."""
    found = []
    if checkpoint_root.is_dir():
        for folder in checkpoint_root.iterdir():
            if _STEP_DIR.match(folder.name) and is_complete(folder):
                found.append((json.loads((folder / MARKER).read_text())["step"], folder))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from what a user types: the folder, `.../checkpoints/latest`, a run dir."""
    path = Path(path)
    if path.name == "latest":
        root = path.parent
    elif (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    elif is_complete(path):
        return path
    elif path.is_dir() and complete_checkpoints(path):
        root = path
    else:
        raise UserError(f"{path} is not a complete checkpoint (no {MARKER} marker) or a folder of checkpoints")
    found = complete_checkpoints(root)
    if not found:
        raise UserError(f"no complete checkpoint under {root}")
    return found[-1][1]


@dataclass
class Checkpointer:
    root: Path  # RUN_DIR/checkpoints
    every_steps: int
    keep_last: int
    rank: int
    barrier: Callable[[], None]  # every rank must call save(); the barrier keeps them in step
    attributes: AttributeTable | None = None  # written into every checkpoint (rank 0 holds it)

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict,
        scheduler_state: dict,
        train_state: dict,
        scaler_state: dict | None = None,
        ema_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write a checkpoint for `step` from every rank; returns its final folder."""
        final = self.root / step_dir_name(step)
        temporary = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            temporary.mkdir()
        self.barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, temporary / f"rng-rank{self.rank:05d}.pt")
        if self.rank == 0:
            save_file({name: tensor.detach().contiguous().cpu() for name, tensor in model_state.items()},
                      temporary / "model.safetensors")
            torch.save(optimizer_state, temporary / "optimizer.pt")
            torch.save(scheduler_state, temporary / "scheduler.pt")
            if scaler_state is not None:
                torch.save(scaler_state, temporary / "scaler.pt")
            if ema_state is not None:
                save_file({name: tensor.detach().contiguous().cpu() for name, tensor in ema_state.items()},
                          temporary / "ema.safetensors")
            if self.attributes is not None:
                self.attributes.save(temporary)
            _write_json(temporary / "train_state.json", {**train_state, "step": step})
        self.barrier()
        if self.rank == 0:
            for written in temporary.iterdir():
                _fsync_path(written)
            _write_json(temporary / MARKER, {"step": step, "time": time.time()})
            if final.exists():  # the same step saved again after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(temporary, final)
            _fsync_path(self.root)
            for _, old in complete_checkpoints(self.root)[: -max(2, self.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final


def load_train_state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def load_model_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def load_ema_state(folder: Path) -> dict[str, torch.Tensor] | None:
    path = folder / "ema.safetensors"
    return load_file(path) if path.exists() else None


def load_tensors(path: Path) -> dict:
    """Optimizer, scheduler, scaler and RNG files: plain tensors and numbers, never code."""
    return torch.load(path, map_location="cpu", weights_only=True)
