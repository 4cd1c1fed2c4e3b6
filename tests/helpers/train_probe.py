"""Runs distvae/train.py with test instruments switched on by environment variables (tests only).

    PROBE_DIR=...            each rank writes data-rank{r}.txt (a hash per batch) and
                             params-rank{r}-step{s}.txt (a hash of its weights at every checkpoint)
    PROBE_NAN_AT=RANK:STEP[:COUNT]  the model output on that rank is NaN for COUNT (default 1) optimizer steps
    PROBE_POISON_AT=STEP     after optimizer step STEP a weight becomes NaN (what a checkpoint must never hold)
    PROBE_KILL_IN_SAVE=STEP  SIGKILL this process while it writes checkpoint STEP, before its marker
"""

import hashlib
import os
import signal
import sys

import torch

import distvae.checkpoint as checkpoint
import distvae.model as model_module
import distvae.train as train
from distvae.stream import ShardStream

probe_dir = os.environ.get("PROBE_DIR")
rank = int(os.environ.get("RANK", "0"))


def tensor_hash(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if probe_dir:
    original_iter = ShardStream.__iter__

    def recording_iter(self):
        with open(os.path.join(probe_dir, f"data-rank{rank}.txt"), "a") as out:
            for batch in original_iter(self):
                if self.spec.train:
                    out.write(tensor_hash([batch.images]) + "\n")
                    out.flush()
                yield batch

    ShardStream.__iter__ = recording_iter
    original_save = checkpoint.Checkpointer.save

    def recording_save(self, step, model_state, *args, **kwargs):
        with open(os.path.join(probe_dir, f"params-rank{rank}-step{step}.txt"), "w") as out:
            out.write(tensor_hash(model_state.values()))
        return original_save(self, step, model_state, *args, **kwargs)

    checkpoint.Checkpointer.save = recording_save

if os.environ.get("PROBE_NAN_AT"):
    nan_rank, nan_step, nan_count = ([int(part) for part in os.environ["PROBE_NAN_AT"].split(":")] + [1])[:3]
    original_forward = model_module.ConvVAE.forward
    calls = {"count": 0}

    def poisoned_forward(self, *args, **kwargs):
        recon, mean, logvar = original_forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            calls["count"] += 1
            if rank == nan_rank and nan_step <= calls["count"] < nan_step + nan_count:
                recon = recon * float("nan")
        return recon, mean, logvar

    model_module.ConvVAE.forward = poisoned_forward

if os.environ.get("PROBE_POISON_AT"):
    poison_step = int(os.environ["PROBE_POISON_AT"])
    original_step = torch.optim.AdamW.step
    steps = {"count": 0}

    def poisoning_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        steps["count"] += 1
        if steps["count"] == poison_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    torch.optim.AdamW.step = poisoning_step

if os.environ.get("PROBE_KILL_IN_SAVE"):
    kill_step = int(os.environ["PROBE_KILL_IN_SAVE"])
    original_write_json = checkpoint._write_json

    def killing_write_json(path, data):
        if path.name == checkpoint.MARKER and data.get("step") == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        original_write_json(path, data)

    checkpoint._write_json = killing_write_json

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
