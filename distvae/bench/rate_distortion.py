"""The rate-distortion numbers and picture of `distvae bench quality` (quality.py runs the trainings).

    curves = {arch: mean_curve(points, arch) for arch in ARCHS}
    rows = equal_rate_comparison(curves)            # (rate, PSNR plain, PSNR resnet) at interpolated equal rates
    text = verdict(rows_with_spread, spreads)       # which arch wins, by how much against the seed spread
    plot(points, Path("rate_distortion.png"))       # PSNR against log rate, drawn with PIL

Pure functions of the scored points: no training, no files but the PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = ("plain", "resnet")
COLOURS = {"plain": (31, 119, 180), "resnet": (214, 39, 40)}
PLOT_SIZE = (880, 560)
COMPARED_RATES = 4  # equal-rate comparisons, evenly spaced in log rate over the range both archs reach


@dataclass
class Point:
    """One trained and scored run."""

    arch: str
    kl_weight: float
    seed: int
    rate: float  # KL(q(z|x) || N(0, I)) in nats per image, test split
    psnr: float  # dB, the posterior mean decoded
    loss: float  # the training objective on the test split: squared error (sum) + kl_weight x KL, per image
    neg_elbo: float
    active_units: int
    train_seconds: float
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- the numbers


def interpolate_log_rate(rates: list[float], psnrs: list[float], rate: float) -> float | None:
    """PSNR at `rate` on the piecewise-linear curve through (log rate, PSNR); None outside the points' range."""
    pairs = sorted((math.log(r), p) for r, p in zip(rates, psnrs))
    if not pairs or rate <= 0:
        return None
    at, slack = math.log(rate), 1e-9  # an end of the range computed as exp(log(r)) may miss r by a rounding
    if at < pairs[0][0] - slack or at > pairs[-1][0] + slack:
        return None
    at = min(max(at, pairs[0][0]), pairs[-1][0])
    for (low, low_psnr), (high, high_psnr) in zip(pairs, pairs[1:]):
        if low <= at <= high:
            if high == low:
                return (low_psnr + high_psnr) / 2
            return low_psnr + (at - low) / (high - low) * (high_psnr - low_psnr)
    return pairs[0][1]  # a single point, asked at its own rate


def mean_curve(points: list[Point], arch: str) -> list[tuple[float, float]]:
    """(rate, PSNR) per kl_weight averaged over seeds: the geometric mean rate (a mean in log rate), the mean PSNR."""
    curve = []
    for kl_weight in sorted({point.kl_weight for point in points if point.arch == arch}):
        chosen = [point for point in points if point.arch == arch and point.kl_weight == kl_weight]
        log_rate = sum(math.log(max(point.rate, 1e-9)) for point in chosen) / len(chosen)
        curve.append((math.exp(log_rate), sum(point.psnr for point in chosen) / len(chosen)))
    return sorted(curve)


def equal_rate_comparison(curves: dict[str, list[tuple[float, float]]],
                          count: int = COMPARED_RATES) -> list[tuple[float, float, float]]:
    """(rate, PSNR plain, PSNR resnet) at `count` rates evenly spaced in log rate over the range both curves span."""
    if any(not curves.get(arch) for arch in ARCHS):
        return []
    low = max(curves[arch][0][0] for arch in ARCHS)
    high = min(curves[arch][-1][0] for arch in ARCHS)
    if low > high:
        return []
    if count == 1 or math.isclose(low, high):
        rates = [math.sqrt(low * high)]
    else:
        rates = [low, *(math.exp(math.log(low) + index * (math.log(high) - math.log(low)) / (count - 1))
                        for index in range(1, count - 1)), high]
    rows = []
    for rate in rates:
        psnr = {arch: interpolate_log_rate([r for r, _ in curves[arch]], [p for _, p in curves[arch]], rate)
                for arch in ARCHS}
        rows.append((rate, psnr["plain"], psnr["resnet"]))
    return rows


def seed_spreads(points: list[Point]) -> list[tuple[str, float, float]]:
    """(arch, kl_weight, max - min PSNR over its seeds) for every arch and kl_weight trained with 2+ seeds."""
    spreads = []
    for arch in ARCHS:
        for kl_weight in sorted({point.kl_weight for point in points if point.arch == arch}):
            psnrs = [point.psnr for point in points if point.arch == arch and point.kl_weight == kl_weight]
            if len(psnrs) >= 2:
                spreads.append((arch, kl_weight, max(psnrs) - min(psnrs)))
    return spreads


def local_spread(points: list[Point], rate: float) -> float | None:
    """The seed spread an equal-rate value rests on: the largest PSNR gap between seeds among the kl_weights of
    either arch whose seed-mean rates bracket `rate` (the points it is interpolated from); None with one seed."""
    spread_of = {(arch, kl): spread for arch, kl, spread in seed_spreads(points)}
    found = []
    for arch in ARCHS:
        rates = []
        for kl_weight in {point.kl_weight for point in points if point.arch == arch}:
            chosen = [point for point in points if point.arch == arch and point.kl_weight == kl_weight]
            log_rate = sum(math.log(max(point.rate, 1e-9)) for point in chosen) / len(chosen)
            rates.append((log_rate, spread_of.get((arch, kl_weight))))
        rates.sort(key=lambda item: item[0])
        at, slack = math.log(rate), 1e-9
        below = [item for item in rates if item[0] <= at + slack][-1:]
        above = [item for item in rates if item[0] >= at - slack][:1]
        found += [spread for _, spread in below + above]
    if not found or any(spread is None for spread in found):
        return None
    return max(found)


def _rates_text(rates: list[float]) -> str:
    words = [f"{rate:.3g}" for rate in rates]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def verdict(rows: list[tuple[float, float, float, float | None]], spreads: list[float]) -> str:
    """Which arch wins at equal rate. rows: (rate, PSNR plain, PSNR resnet, the seed spread there, see
    local_spread); spreads: every arch and kl_weight's gap between seeds, for the summary. An arch wins at a rate
    when its PSNR there is higher by more than the seed spread there; it wins outright when it does at every rate."""
    if not rows:
        return ("No rate is reached by both archs, so there is no equal-rate comparison: widen the kl_weights until "
                "the two curves overlap.")
    diffs = [resnet - plain for _, plain, resnet, _ in rows]
    mean = sum(diffs) / len(diffs)
    span = (f"over {rows[0][0]:.3g}-{rows[-1][0]:.3g} nats per image, PSNR(resnet) - PSNR(plain) is "
            f"{min(diffs):+.2f} to {max(diffs):+.2f} dB (mean {mean:+.2f} dB)")
    if not spreads or any(row[3] is None for row in rows):
        ahead = "resnet" if mean > 0 else "plain"
        return (f"At equal rate, {span}: the {ahead} arch is ahead, but with one seed per point the seed spread is "
                f"unknown, so no winner can be called.")
    summary = (f"Seed spreads over all points: largest {max(spreads):.2f} dB, mean "
               f"{sum(spreads) / len(spreads):.2f} dB ({len(spreads)} pairs of seeds).")
    beyond: dict[str, list] = {arch: [] for arch in ARCHS}  # the rates where an arch leads by more than the spread
    within = []
    for row, diff in zip(rows, diffs):
        if abs(diff) > row[3]:
            beyond["resnet" if diff > 0 else "plain"].append((row, diff))
        else:
            within.append((row, diff))
    winners = [arch for arch in ARCHS if beyond[arch]]
    if not winners:
        return (f"Neither arch wins on these machines: {span}, within the seed spread of the runs each value is "
                f"interpolated from at every compared rate (up to {max(row[3] for row in rows):.2f} dB there). "
                f"{summary}")
    if len(winners) == 2:
        return (f"Neither arch wins everywhere: {span}; beyond the seed spread the resnet arch is ahead at "
                f"{_rates_text([row[0] for row, _ in beyond['resnet']])} and the plain arch at "
                f"{_rates_text([row[0] for row, _ in beyond['plain']])} nats per image. {summary}")
    winner = winners[0]
    won = beyond[winner]
    margins = [abs(diff) for _, diff in won]
    largest_there = max(row[3] for row, _ in won)
    if not within:
        return (f"The {winner} arch wins on these machines: {span}; at every compared rate its lead is more than "
                f"the seed spread of the runs the value is interpolated from (at most {largest_there:.2f} dB). "
                f"{summary}")
    return (f"The {winner} arch wins at {_rates_text([row[0] for row, _ in won])} nats per image, by "
            f"{min(margins):.2f}-{max(margins):.2f} dB, more than the seed spread of the runs each value is "
            f"interpolated from (at most {largest_there:.2f} dB); at {_rates_text([row[0] for row, _ in within])} "
            f"nats per image the difference ({', '.join(f'{diff:+.2f}' for _, diff in within)} dB) is within the "
            f"seed spread there ({', '.join(f'{row[3]:.2f}' for row, _ in within)} dB). Overall, {span}. {summary}")


def analyse(points: list[Point]) -> dict:
    """Everything the report derives from the points: seed-mean curves, the equal-rate rows, spreads, verdict."""
    curves = {arch: mean_curve(points, arch) for arch in ARCHS}
    rows = [(rate, plain, resnet, local_spread(points, rate)) for rate, plain, resnet in equal_rate_comparison(curves)]
    spreads = seed_spreads(points)
    return {"curves": curves, "comparison": rows, "seed_spreads": spreads,
            "verdict": verdict(rows, [spread for _, _, spread in spreads])}


def held_out_loss(neg_elbo: float, kl_weight: float, values: int) -> float:
    """The training objective (sum reduction: squared error + kl_weight x KL, per image) from evaluate's -ELBO.
    loss.py's Gaussian decoder has variance kl_weight / 2, so -ELBO = SE / kl_weight + D/2 log(pi kl_weight) + KL."""
    return kl_weight * (neg_elbo - 0.5 * values * math.log(math.pi * kl_weight))


# ---------------------------------------------------------------------------------------------- the picture


def plot(points: list[Point], path: Path, labels: dict[str, str] | None = None,
         size: tuple[int, int] = PLOT_SIZE) -> None:
    """PSNR against rate (log axis): every point (circle: the first seed, square: the others) and each arch's
    seed-mean curve, drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 24, 48, 70
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow before 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    rates = [max(point.rate, 1e-3) for point in points]
    psnrs = [point.psnr for point in points]
    low_x, high_x = math.log10(min(rates)), math.log10(max(rates))
    pad_x = max(0.06 * (high_x - low_x), 0.05)
    low_x, high_x = low_x - pad_x, high_x + pad_x
    low_y, high_y = min(psnrs), max(psnrs)
    pad_y = max(0.08 * (high_y - low_y), 0.25)
    low_y, high_y = low_y - pad_y, high_y + pad_y

    def at(rate: float, psnr: float) -> tuple[float, float]:
        x = left + (math.log10(max(rate, 1e-3)) - low_x) / (high_x - low_x) * (width - left - right)
        y = height - bottom - (psnr - low_y) / (high_y - low_y) * (height - top - bottom)
        return x, y

    grey, dark = (225, 225, 225), (40, 40, 40)
    for decade in range(math.floor(low_x), math.ceil(high_x) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**decade
            if low_x <= math.log10(value) <= high_x:
                x, _ = at(value, low_y)
                draw.line([(x, top), (x, height - bottom)], fill=grey)
                draw.text((x, height - bottom + 6), f"{value:g}", fill=dark, font=font, anchor="mt")
    step = _nice_step((high_y - low_y) / 6)
    tick = math.ceil(low_y / step) * step
    while tick <= high_y:
        _, y = at(1.0, tick)
        draw.line([(left, y), (width - right, y)], fill=grey)
        draw.text((left - 6, y), f"{tick:g}", fill=dark, font=font, anchor="rm")
        tick += step
    draw.rectangle([(left, top), (width - right, height - bottom)], outline=dark)
    draw.text(((left + width - right) / 2, height - 22), "rate: KL in nats per image, log scale (held-out images)",
              fill=dark, font=font, anchor="mm")
    draw.text((left, top - 8), "PSNR (dB)", fill=dark, font=font, anchor="ls")
    draw.text((width - right, top - 8), "circles: first seed, squares: others; lines: seed means", fill=dark,
              font=font, anchor="rs")
    first_seed = min(point.seed for point in points)
    for arch in ARCHS:
        colour = COLOURS[arch]
        curve = mean_curve(points, arch)
        if len(curve) >= 2:
            draw.line([at(rate, psnr) for rate, psnr in curve], fill=colour, width=3)
        for point in (p for p in points if p.arch == arch):
            x, y = at(point.rate, point.psnr)
            box = [(x - 5, y - 5), (x + 5, y + 5)]
            if point.seed == first_seed:
                draw.ellipse(box, outline=colour, width=2)
            else:
                draw.rectangle(box, outline=colour, width=2)
    for index, arch in enumerate(ARCHS):
        y = top + 16 + 20 * index
        draw.line([(left + 12, y), (left + 40, y)], fill=COLOURS[arch], width=3)
        text = f"{arch}: {labels[arch]}" if labels and arch in labels else arch
        draw.text((left + 48, y), text, fill=dark, font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)


def _nice_step(raw: float) -> float:
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
