"""Runs distvae/train.py with test instruments switched on by environment variables (tests only).

    PROBE_DIR=...            each rank writes data-rank{r}.txt (a hash per batch), rows-rank{r}.txt
                             ("BATCH EPOCH POSITION HASH" of every image row it trains on), noise-rank{r}.txt
                             ("EPOCH POSITION HASH" of every noise row), lr-rank{r}.txt (the lr of each
                             optimizer step, repr),
                             params-rank{r}-step{s}.txt (a hash of its weights at every checkpoint),
                             state-rank{r}.txt ("CALL HASH" of all weights and buffers at the start of every
                             training forward) and conv-dtype-rank{r}.txt (the first conv's output dtype)
    PROBE_NAN_AT=RANK:CALL[:COUNT]  on that rank, the input of the first BatchNorm is multiplied by inf for
                             COUNT (default 1) training forwards from forward CALL on (1 = the first
                             micro-batch): an activation overflow, where it really arises
    PROBE_POISON_AT=STEP     after optimizer step STEP a weight becomes NaN (what a checkpoint must never hold)
    PROBE_KILL_IN_SAVE=STEP  SIGKILL this process while it writes checkpoint STEP, before its marker
    PROBE_STOP_AT=CALL       this process sends itself SIGUSR1 during training forward CALL
    PROBE_HANG_AT=RANK:CALL:SECONDS  that rank sleeps SECONDS in training forward CALL (a stuck rank)
    PROBE_SWAP=P1:P2         in epoch 0 the samples at global positions P1 and P2 trade places (a control)
    PROBE_ZERO_MEAN=1        the encoder's mean head outputs zeros (in training and validation): a latent
                             that carries nothing, posterior collapse by construction
"""

import hashlib
import os
import signal
import sys
import time

import numpy as np
import torch

import distvae.checkpoint as checkpoint
import distvae.data.plan as plan_module
import distvae.model as model_module
import distvae.step as step_module
import distvae.train as train
from distvae.data.stream import ShardStream

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
        with open(os.path.join(probe_dir, f"data-rank{rank}.txt"), "a") as out, \
                open(os.path.join(probe_dir, f"rows-rank{rank}.txt"), "a") as rows:
            for index, batch in enumerate(original_iter(self)):
                if self.spec.train:
                    out.write(tensor_hash([batch.images]) + "\n")
                    out.flush()
                    for position, image in zip(batch.positions.tolist(), batch.images):
                        rows.write(f"{index} {batch.epoch} {position} {tensor_hash([image])[:16]}\n")
                    rows.flush()
                yield batch

    ShardStream.__iter__ = recording_iter
    original_save = checkpoint.Checkpointer.save

    def recording_save(self, step, model_state, *args, **kwargs):
        with open(os.path.join(probe_dir, f"params-rank{rank}-step{step}.txt"), "w") as out:
            out.write(tensor_hash(model_state.values()))
        return original_save(self, step, model_state, *args, **kwargs)

    checkpoint.Checkpointer.save = recording_save
    original_noise = step_module.sample_noise

    def recording_noise(seed, epoch, positions, dim, device):
        eps = original_noise(seed, epoch, positions, dim, device)
        with open(os.path.join(probe_dir, f"noise-rank{rank}.txt"), "a") as out:
            for position, row in zip(positions.tolist(), eps):
                out.write(f"{epoch} {position} {tensor_hash([row])[:16]}\n")
        return eps

    step_module.sample_noise = recording_noise
    original_adamw_step = torch.optim.AdamW.step

    def recording_adamw_step(self, *args, **kwargs):
        with open(os.path.join(probe_dir, f"lr-rank{rank}.txt"), "a") as out:
            out.write(f"{self.param_groups[0]['lr']!r}\n")
        return original_adamw_step(self, *args, **kwargs)

    torch.optim.AdamW.step = recording_adamw_step

if os.environ.get("PROBE_SWAP"):
    swap = [int(part) for part in os.environ["PROBE_SWAP"].split(":")]
    original_samples = plan_module.GlobalPlan.samples

    def swapped_samples(self, epoch, positions):
        positions = np.asarray(positions, dtype=np.int64).copy()
        if epoch == 0:
            first, second = positions == swap[0], positions == swap[1]
            positions[first], positions[second] = swap[1], swap[0]
        return original_samples(self, epoch, positions)

    plan_module.GlobalPlan.samples = swapped_samples

forward_calls = {"count": 0}
original_init = model_module.ConvVAE.__init__


def instrumented_init(self, *args, **kwargs):
    """Hooks on the first conv and the first BatchNorm of every model the trainer builds."""
    original_init(self, *args, **kwargs)
    first_conv = next(m for m in self.modules() if isinstance(m, torch.nn.Conv2d))
    # The first BatchNorm (where an overflow meets running statistics), else the first norm or conv.
    first_norm = next((m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d)), None) or \
        next(m for m in self.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.Conv2d)))
    model = self

    def before_norm(module, inputs):
        if not (module.training and torch.is_grad_enabled()):
            return None
        forward_calls["count"] += 1
        call = forward_calls["count"]
        if probe_dir:  # nothing has changed a buffer yet in this forward: the state the step started from
            state = [*model.parameters(), *model.buffers()]
            with open(os.path.join(probe_dir, f"state-rank{rank}.txt"), "a") as out:
                out.write(f"{call} {tensor_hash(state)}\n")
        if nan_rank == rank and nan_call <= call < nan_call + nan_count:
            return (inputs[0] * float("inf"),)
        if stop_call == call:
            os.kill(os.getpid(), signal.SIGUSR1)
        if hang_rank == rank and hang_call == call:
            time.sleep(hang_seconds)
        return None

    def after_conv(module, inputs, output):
        path = os.path.join(probe_dir, f"conv-dtype-rank{rank}.txt")
        if module.training and not os.path.exists(path):
            with open(path, "w") as out:
                out.write(str(output.dtype))

    first_norm.register_forward_pre_hook(before_norm)
    if os.environ.get("PROBE_ZERO_MEAN"):
        self.mean_head.register_forward_hook(lambda module, inputs, output: output * 0.0)
    if probe_dir:
        first_conv.register_forward_hook(after_conv)


nan_rank, nan_call, nan_count = ([int(part) for part in os.environ.get("PROBE_NAN_AT", "-1:0").split(":")] + [1])[:3]
stop_call = int(os.environ.get("PROBE_STOP_AT", "0"))
hang_rank, hang_call, hang_seconds = (int(part) for part in os.environ.get("PROBE_HANG_AT", "-1:0:0").split(":"))
model_module.ConvVAE.__init__ = instrumented_init

if os.environ.get("PROBE_POISON_AT"):
    poison_step = int(os.environ["PROBE_POISON_AT"])
    original_step = torch.optim.AdamW.step
    steps = {"count": 0}

    def poisoning_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        steps["count"] += 1
        if steps["count"] == poison_step:
            with torch.no_grad():
                weight = self.param_groups[0]["params"][0]
                weight[(0,) * weight.dim()] = float("nan")  # in place, whatever the memory format
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
