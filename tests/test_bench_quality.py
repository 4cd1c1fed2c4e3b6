"""`distvae bench quality`: the equal-rate interpolation, the verdict and the held-out loss against hand-made numbers
(fast), and the quick comparison end to end through the CLI (slow)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from distvae.bench.quality import QUICK
from distvae.bench.rate_distortion import (
    PLOT_SIZE,
    Point,
    analyse,
    equal_rate_comparison,
    held_out_loss,
    interpolate_log_rate,
    local_spread,
    mean_curve,
    plot,
    seed_spreads,
    verdict,
)


def point(arch: str, kl_weight: float, seed: int, rate: float, psnr: float) -> Point:
    return Point(arch=arch, kl_weight=kl_weight, seed=seed, rate=rate, psnr=psnr, loss=0.0, neg_elbo=0.0,
                 active_units=0, train_seconds=0.0)


def test_interpolation_is_linear_in_log_rate_and_none_outside():
    rates, psnrs = [1000.0, 10.0, 100.0], [23.0, 20.0, 22.0]  # unsorted on purpose
    assert interpolate_log_rate(rates, psnrs, 10.0) == pytest.approx(20.0)
    assert interpolate_log_rate(rates, psnrs, 100.0) == pytest.approx(22.0)
    assert interpolate_log_rate(rates, psnrs, math.sqrt(10 * 100)) == pytest.approx(21.0)  # halfway in log rate
    assert interpolate_log_rate(rates, psnrs, 10**2.5) == pytest.approx(22.5)
    assert interpolate_log_rate(rates, psnrs, 20.0) == pytest.approx(20.0 + 2.0 * math.log10(2.0))  # not 20.22
    assert interpolate_log_rate(rates, psnrs, 9.99) is None
    assert interpolate_log_rate(rates, psnrs, 1000.1) is None
    assert interpolate_log_rate([], [], 1.0) is None


def test_equal_rate_comparison_spans_only_the_rates_both_archs_reach():
    curves = {"plain": [(10.0, 20.0), (100.0, 22.0)], "resnet": [(20.0, 21.0), (200.0, 24.0)]}
    rows = equal_rate_comparison(curves, count=2)
    assert [rate for rate, _, _ in rows] == pytest.approx([20.0, 100.0])
    (_, plain_low, resnet_low), (_, plain_high, resnet_high) = rows
    assert plain_low == pytest.approx(20.0 + 2.0 * math.log10(2.0))
    assert resnet_low == pytest.approx(21.0)
    assert plain_high == pytest.approx(22.0)
    assert resnet_high == pytest.approx(21.0 + 3.0 * math.log10(5.0))
    assert len(equal_rate_comparison(curves)) == 4
    assert equal_rate_comparison({"plain": [(1.0, 20.0), (5.0, 21.0)], "resnet": [(6.0, 21.0), (9.0, 22.0)]}) == []
    assert equal_rate_comparison({"plain": [(1.0, 20.0)], "resnet": []}) == []


def test_seed_means_are_geometric_in_rate_and_the_spread_is_the_gap_between_seeds():
    points = [point("plain", 0.3, 0, 10.0, 20.0), point("plain", 0.3, 1, 40.0, 20.5),
              point("plain", 3.0, 0, 4.0, 18.0), point("plain", 3.0, 1, 4.0, 17.25),
              point("resnet", 0.3, 0, 30.0, 21.0)]
    assert mean_curve(points, "plain") == [pytest.approx((4.0, 17.625)), pytest.approx((20.0, 20.25))]
    assert mean_curve(points, "resnet") == [(pytest.approx(30.0), 21.0)]
    assert seed_spreads(points) == [("plain", 0.3, pytest.approx(0.5)), ("plain", 3.0, pytest.approx(0.75))]


def test_the_seed_spread_of_an_equal_rate_value_is_that_of_the_points_it_rests_on():
    points = [point("plain", 0.3, 0, 10.0, 20.0), point("plain", 0.3, 1, 10.0, 20.5),      # spread 0.5 at 10
              point("plain", 0.03, 0, 100.0, 22.0), point("plain", 0.03, 1, 100.0, 22.1),  # 0.1 at 100
              point("resnet", 0.3, 0, 12.0, 21.0), point("resnet", 0.3, 1, 12.0, 21.2),    # 0.2 at 12
              point("resnet", 0.03, 0, 50.0, 21.5), point("resnet", 0.03, 1, 50.0, 21.55),  # 0.05 at 50
              point("resnet", 0.003, 0, 400.0, 23.0), point("resnet", 0.003, 1, 400.0, 23.7)]  # 0.7 at 400
    assert local_spread(points, 12.0) == pytest.approx(0.5)  # plain 10-100 (0.5, 0.1), resnet at 12 (0.2)
    assert local_spread(points, 60.0) == pytest.approx(0.7)  # resnet 50-400 brings its 0.7
    assert local_spread(points, 30.0) == pytest.approx(0.5)
    assert local_spread(points[:2] + [point("plain", 0.03, 0, 100.0, 22.0)] + points[4:], 30.0) is None  # one seed
    rows = analyse(points)["comparison"]  # rates 12, 24.3, 49.3, 100: resnet's 400 only brackets the last
    assert [row[0] for row in rows] == pytest.approx([12.0, 12 * (100 / 12) ** (1 / 3), 12 * (100 / 12) ** (2 / 3),
                                                      100.0])
    assert [row[3] for row in rows] == pytest.approx([0.5, 0.5, 0.5, 0.7])
    assert rows[0][0] == pytest.approx(12.0) and rows[-1][0] == pytest.approx(100.0)


@pytest.mark.parametrize("rows, spreads, expected, numbers", [
    ([(10, 20.0, 21.0, 0.3), (100, 22.0, 23.2, 0.2)], [0.2, 0.3], "The resnet arch wins on these machines",
     ["+1.00 to +1.20", "at most 0.30 dB", "largest 0.30"]),
    ([(10, 21.0, 20.0, 0.2), (100, 23.0, 22.5, 0.1)], [0.2, 0.1], "The plain arch wins on these machines",
     ["-1.00 to -0.50", "mean -0.75"]),
    # within the spread at every rate: must say so
    ([(10, 20.0, 20.1, 0.3), (100, 22.0, 21.95, 0.3)], [0.3, 0.05], "Neither arch wins",
     ["within the seed spread", "up to 0.30 dB"]),
    # both rates favour resnet, but by less than the spread there: no win, whatever the mean
    ([(10, 20.0, 20.4, 0.45), (100, 22.0, 22.3, 0.35)], [0.45, 0.35], "Neither arch wins", ["+0.30 to +0.40"]),
    # beyond the spread at the low rate only: a win there, and the rest said to be within the spread
    ([(12, 19.7, 18.9, 0.19), (30, 20.65, 19.86, 0.19), (76, 21.35, 20.82, 0.79), (190, 21.44, 21.29, 0.79)],
     [0.79, 0.19, 0.02], "The plain arch wins at 12 and 30 nats per image",
     ["by 0.79-0.80 dB", "at 76 and 190 nats per image", "(-0.53, -0.15 dB) is within the seed spread there"]),
    ([(10, 20.0, 20.5, 0.1), (100, 22.0, 21.5, 0.1)], [0.1], "Neither arch wins everywhere",
     ["resnet arch is ahead at 10", "plain arch at 100"]),
    ([(10, 20.0, 21.0, None)], [], "no winner can be called", ["seed spread is unknown"]),
    ([], [0.1], "no equal-rate comparison", []),
])
def test_the_verdict_follows_the_numbers(rows, spreads, expected, numbers):
    text = verdict(rows, spreads)
    print(text)
    assert expected in text
    for number in numbers:
        assert number in text
    winner = re.search(r"The (\w+) arch wins on these machines", text)
    if winner:  # an outright win is said only when every compared rate beats the seed spread there
        sign = 1 if winner.group(1) == "resnet" else -1
        assert all(sign * (resnet - plain) > spread for _, plain, resnet, spread in rows)


def test_held_out_loss_is_the_training_objective_recovered_from_the_negative_elbo():
    from distvae.config import LossConfig
    from distvae.loss import kl_divergence, negative_elbo

    generator = torch.Generator().manual_seed(3)
    print("seed 3")
    target = torch.rand(4, 3, 8, 8, generator=generator)
    recon = torch.rand(4, 3, 8, 8, generator=generator)
    mean, logvar = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    for kl_weight in (0.03, 1.0, 3.0):
        neg = negative_elbo(recon, target, mean, logvar, LossConfig(kl_weight=kl_weight, reduction="sum"))
        objective = (recon - target).square().flatten(1).sum(1) + kl_weight * kl_divergence(mean, logvar)
        assert held_out_loss(neg.double().mean().item(), kl_weight, 3 * 8 * 8) == \
            pytest.approx(objective.double().mean().item(), rel=1e-5)


def test_the_plot_is_a_png_of_the_planned_size(tmp_path):
    points = [point(arch, kl, seed, rate * (1.1 if seed else 1.0), psnr + 0.1 * seed)
              for arch, shift in (("plain", 0.0), ("resnet", 0.4)) for seed in (0, 1)
              for kl, rate, psnr in ((0.03, 200.0, 21.0 + shift), (0.3, 50.0, 20.0 + shift), (3.0, 8.0, 17.0))]
    out = tmp_path / "figures" / "rd.png"
    plot(points, out, {"plain": "a plain model", "resnet": "a resnet"})
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == PLOT_SIZE and image.mode == "RGB"
        colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert {(31, 119, 180), (214, 39, 40)} <= colours  # both archs drawn


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path):
    """`distvae bench quality --quick`: trains every point with the real trainer, scores it, writes it all down."""
    print(f"seeds {QUICK.seeds}, kl_weights {QUICK.kl_weights}, {QUICK.steps} steps")
    out, figures = tmp_path / "QUALITY.md", tmp_path / "quality.json"
    command = [sys.executable, "-m", "distvae", "bench", "quality", "--quick", "--out", str(out), "--json",
               str(figures)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    report = json.loads(figures.read_text())
    markdown = out.read_text()
    points = report["points"]
    assert len(points) == 2 * len(QUICK.kl_weights) * len(QUICK.seeds)
    for row in points:
        assert row["rate"] > 0 and 5 < row["psnr"] < 60 and math.isfinite(row["loss"])
        line = (f"| {row['arch']} | {row['kl_weight']:g} | {row['seed']} | {row['rate']:.2f} | {row['psnr']:.2f} | "
                f"{row['loss']:.2f} |")
        assert line in markdown, line
    assert report["verdict"] in markdown and "CPU only, synthetic data" in markdown
    assert f"{report['timing']['ratio']:.2f}x the plain step time" in markdown
    assert "(docs/quality/rate_distortion.png)" in markdown
    with Image.open(tmp_path / "docs" / "quality" / "rate_distortion.png") as image:
        assert image.format == "PNG" and image.size == PLOT_SIZE
    for arch, name in report["grids"].items():
        grid = tmp_path / "docs" / "quality" / name
        assert f"(docs/quality/{name})" in markdown
        assert grid.stat().st_size < 150_000, f"{arch}: {grid.stat().st_size} bytes"
        with Image.open(grid) as image:
            assert image.format == "PNG" and image.size[0] > image.size[1]
    # --render writes the same markdown from the JSON, without training
    again = tmp_path / "again.md"
    rendered = subprocess.run([sys.executable, "-m", "distvae.bench.quality", "--render", str(figures), "--out",
                               str(again)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert again.read_text() == markdown
