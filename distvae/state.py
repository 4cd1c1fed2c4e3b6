"""The resume state, and what a resumed run may change.

    state = TrainState(step=1200, samples_seen=..., data=stream.state_dict(), dataset=fingerprint(shards), ...)
    checkpointer.save(..., state.to_json())
    state, notes = TrainState.from_json(load_train_state(folder))     # older formats: converted, with a notice
    notes += check_resume(saved_config, cfg, reset_data=False)       # UserError for a refused change

A checkpoint's train_state.json is a TrainState: the step, samples seen, non-finite steps so far, the
data position (the stream's own state: the epoch and the sample where its next global batch starts),
the tracker run id, a content fingerprint of the training shards, the global batch, the anchor of a
learning-rate schedule changed on an earlier resume, and the resolved config.

On resume every config key is one of:
- SAFE: applied from the next step (each change is logged in one line). The learning rate is
  rescaled; a changed schedule continues from the lr the run had reached (no jump, see
  Schedule); workers, world size and per-rank batch at the same global batch keep the exact position.
- AT A COST: the global batch. The data continues at the same sample of the epoch; the steps from there
  hold other samples than the run that never stopped.
- DATA: the seed, the dataset (its fingerprint), the loss, crop, flips and shuffle. Refused with a
  one-line error, unless --reset-data: then the data starts at the next epoch of the new plan.
- MODEL: refused always (the saved weights would not fit).
A key in none of these lists is refused: a new config key must be declared here to be changeable.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields

from distvae.config import Config, config_from_dict
from distvae.data.shards import Shard
from distvae.errors import UserError

FORMAT = 2

SAFE = {
    "run.dir", "run.name", "run.lock_stale_s",
    "data.train_shards",  # paths may move: the dataset fingerprint decides whether the data is the same
    "data.val_shards", "data.batch_size", "data.num_workers", "data.cache", "data.max_bad_fraction", "data.bad_window",
    "data.read_timeout_s",
    "train.lr", "train.max_steps", "train.warmup_steps", "train.lr_schedule", "train.min_lr_ratio",
    "train.weight_decay", "train.beta1", "train.beta2", "train.grad_clip",
    "train.mixed_precision", "train.compile", "train.channels_last", "train.sync_bn", "train.deterministic",
    "train.activation_checkpointing",  # the same gradients bit for bit (test_model), another memory-time trade
    "train.max_bad_steps",
    "train.collective_timeout_s", "train.val_every_steps", "train.val_batches",
    "train.ema_decay", "train.ema_warmup", "train.ema_every_steps",  # the average goes on with the new setting
    "checkpoint.every_steps", "checkpoint.keep_last",
    "log.tracker", "log.project", "log.every_steps", "log.image_every_steps", "log.collapse_share",
    "log.collapse_validations",
}
AT_A_COST = {"data.global_batch", "train.grad_accum_steps"}  # judged together, as the global batch
DATA = {"run.seed", "data.crop", "data.hflip", "data.shuffle_block", "data.shuffle_buffer", "loss.*"}
MODEL = {"model.*"}
SCHEDULE = ("train.max_steps", "train.warmup_steps", "train.lr_schedule", "train.min_lr_ratio")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def kind_of(key: str) -> str | None:
    """safe, cost, data or model for a dotted config key; None when it is not declared."""
    wildcard = key.split(".", 1)[0] + ".*"
    for kind, keys in (("safe", SAFE), ("cost", AT_A_COST), ("data", DATA), ("model", MODEL)):
        if key in keys or wildcard in keys:
            return kind
    return None


def fingerprint(shards: list[Shard]) -> str:
    """A content fingerprint of the training shards, in their listed order, never their paths.

    With manifest checksums for every shard: "sha256:" over (samples, checksum) of each. Otherwise a
    weaker "counts:" over the sample counts and crops alone (what can be known without reading every shard).
    """
    weak = hashlib.sha256()
    for shard in shards:
        weak.update(f"{shard.samples} {shard.cropped or ''}\n".encode())
    if all(shard.sha256 for shard in shards):
        strong = hashlib.sha256()
        for shard in shards:
            strong.update(f"{shard.samples} {shard.cropped or ''} {shard.sha256}\n".encode())
        return f"sha256:{strong.hexdigest()[:32]} counts:{weak.hexdigest()[:32]}"
    return f"counts:{weak.hexdigest()[:32]}"


def same_dataset(saved: str, current: str) -> tuple[bool, str]:
    """(the same data?, a notice when it could only be checked partly)."""
    if not saved:
        return True, "the checkpoint records no dataset fingerprint: the shards are not checked against it"
    parts = lambda text: dict(part.split(":", 1) for part in text.split())  # noqa: E731
    old, new = parts(saved), parts(current)
    if "sha256" in old and "sha256" in new:
        return old["sha256"] == new["sha256"], ""
    same = old.get("counts") == new.get("counts")
    return same, "" if not same else "the shards carry no manifest checksums: only their sample counts are checked"


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    bad_steps: int = 0
    data: dict = field(default_factory=dict)  # ShardStream.state_dict()
    tracker_run_id: str = ""
    dataset: str = ""  # fingerprint(shards)
    global_batch: int = 0
    schedule: dict | None = None  # Schedule.anchor: {"step", "factor"} after a schedule change on resume
    config: dict = field(default_factory=dict)
    ema_updates: int = 0  # EMA updates done (its warm-up counter); the EMA itself is ema.safetensors
    format: int = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> tuple[TrainState, list[str]]:
        """The state, and notices for what an older checkpoint could not say."""
        if data.get("format") == FORMAT:
            known = {f.name for f in fields(cls)}
            return cls(**{key: value for key, value in data.items() if key in known}), []
        # Format 1 (before the global data order): the same counters, the data position in its own terms.
        world, batch = data.get("world_size", 0), data.get("batch_size", 0)
        accum = data.get("config", {}).get("train", {}).get("grad_accum_steps", 1)
        state = cls(step=int(data["step"]), samples_seen=int(data.get("samples_seen", 0)),
                    bad_steps=int(data.get("bad_steps", 0)), data=dict(data.get("stream", {})),
                    tracker_run_id=data.get("tracker_run_id", ""), global_batch=world * batch * accum,
                    config=data.get("config", {}))
        return state, ["the checkpoint predates the global data order (train_state format 1): weights, optimizer "
                       "and step are kept"]


class Schedule:
    """The lr factor of each step (LambdaLR's lambda): linear warm-up, then constant or cosine to min_lr_ratio.

    After a resume that changed the schedule, `anchor` = {"step": s, "factor": f} holds the factor the run
    had reached at step s, and from there the new schedule starts at f: it warms up from f to 1 when s is
    inside the new warm-up, then decays (cosine) or holds (constant) to its end, so the lr never jumps.
    """

    def __init__(self, cfg: Config, anchor: dict | None = None):
        self.cfg, self.anchor = cfg.train, anchor

    def __call__(self, step: int) -> float:
        train = self.cfg
        ratio = train.min_lr_ratio
        if self.anchor is None or step < self.anchor["step"]:
            if step < train.warmup_steps:
                return (step + 1) / train.warmup_steps
            if train.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
            return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        start, factor = int(self.anchor["step"]), float(self.anchor["factor"])
        if step < train.warmup_steps:  # still warming up under the new schedule: from where it was to 1
            return factor + (1.0 - factor) * (step - start) / max(1, train.warmup_steps - start)
        if train.warmup_steps > start:
            start, factor = train.warmup_steps, 1.0
        if train.lr_schedule == "constant":
            return factor
        progress = min(1.0, (step - start) / max(1, train.max_steps - start))
        return ratio + (factor - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def add_resume_arguments(parser) -> None:
    parser.add_argument("--reset-data", action="store_true",
                        help="resume the weights with another seed, dataset, loss, crop or shuffle: the data starts "
                             "at the next epoch of the new plan (without it, such changes are refused)")


def check_resume(saved: dict, cfg: Config, reset_data: bool = False) -> list[str]:
    """The changes from the saved config, one line each; UserError for the first one that is refused."""
    old, new = _flat(config_from_dict(saved).to_dict()), _flat(cfg.to_dict())
    present = _flat(saved)  # keys an older checkpoint did not have are not compared
    notes, refused_data = [], []
    for key in sorted(new):
        if key not in present or old.get(key, present[key]) == new[key]:
            continue
        change = f"{key}: {old.get(key, present[key])!r} -> {new[key]!r}"
        kind = kind_of(key)
        if kind is None:
            raise UserError(f"{change} on resume, and {key} is not declared safe to change (distvae/state.py): "
                            f"set it back, or start a new run.dir")
        if kind == "model":
            raise UserError(f"{change}: the checkpoint holds another model; set {key} back or use another run.dir")
        if kind == "data":
            refused_data.append(change)
        elif kind == "safe" and key not in ("run.dir",):
            notes.append(change + _effect(key))
    if refused_data and not reset_data:
        raise UserError(f"{refused_data[0]} would change what the run trains on (data, seed or loss); set it back, "
                        f"or pass --reset-data to continue the weights on the new data from the next epoch")
    notes += [f"{change} (--reset-data)" for change in refused_data]
    return notes


def _effect(key: str) -> str:
    if key == "train.lr":
        return " (the schedule is rescaled from the next step)"
    if key in SCHEDULE:
        return " (the lr continues from its current value along the new schedule)"
    if key == "data.train_shards":
        return " (the same data: the fingerprint matches)"
    return ""
