import subprocess
import sys

import pytest
from conftest import REPO

from distvae.config import ConfigError, config_from_dict, load_config, named_configs, valid_keys

FIXED_KEYS = [
    "run.dir", "run.seed", "data.train_shards", "data.val_shards", "data.batch_size", "data.num_workers",
    "model.resolution", "model.hiddens", "model.latent_dim", "loss.kl_weight", "train.max_steps", "train.lr",
    "train.grad_clip", "train.mixed_precision", "checkpoint.every_steps", "checkpoint.keep_last",
    "log.tracker", "log.every_steps",
]


def test_documented_keys_exist():
    assert set(FIXED_KEYS) <= set(valid_keys())


@pytest.mark.parametrize("name", ["tiny", "reference", "celeba64", "celeba128", "celeba256", "celeba64_resnet",
                                  "celeba128_resnet", "celeba256_resnet", "celeba256_spatial"])
def test_named_configs_load(name):
    assert name in named_configs()
    cfg = load_config(name)
    assert cfg.model.resolution % 2 ** len(cfg.model.hiddens) == 0


@pytest.mark.parametrize("name", named_configs())
def test_the_readme_table_gives_each_named_configs_parameter_count(name):
    import torch

    from distvae.model import build_model

    with torch.device("meta"):
        count = sum(p.numel() for p in build_model(load_config(name).model).parameters())
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1 and f"| {count:,} |" in rows[0], (name, count, rows)


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  latent_dim: 64\ntrain:\n  lr: 0.01\n")
    cfg = load_config(str(path), ["model.latent_dim=256", "train.lr=1e-3", "model.hiddens=[8,16]",
                                  "model.resolution=32", "train.compile=true"])
    assert cfg.model.latent_dim == 256
    assert cfg.train.lr == pytest.approx(1e-3)  # '1e-3' is a string to YAML 1.1; the float field parses it
    assert cfg.model.hiddens == [8, 16]
    assert cfg.train.compile is True
    assert load_config(str(path)).train.lr == pytest.approx(0.01)


def test_reference_config_matches_the_tutorial():
    cfg = load_config("reference")
    assert (cfg.model.resolution, cfg.model.hiddens, cfg.model.latent_dim) == (64, [16, 32, 64, 128, 256], 128)
    assert (cfg.loss.kl_weight, cfg.loss.reduction, cfg.model.output) == (0.00025, "mean", "relu")
    assert (cfg.train.lr, cfg.data.batch_size, cfg.data.crop) == (0.005, 16, "168")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.latnt_dim=3"], "did you mean model.latent_dim?"),
        (["trian.lr=1"], "did you mean train.lr?"),
        (["data.batch_size=abc"], "data.batch_size='abc' is not a valid int"),
        (["train.lr=fast"], "train.lr='fast' is not a valid float"),
        (["train.mixed_precision=bf32"], "train.mixed_precision='bf32' is not allowed"),
        (["model.resolution=100"], "model.resolution=100 is not divisible by 2**len(model.hiddens)"),
        (["checkpoint.keep_last=1"], "checkpoint.keep_last=1 must be >= 2"),
        (["loss.recon=bce", "model.output=relu"], "loss.recon=bce needs model.output=sigmoid"),
        (["train.lr"], "must look like section.key=value"),
        (["log.tracker=mlflow"], "log.tracker='mlflow' is not allowed; choose one of wandb, tensorboard, none"),
        (["log.collapse_share=2"], "log.collapse_share=2.0 is a share of the latent dimensions"),
        (["loss.free_bits=-1"], "loss.free_bits=-1.0 must be >= 0.0"),
    ],
)
def test_config_errors_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", overrides)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  latnet_dim: 3\n")
    with pytest.raises(ConfigError, match="did you mean model.latent_dim"):
        load_config(str(path))


def test_unknown_named_config():
    with pytest.raises(ConfigError, match="did you mean tiny"):
        load_config("tinny")


def test_round_trip_through_dict():
    cfg = load_config("celeba128", ["run.seed=7"])
    assert config_from_dict(cfg.to_dict()) == cfg


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "distvae", *args], capture_output=True, text=True, timeout=120)


def test_cli_print_config_and_typo():
    result = run_cli("info", "--config", "tiny", "--print-config", "model.latent_dim=7")
    assert result.returncode == 0
    assert "latent_dim: 7" in result.stdout
    result = run_cli("info", "--config", "tiny", "model.latnt_dim=7")
    assert result.returncode == 2
    assert "did you mean model.latent_dim?" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_info_reports_parameters_and_memory():
    result = run_cli("info", "--config", "reference")
    assert result.returncode == 0, result.stderr
    assert "parameters: 1,183,283" in result.stdout
    assert "activations per image" in result.stdout


def test_cli_help_lists_commands():
    result = run_cli("--help")
    for command in ("train", "info", "synth", "pack", "bench"):
        assert command in result.stdout


def test_bare_no_stays_a_string(tmp_path):
    assert load_config("tiny", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(path)).train.mixed_precision == "no"
    assert load_config("tiny", ["data.val_shards="]).data.val_shards == ""
    assert load_config("tiny", ["data.hflip=true", "train.grad_clip=0"]).data.hflip is True
