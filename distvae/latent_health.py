"""The latent's health over a run: the sorted KL-per-dimension picture, and the watch for posterior collapse.

Posterior collapse is the VAE's usual failure: the KL term wins, most latent dimensions carry nothing
(their posterior is the prior for every image), and the decoder draws the average face. The loss
keeps falling while it happens, so the trainer watches `val/active_units` instead: when fewer than
`log.collapse_share` of the latent dimensions are active for `log.collapse_validations` validations
in a row, it says so once in the log (and as a tracker alert), naming the figure and the knobs.
Validations before both warm-ups end (`loss.kl_warmup_steps`, `train.warmup_steps`) do not count: an
untrained encoder's means vary little over the data, which is not yet collapse. The streak is not kept
in checkpoints: a resumed run counts again from its first validation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


class CollapseWatch:
    def __init__(self, share: float, validations: int, latent_dim: int, from_step: int = 0):
        self.share, self.validations, self.latent_dim, self.from_step = share, validations, latent_dim, from_step
        self.streak = 0

    @property
    def floor(self) -> float:
        return self.share * self.latent_dim

    def add(self, step: int, active_units: float, kl: float) -> str | None:
        """One validation's active units and KL (nats per image); the warning when this one completes a streak."""
        if self.share <= 0 or step < self.from_step:
            return None
        self.streak = self.streak + 1 if active_units < self.floor else 0
        if self.streak != self.validations:
            return None
        return (f"posterior collapse: {active_units:.0f} of {self.latent_dim} latent dimensions active "
                f"(val/active_units, KL {kl:.3g} nats per image) for {self.streak} validations in a row, under "
                f"log.collapse_share={self.share:g} ({self.floor:.3g} dimensions). The KL term is winning: lower "
                f"loss.kl_weight, lengthen loss.kl_warmup_steps, set loss.free_bits (for example 0.1), or check "
                f"loss.reduction (mean needs a kl_weight C*H*W times smaller than sum; see loss.py)")


def kl_curve(kl_per_dim: np.ndarray, width: int = 480, height: int = 240) -> np.ndarray:
    """KL of each latent dimension, sorted from the largest, as bars: a uint8 (H, W, 3) picture.

    A healthy latent shows a long shoulder of dimensions in use; a collapsed one a few bars and a flat
    zero line (the title says how many dimensions carry more than 0.01 nats)."""
    # Non-finite KL (weights gone bad: the run is about to say so) draws as empty bars, never a crash.
    values = np.sort(np.nan_to_num(np.asarray(kl_per_dim, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0))[::-1]
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    left, top, right, bottom = 48, 24, width - 8, height - 20
    top_value = float(values[0]) if len(values) and values[0] > 0 else 1.0
    draw.text((left, 4), f"KL per latent dimension, sorted (nats/image); {int((values > 0.01).sum())} of "
                         f"{len(values)} above 0.01", fill="black", font=font)
    draw.text((2, top - 4), f"{top_value:.3g}", fill="black", font=font)
    draw.text((2, bottom - 8), "0", fill="black", font=font)
    draw.text((left, bottom + 4), "1", fill="black", font=font)
    draw.text((right - 24, bottom + 4), f"{len(values)}", fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    span = (right - left) / max(len(values), 1)
    for index, value in enumerate(values):
        bar = round((bottom - top) * max(float(value), 0.0) / top_value)
        if bar < 1:
            continue
        x0 = left + 1 + index * span
        draw.rectangle([x0, bottom - bar, max(x0, x0 + span - 1), bottom - 1], fill=(52, 101, 164))
    return np.asarray(picture)
