"""`distvae info --config NAME [overrides]`: size a model before launching it.

Prints every layer with its output shape and parameter count, the total parameter count and the
activation memory one image needs in a training forward pass (what autograd keeps for backward).
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

    rows = layer_table(cfg.model)
    table = Table(title=f"ConvVAE {cfg.model.resolution}px, hiddens {cfg.model.hiddens}, latent {cfg.model.latent_dim}")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output (C, H, W)")
    table.add_column("params", justify="right")
    for row in rows:
        table.add_row(row.name, row.kind, str(row.output_shape), f"{row.params:,}")
    console = Console()
    console.print(table)
    total = sum(row.params for row in rows)
    fp32 = activation_bytes_per_image(rows, 4)
    half = activation_bytes_per_image(rows, 2)
    batch = cfg.data.batch_size
    print(f"parameters: {total:,} ({total * 4 / 2**20:.1f} MiB fp32; Adam state adds 2x)")
    print(
        f"activations per image: {fp32 / 2**20:.2f} MiB fp32, {half / 2**20:.2f} MiB bf16/fp16 autocast; "
        f"at data.batch_size={batch}: {fp32 * batch / 2**30:.2f} GiB fp32, {half * batch / 2**30:.2f} GiB autocast"
    )
