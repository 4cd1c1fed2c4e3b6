"""The latent-health dashboard in whole runs: the collapse warning fires on a collapsed latent and not on a
healthy one, and TensorBoard holds the same scalars, histograms and images as wandb."""

import pytest
from conftest import REPO
from launching import base_args, command, run

# A validation every 6 steps; the watch counts those after both warm-ups (train.warmup_steps=5 in base_args).
DASHBOARD = ("train.val_every_steps=6", "log.image_every_steps=12", "log.collapse_validations=2")


def tensorboard_tags(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_a_collapsed_latent_warns_once_in_the_log_and_as_a_wandb_alert(npy32_shards, tmp_path):
    """The mean head forced to zero: every validation has 0 active units; the second one warns."""
    args = base_args(npy32_shards, tmp_path, *DASHBOARD, "loss.kl_warmup_steps=5", "log.tracker=wandb")
    result = run(command(args, probe=True), HOME=str(tmp_path), PROBE_ZERO_MEAN="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "active units 0" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if "WARNING posterior collapse" in line]
    print("\n".join(warnings))
    assert len(warnings) == 1 and "step 12/24" in warnings[0]  # after 2 validations in a row, once
    assert "0 of 32 latent dimensions active" in warnings[0] and "loss.kl_weight" in warnings[0]
    (records,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = records.read_bytes()
    assert b"posterior collapse" in data and b"0 of 32 latent dimensions active" in data  # the alert record


@pytest.mark.slow
def test_a_healthy_run_on_tensorboard_holds_every_key_and_grid_and_does_not_warn(npy32_shards, tmp_path):
    """An untrained encoder has no active unit (its means vary little): this run's KL warm-up of 20 steps covers
    that, as real runs' warm-ups of thousands of steps do, and the watch counts validations from step 24 on."""
    args = base_args(npy32_shards, tmp_path, *DASHBOARD, "loss.kl_warmup_steps=20", "train.max_steps=36",
                     "log.tracker=tensorboard")
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "posterior collapse" not in result.stdout
    active = [float(line.split("active units ")[1].split()[0]) for line in result.stdout.splitlines()
              if "validation: loss" in line]
    print(f"active units at steps 6, 12, ..., 36: {active}")
    assert len(active) == 6 and min(active[3:]) >= 0.1 * 32  # the control: healthy by the watch's own measure
    events = tensorboard_tags(tmp_path / "tensorboard")
    tags = events.Tags()
    for key in ("train/loss", "train/kl", "train/grad_norm", "train/images_per_second", "val/psnr", "val/neg_elbo",
                "val/active_units", "val/posterior_std", "val/decoder_min", "val/decoder_max"):
        assert key in tags["scalars"], key
    assert [event.value for event in events.Scalars("val/active_units")] == active
    assert "val/kl_per_dim" in tags["histograms"]
    assert [event.step for event in events.Histograms("val/kl_per_dim")] == [6, 12, 18, 24, 30, 36]
    assert {"samples", "reconstructions", "kl_per_dim_sorted"} <= set(tags["images"])
    assert [event.step for event in events.Images("samples")] == [12, 24, 36]
    readme = (REPO / "README.md").read_text()
    logs = readme[readme.index("### Logs"):readme.index("## Configs")]
    missing = [tag for tag in tags["scalars"] + tags["histograms"] + tags["images"] if f"`{tag}`" not in logs]
    assert not missing, f"logged but not in README's Logs table: {missing}"
    # Resumed, the same directory gains the new steps.
    args = [a if not a.startswith("train.max_steps") else "train.max_steps=42" for a in args]
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    events = tensorboard_tags(tmp_path / "tensorboard")
    assert [event.step for event in events.Scalars("val/active_units")][-1] == 42


def test_tensorboard_without_its_package_is_a_one_line_error(monkeypatch):
    import importlib.util

    from distvae.config import load_config
    from distvae.errors import UserError
    from distvae.train import start_processes

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"log.tracker=tensorboard needs the tensorboard package: pip install"):
        start_processes(load_config("tiny", ["log.tracker=tensorboard"]))


def test_the_tensorboard_config_is_flattened_to_what_hparams_take():
    from distvae.config import load_config
    from distvae.tracking import flat_hparams

    flat = flat_hparams(load_config("tiny", []).to_dict())
    assert flat["model.latent_dim"] == 32 and flat["log.tracker"] == "wandb"
    assert all(isinstance(value, (int, float, str, bool)) for value in flat.values())
    assert isinstance(flat["model.hiddens"], str)  # a list becomes its text
