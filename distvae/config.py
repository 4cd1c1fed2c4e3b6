"""One config tree for everything: defaults in code, a YAML file on top, dotted overrides on top of that.

    from distvae.config import load_config
    cfg = load_config("celeba128", ["model.latent_dim=256", "train.lr=1e-3"])

Named configs live in `distvae/configs/NAME.yaml`; a path to any YAML file works too. An unknown key, a
value of the wrong type or an impossible combination raises `ConfigError` with one line that names the
key (and the nearest valid key for typos) before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distvae.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(UserError, ValueError):
    """A user mistake in the config: the message is one line that says what to fix."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _at_least(key: str, value: float, minimum: float) -> None:
    if not math.isfinite(value):  # nan < minimum is False: without this, train.lr=nan would pass
        raise ConfigError(f"{key}={value} must be a finite number >= {minimum}")
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def _between(key: str, value: float, low: float, high: float) -> None:
    _at_least(key, value, low)
    if value > high:
        raise ConfigError(f"{key}={value} must be between {low} and {high}")


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: checkpoints, resolved config, samples, tracker files
    seed: int = 0  # seeds weight init, data order and the reparameterisation noise
    name: str = ""  # run name shown in trackers; empty = the last part of run.dir
    lock_stale_s: float = 300.0  # RUN_DIR/lock without a heartbeat for this long (seconds) may be taken over

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError("run.dir must not be empty")
        _at_least("run.lock_stale_s", self.lock_stale_s, 10.0)


@dataclass
class DataConfig:
    train_shards: str = "shards/synth/synth-train-{000000..000003}.tar"  # brace pattern, comma list or manifest.json
    val_shards: str = ""  # same forms as train_shards; empty = no validation
    batch_size: int = 64  # images per process per micro-step
    # Images per optimizer step, all ranks together; 0 = world_size x batch_size x train.grad_accum_steps.
    # When set, train.grad_accum_steps is derived from it. It alone decides which samples a step trains on.
    global_batch: int = 0
    # Decoding processes per rank; 0 = decode in the training process; auto = from this rank's cores and the
    # shard format (data/workers.py): 0 or 1 for pre-resized npy, a core each for JPEG.
    num_workers: str = "auto"
    # Training split in memory (data/cache.py): none = read the shards as training goes; host = decoded once
    # into host memory, each batch one gather; device = into GPU memory (host on CPU). The same batches as none.
    # auto = host for local pre-resized npy shards whose copies take under a quarter of the free memory, else none.
    cache: str = "auto"
    # auto = CelebA's 168 px centre crop for 178x218 images, else the centre square of the shorter side;
    # N = a centre N x N crop (torchvision CenterCrop); 0 = the shorter side. Pre-cropped shards are never cropped.
    crop: str = "auto"
    hflip: bool = False  # random horizontal flips (deterministic per sample, seed and epoch)
    shuffle_buffer: int = 1000  # pipe:/http shards only: samples held for shuffling within a worker; 0 = read order
    shuffle_block: int = 262144  # local shards: the epoch is shuffled in blocks of this many samples; 0 = whole epoch
    max_bad_fraction: float = 0.05  # stop (save, exit 1) when more of the last data.bad_window samples are unreadable
    bad_window: int = 2000  # samples, all ranks together, over which data.max_bad_fraction is measured
    read_timeout_s: float = 120.0  # a pipe: or http shard silent this long (seconds) is unreadable

    def __post_init__(self) -> None:
        _between("data.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        _at_least("data.bad_window", self.bad_window, 1)
        _at_least("data.read_timeout_s", self.read_timeout_s, 0.1)
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.global_batch", self.global_batch, 0)
        _at_least("data.shuffle_block", self.shuffle_block, 0)
        self.num_workers = str(self.num_workers).strip().lower()
        if self.num_workers != "auto" and not self.num_workers.isdigit():
            raise ConfigError(f"data.num_workers={self.num_workers!r} must be auto or a number of processes (0 = "
                              f"decode in the training process)")
        _choice("data.cache", self.cache, ("auto", "none", "host", "device"))
        self.crop = str(self.crop).strip().lower()
        if self.crop != "auto" and not self.crop.isdigit():
            raise ConfigError(f"data.crop={self.crop!r} must be auto or a size in pixels (0 = the shorter side)")
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 0)


@dataclass
class ModelConfig:
    resolution: int = 64  # image height and width in pixels; divisible by 2**len(model.hiddens)
    channels: int = 3  # 3 = RGB, 1 = grayscale
    hiddens: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # channels of each stride-2 stage
    latent_dim: int = 128  # size of z
    output: str = "sigmoid"  # decoder output activation: sigmoid | relu (the reference) | none
    norm: str = "batch"  # normalisation after each conv: batch | group | none
    cond_dim: int = 0  # length of the condition vector (40 = CelebA attributes); 0 = unconditional
    arch: str = "plain"  # plain = the tutorial's stride-2 conv stages | resnet = residual blocks, GroupNorm, SiLU
    blocks_per_stage: int = 2  # resnet: residual blocks at each resolution (>= 1)
    attention_resolution: int = 0  # resnet: self-attention where the feature map is this many pixels wide; 0 = none
    latent: str = "vector"  # vector = z of latent_dim values | spatial = latent_channels x (resolution / 2**stages)^2
    latent_channels: int = 4  # spatial latent: channels of z (model.latent_dim is then not used)

    @property
    def latent_size(self) -> int:
        """Values in one image's z: latent_dim, or latent_channels x bottom x bottom for a spatial latent."""
        if self.latent == "spatial":
            return self.latent_channels * (self.resolution // 2 ** len(self.hiddens)) ** 2
        return self.latent_dim

    def __post_init__(self) -> None:
        _at_least("model.resolution", self.resolution, 4)
        _choice("model.channels", str(self.channels), ("1", "3"))
        if not self.hiddens:
            raise ConfigError("model.hiddens must list at least one stage width, e.g. [32, 64, 128]")
        for width in self.hiddens:
            _at_least("model.hiddens", width, 1)
        _at_least("model.latent_dim", self.latent_dim, 1)
        _choice("model.output", self.output, ("sigmoid", "relu", "none"))
        _choice("model.norm", self.norm, ("batch", "group", "none"))
        _at_least("model.cond_dim", self.cond_dim, 0)
        stride = 2 ** len(self.hiddens)
        if self.resolution % stride:
            raise ConfigError(
                f"model.resolution={self.resolution} is not divisible by 2**len(model.hiddens)={stride}: "
                f"change model.resolution or the number of model.hiddens stages"
            )
        if self.norm == "group" and any(width % 8 for width in self.hiddens):
            raise ConfigError("model.norm=group needs every model.hiddens width divisible by 8")
        _choice("model.arch", self.arch, ("plain", "resnet"))
        _choice("model.latent", self.latent, ("vector", "spatial"))
        _at_least("model.latent_channels", self.latent_channels, 1)
        _at_least("model.attention_resolution", self.attention_resolution, 0)
        if self.arch == "resnet":
            _at_least("model.blocks_per_stage", self.blocks_per_stage, 1)
            if self.norm != "group":
                raise ConfigError(f"model.arch=resnet normalises with GroupNorm: set model.norm=group (not "
                                  f"{self.norm})")
        sides = [self.resolution // 2**stage for stage in range(1, len(self.hiddens) + 1)]
        if self.attention_resolution and self.arch != "resnet":
            raise ConfigError(f"model.attention_resolution={self.attention_resolution} needs model.arch=resnet "
                              f"(0 = none)")
        if self.attention_resolution and self.attention_resolution not in sides:
            raise ConfigError(f"model.attention_resolution={self.attention_resolution} is not a feature-map size of "
                              f"this model: choose one of {', '.join(map(str, sides))} (0 = none)")


@dataclass
class LossConfig:
    recon: str = "mse"  # reconstruction term: mse | bce (needs model.output=sigmoid)
    reduction: str = "sum"  # sum = summed over pixels, mean over images; mean = mean over all elements
    kl_weight: float = 1.0  # weight of the KL term (see loss.py for how it scales with reduction and resolution)
    kl_warmup_steps: int = 0  # KL weight rises linearly from 0 over this many optimizer steps
    free_bits: float = 0.0  # nats: floor on each latent dimension's KL in the objective (loss.py); 0 = off

    def __post_init__(self) -> None:
        _choice("loss.recon", self.recon, ("mse", "bce"))
        _choice("loss.reduction", self.reduction, ("sum", "mean"))
        _at_least("loss.kl_weight", self.kl_weight, 0.0)
        _at_least("loss.kl_warmup_steps", self.kl_warmup_steps, 0)
        _at_least("loss.free_bits", self.free_bits, 0.0)


@dataclass
class TrainConfig:
    max_steps: int = 10_000  # optimizer steps in the whole run
    lr: float = 1e-3  # peak learning rate (Adam)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW); 0 = plain Adam
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    lr_schedule: str = "cosine"  # cosine | constant, after the warm-up
    warmup_steps: int = 0  # linear LR warm-up in optimizer steps
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"  # no | bf16 | fp16 autocast; weights stay fp32
    compile: bool = False  # torch.compile the model (slow first step, faster after)
    channels_last: bool = True  # NHWC memory format for convolutions: the layout, not the maths (1.3x on CPU here)
    sync_bn: bool = False  # SyncBatchNorm across ranks instead of per-rank batch statistics
    # Recompute each resnet stage in backward instead of keeping its activations (model.arch=resnet only)
    activation_checkpointing: bool = False
    # Deterministic kernels, no TF32, no cudnn.benchmark (backend.py): exact resume on GPUs needs it; slower.
    deterministic: bool = False
    max_bad_steps: int = 20  # stop after this many consecutive non-finite steps (fp16 scaler back-offs do not count)
    collective_timeout_s: float = 1800.0  # a rank waiting this long (seconds) in a collective fails instead of hanging
    val_every_steps: int = 500  # validation interval in steps; 0 = only at the end
    val_batches: int = 0  # cap on validation batches per rank; 0 = the whole split
    # EMA of the weights (0 = off), updated after each applied step; validation, samples and export use it.
    ema_decay: float = 0.0
    ema_warmup: bool = True  # the n-th update uses min(ema_decay, n / (n + 9)): early weights fade out fast
    ema_every_steps: int = 1  # update the EMA every this many optimizer steps (large models)

    def __post_init__(self) -> None:
        _at_least("train.max_steps", self.max_steps, 1)
        _between("train.ema_decay", self.ema_decay, 0.0, 0.999999)
        _at_least("train.ema_every_steps", self.ema_every_steps, 1)
        _at_least("train.lr", self.lr, 0.0)
        _between("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _between("train.beta1", self.beta1, 0.0, 1.0)
        _between("train.beta2", self.beta2, 0.0, 1.0)
        _at_least("train.collective_timeout_s", self.collective_timeout_s, 1.0)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _choice("train.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} is more than train.max_steps="
                              f"{self.max_steps}, so the learning rate would never reach train.lr: set "
                              f"train.warmup_steps to at most {self.max_steps}")
        _at_least("train.grad_clip", self.grad_clip, 0.0)
        _at_least("train.grad_accum_steps", self.grad_accum_steps, 1)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _at_least("train.max_bad_steps", self.max_bad_steps, 1)
        _at_least("train.val_every_steps", self.val_every_steps, 0)
        _at_least("train.val_batches", self.val_batches, 0)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # save interval in optimizer steps (also saved at the end and on a stop signal)
    keep_last: int = 3  # complete checkpoints kept; never fewer than 2

    def __post_init__(self) -> None:
        _at_least("checkpoint.every_steps", self.every_steps, 1)
        if self.keep_last < 2:
            raise ConfigError(
                f"checkpoint.keep_last={self.keep_last} must be >= 2 so a crash while saving never leaves no checkpoint"
            )


@dataclass
class LogConfig:
    tracker: str = "none"  # wandb | tensorboard | none
    project: str = "distvae"  # wandb project
    every_steps: int = 50  # scalar logging interval (steps)
    image_every_steps: int = 1000  # sample grid and reconstruction interval (steps); 0 = never
    # Posterior-collapse warning (latent_health.py): fewer than this share of the latent dimensions active
    # for collapse_validations validations in a row; 0 = never warn.
    collapse_share: float = 0.1
    collapse_validations: int = 2

    def __post_init__(self) -> None:
        _choice("log.tracker", self.tracker, ("wandb", "tensorboard", "none"))
        _at_least("log.every_steps", self.every_steps, 1)
        _at_least("log.image_every_steps", self.image_every_steps, 0)
        _at_least("log.collapse_share", self.collapse_share, 0.0)
        if self.collapse_share > 1:
            raise ConfigError(f"log.collapse_share={self.collapse_share} is a share of the latent dimensions: "
                              f"between 0 (never warn) and 1")
        _at_least("log.collapse_validations", self.collapse_validations, 1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.loss.recon == "bce" and self.model.output != "sigmoid":
            raise ConfigError("loss.recon=bce needs model.output=sigmoid (BCE is defined for outputs in [0, 1])")
        if self.train.activation_checkpointing and self.model.arch != "resnet":
            # The plain arch's stages end in BatchNorm by default, and recomputing a BatchNorm layer updates its
            # running statistics twice.
            raise ConfigError("train.activation_checkpointing=true recomputes resnet stages (GroupNorm): it needs "
                              "model.arch=resnet")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def valid_keys() -> list[str]:
    keys = []
    for section, section_cls in _section_types(Config).items():
        keys += [f"{section}.{name}" for name in _section_types(section_cls)]
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; valid sections: {', '.join(_section_types(Config))}"
    return ConfigError(f"unknown config key {key}{hint}")


def _coerce(key: str, value, kind):
    """Turn a YAML or command-line value into the field's type, or say which key is wrong."""
    bad = ConfigError(f"{key}={value!r} is not a valid {getattr(kind, '__name__', kind)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise bad from None
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if kind is str:
        if isinstance(value, (dict, list)):
            raise bad
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` as False: `mixed_precision: no` means "no"
            return "yes" if value else "no"
        return "" if value is None else str(value)
    if typing.get_origin(kind) is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [part for part in value.strip("[]").replace(" ", "").split(",") if part]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(key, item, item_kind) for item in value]
    raise bad


def _merge(tree: dict, updates: dict, origin: str) -> None:
    """Merge {section: {key: value}} into tree, checking every key and type."""
    sections = _section_types(Config)
    for section, values in updates.items():
        if section not in sections:
            raise _unknown_key(str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"{section} in {origin} must be a mapping of keys, got {values!r}")
        fields = _section_types(sections[section])
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in fields:
                raise _unknown_key(key)
            tree[section][name] = _coerce(key, value, fields[name])


def parse_override(text: str) -> tuple[str, str]:
    """`section.key=value` -> (key, raw text); the field's type decides how the text is read."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    return key.strip().lstrip("-"), raw.strip()


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name} does not exist")
        return path
    named = CONFIG_DIR / f"{name}.yaml"
    if not named.is_file():
        names = named_configs()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"no config named {name!r}; {hint}choose one of {', '.join(names)} or pass a YAML path")
    return named


def named_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def build_config(tree: dict) -> Config:
    try:
        sections = {name: cls(**tree[name]) for name, cls in _section_types(Config).items()}
    except TypeError as error:  # a field a hand-built dict left out
        raise ConfigError(str(error)) from None
    return Config(**sections)


def load_config(name: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML (a named config or a path) <- dotted overrides, checked as a whole."""
    tree = _defaults_tree()
    if name:
        path = resolve_config_path(name)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections such as model: and train:")
        _merge(tree, data, str(path))
    for text in overrides:
        key, value = parse_override(text)
        section, _, name_ = key.partition(".")
        if not name_:
            raise _unknown_key(key)
        _merge(tree, {section: {name_: value}}, "the command line")
    return build_config(tree)


def _defaults_tree() -> dict:
    """The defaults as a dict, built without validation so a YAML file can fix a default that needs company."""
    tree = {}
    for section, cls in _section_types(Config).items():
        tree[section] = {}
        for spec in dataclasses.fields(cls):
            if spec.default is not dataclasses.MISSING:
                tree[section][spec.name] = spec.default
            else:
                tree[section][spec.name] = spec.default_factory()
    return tree


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config saved with to_dict() (for example inside a checkpoint), checking it again."""
    full = _defaults_tree()
    _merge(full, tree, "the saved config")
    return build_config(full)


def add_config_arguments(parser) -> None:
    """The config flags every config-driven command shares (train, info, and later sample/evaluate)."""
    parser.add_argument("--config", default=None, help=f"named config ({', '.join(named_configs())}) or a YAML path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)
