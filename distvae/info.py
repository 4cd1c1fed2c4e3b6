"""`distvae info --config NAME [overrides]`: size a model before launching it.

Prints every layer with its output shape and parameter count, the total parameter count and the
activation memory one image needs in a training forward pass: the bytes of the tensors autograd keeps
for backward, counted as they are saved (saved_bytes_per_image), for every arch and latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distvae.config import Config, ModelConfig
from distvae.model import build_model


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


def layer_table(cfg: ModelConfig) -> list[LayerRow]:
    """Run one image through the model built on the meta device: shapes only, no memory, no compute."""
    rows: list[LayerRow] = []
    with torch.device("meta"):
        model = build_model(cfg)
        image = torch.zeros(1, cfg.channels, cfg.resolution, cfg.resolution)
        cond = torch.zeros(1, cfg.cond_dim) if cfg.cond_dim else None
    hooks = [
        module.register_forward_hook(_recorder(rows, name))
        for name, module in model.named_modules()
        if not list(module.children())
    ]
    with torch.no_grad():
        model(image, cond)
    for hook in hooks:
        hook.remove()
    return rows


def _recorder(rows: list[LayerRow], name: str):
    def hook(module: nn.Module, inputs, output) -> None:
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(name, type(module).__name__, tuple(output.shape[1:]), params))

    return hook


def _saved_tensors(cfg: ModelConfig, device: str = "meta") -> tuple[dict, dict]:
    """One training forward of one image, recording what autograd saves for backward (parameters left out):
    ({stage index, or None outside the stages: {storage: tensor}}, {id: the input of each stage}). A stage is
    an nn.Sequential of the resnet arch (what train.activation_checkpointing recomputes). One storage saved by
    two operations (a tensor and a view of it) is one entry: real tensors keyed by address, meta tensors (which
    have none) by the tensor their view was taken from. Tensors are kept alive, so no id is reused."""
    with torch.device(device):
        model = build_model(cfg).train()
        image = torch.zeros(1, cfg.channels, cfg.resolution, cfg.resolution)
        cond = torch.zeros(1, cfg.cond_dim) if cfg.cond_dim else None
        eps = torch.zeros(1, model.latent_dim)
    parameters = {id(p) for p in model.parameters()}
    current: list[int] = []
    saved: dict[int | None, dict[int, torch.Tensor]] = {}
    inputs: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            base = tensor if tensor._base is None else tensor._base
            key = id(base) if device == "meta" else base.untyped_storage().data_ptr()
            saved.setdefault(current[-1] if current else None, {})[key] = tensor
        return tensor

    hooks = []
    stages = [layer for part in (model.encoder, model.decoder) for layer in part if isinstance(layer, nn.Sequential)]
    for index, stage in enumerate(stages):
        def enter(_module, args, index=index):
            current.append(index)
            inputs[id(args[0])] = args[0]

        def leave(*_) -> None:  # returns None: a forward hook's value would replace the stage's output
            current.pop()

        hooks += [stage.register_forward_pre_hook(enter), stage.register_forward_hook(leave)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(image, cond, eps)
    for hook in hooks:
        hook.remove()
    return saved, inputs


def _nbytes(tensors) -> int:
    return sum(tensor.untyped_storage().nbytes() for tensor in tensors)


def saved_bytes_per_image(cfg: ModelConfig, device: str = "meta") -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward of one image (fp32), parameters
    left out: what activation memory costs per image, for every arch, counted where it is saved (a residual
    block's inner activations are no module's output). On the meta device by default: no memory, no compute."""
    saved, _ = _saved_tensors(cfg, device)
    return _nbytes({key: tensor for group in saved.values() for key, tensor in group.items()}.values())


def checkpointed_bytes_per_image(cfg: ModelConfig) -> int:
    """About what saved_bytes_per_image becomes with train.activation_checkpointing: each stage (resnet) keeps
    only its input, and backward recomputes one stage at a time, so add the largest stage's own saved tensors."""
    saved, inputs = _saved_tensors(cfg)
    outside = saved.pop(None, {})
    kept = _nbytes(outside.values()) + _nbytes(t for key, t in inputs.items() if key not in outside)
    return kept + max((_nbytes(group.values()) for group in saved.values()), default=0)


def activation_bytes_per_image(rows: list[LayerRow], bytes_per_value: int) -> int:
    total = 0
    for row in rows:
        numel = 1
        for size in row.output_shape:
            numel *= size
        total += numel * bytes_per_value
    return total


def print_info(cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    rows, model = layer_table(cfg.model), cfg.model
    latent = f"latent {model.latent_dim}" if model.latent == "vector" else \
        f"spatial latent {model.latent_channels}x{model.resolution // 2 ** len(model.hiddens)}x" \
        f"{model.resolution // 2 ** len(model.hiddens)} ({model.latent_size} values)"
    arch = "plain" if model.arch == "plain" else f"resnet x{model.blocks_per_stage}" + (
        f", attention at {model.attention_resolution} px" if model.attention_resolution else "")
    table = Table(title=f"ConvVAE {arch}, {model.resolution}px, hiddens {model.hiddens}, {latent}")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output (C, H, W)")
    table.add_column("params", justify="right")
    for row in rows:
        table.add_row(row.name, row.kind, str(row.output_shape), f"{row.params:,}")
    console = Console()
    console.print(table)
    total = sum(row.params for row in rows)
    fp32 = saved_bytes_per_image(cfg.model)
    half = fp32 // 2  # autocast keeps the convolutions' inputs in bf16/fp16; the small fp32 bottleneck is ignored
    batch = cfg.data.batch_size
    print(f"parameters: {total:,} ({total * 4 / 2**20:.1f} MiB fp32; Adam state adds 2x)")
    print(
        f"activations per image: {fp32 / 2**20:.2f} MiB fp32, {half / 2**20:.2f} MiB bf16/fp16 autocast; "
        f"at data.batch_size={batch}: {fp32 * batch / 2**30:.2f} GiB fp32, {half * batch / 2**30:.2f} GiB autocast"
    )
    if model.arch == "resnet":
        kept = checkpointed_bytes_per_image(model)
        state = "on" if cfg.train.activation_checkpointing else "off"
        print(f"with train.activation_checkpointing=true (now {state}): about {kept / 2**20:.2f} MiB fp32 per image "
              f"({kept / fp32:.0%}), {kept * batch / 2**30:.2f} GiB fp32 at data.batch_size={batch}; each stage is "
              f"computed twice")
