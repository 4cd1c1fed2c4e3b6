"""SSIM and FID (quality.py): a small stand-in feature network, and Inception with random weights; no downloads."""

import datetime
import fractions
import multiprocessing

import pytest
import torch
import torch.distributed as dist
from torch_fidelity import feature_extractor_inceptionv3
from torchmetrics.image import FrechetInceptionDistance, StructuralSimilarityIndexMeasure

from distvae.errors import UserError
from distvae.quality import (
    FID,
    INCEPTION_FILE,
    fid_note,
    inception_weights,
    missing_weights_message,
    ssim_per_image,
)

SEED = 1203


def stand_in() -> torch.nn.Module:
    """A fixed random conv net pooled to 16 features: enough to tell image sets apart."""
    generator = torch.Generator().manual_seed(SEED)
    conv = torch.nn.Conv2d(3, 16, 3, stride=2)
    with torch.no_grad():
        for parameter in conv.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return torch.nn.Sequential(conv, torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def faces(count: int, seed: int) -> torch.Tensor:
    """(count, 3, 32, 32) in [0, 1]: a colour per image plus texture."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 3, 1, 1, generator=generator)
    return (0.7 * base + 0.3 * torch.rand(count, 3, 32, 32, generator=generator)).clamp(0, 1)


def brighter(images: torch.Tensor) -> torch.Tensor:
    return (images + 0.3).clamp(0, 1)


def test_ssim_is_one_for_identical_images_lower_with_noise_and_matches_torchmetrics():
    print(f"seed {SEED}")
    images = faces(6, SEED)
    assert torch.allclose(ssim_per_image(images, images), torch.ones(6), atol=1e-5)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(SEED))).clamp(0, 1)
    scores = ssim_per_image(noisy, images)
    print(f"SSIM with noise {scores.tolist()}")
    assert scores.shape == (6,) and scores.dtype == torch.float32 and (scores < 0.9).all()
    module = StructuralSimilarityIndexMeasure(data_range=1.0)
    module.update(noisy, images)
    assert scores.mean().item() == pytest.approx(module.compute().item(), rel=1e-6)


def test_fid_is_near_zero_for_the_same_set_and_large_for_a_brighter_one():
    print(f"seeds {SEED}, {SEED + 1}")
    real, redrawn = faces(400, SEED), faces(400, SEED + 1)
    same = FID(feature=stand_in())
    for part in real.split(100):
        same.update(part, part)
    same.update_samples(redrawn)  # the same kind of images, drawn again
    same = same.compute()
    moved = FID(feature=stand_in())
    moved.update(real, brighter(real))
    moved.update_samples(brighter(redrawn))
    moved = moved.compute()
    print(f"FID same set {same['fid_recon']:.2e}, redrawn {same['fid_samples']:.2e}, "
          f"brighter {moved['fid_recon']:.4f} and {moved['fid_samples']:.4f}")
    assert same["fid_images"] == moved["fid_images"] == 400
    # Identical float64 feature sums: only the rounding of the matrix square root is left.
    assert abs(same["fid_recon"]) < 1e-6 * moved["fid_recon"]
    assert moved["fid_samples"] > 20 * same["fid_samples"] > 0
    assert moved["fid_recon"] == pytest.approx(moved["fid_samples"], rel=0.2)  # both brighter by the same 0.3


def test_fid_equals_torchmetrics_on_the_images_and_samples_are_compared_with_the_real_images():
    print(f"seeds {SEED}, {SEED + 1}")
    real, redrawn = faces(300, SEED), faces(300, SEED + 1)
    fid = FID(feature=stand_in())
    assert fid.compute() == {"fid_recon": None, "fid_samples": None, "fid_images": 0}
    fid.update(real, real)
    assert fid.compute()["fid_samples"] is None  # no samples yet
    fid.update_samples(brighter(redrawn))
    result = fid.compute()
    reference = FrechetInceptionDistance(feature=stand_in(), normalize=True)
    reference.update(real, real=True)
    reference.update(brighter(redrawn), real=False)
    print(f"FID recon {result['fid_recon']:.2e}, samples {result['fid_samples']:.4f}, "
          f"torchmetrics {reference.compute().item():.4f}")
    assert abs(result["fid_recon"]) < 1e-6 * result["fid_samples"]  # the samples did not leak into the recon FID
    assert result["fid_samples"] == pytest.approx(reference.compute().item(), rel=1e-4)


def fid_on_rank(rank: int, rendezvous: str, results) -> None:
    """One of three gloo processes: 60 images and all samples, the other 40 images, and nothing."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=30))  # a rank that fails frees the others
    try:
        fid = FID(feature=stand_in())
        real = faces(100, SEED)
        if rank == 0:
            fid.update(real[:60], brighter(real[:60]))
            fid.update_samples(real[:60])
        elif rank == 1:
            fid.update(real[60:], brighter(real[60:]))
        results.put((rank, fid.compute()))
    except Exception as error:
        results.put((rank, f"{type(error).__name__}: {error}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_compute_adds_the_features_of_all_processes(tmp_path):
    print(f"seed {SEED}")
    real = faces(100, SEED)
    alone = FID(feature=stand_in())
    alone.update(real, brighter(real))
    alone.update_samples(real[:60])
    expected = alone.compute()
    context = multiprocessing.get_context("spawn")  # not fork: OpenMP threads of this process would deadlock it
    results = context.Queue()
    ranks = [context.Process(target=fid_on_rank, args=(rank, str(tmp_path / "rendezvous"), results), daemon=True)
             for rank in range(3)]
    for process in ranks:
        process.start()
    try:
        figures = dict(results.get(timeout=120) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=30)
            process.kill()
    print(f"one process {expected}, three {figures}")
    assert figures[0] == figures[1] == figures[2] == pytest.approx(expected, rel=1e-9)
    assert expected["fid_images"] == 100


def random_inception(path, monkeypatch) -> torch.nn.Module:
    """torch-fidelity's own Inception with random weights, saved at `path` too; nothing is downloaded."""
    extractor = feature_extractor_inceptionv3.FeatureExtractorInceptionV3
    with monkeypatch.context() as patch, torch.random.fork_rng():
        patch.setattr(feature_extractor_inceptionv3, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(extractor, "load_state_dict", lambda self, state: None)
        torch.manual_seed(SEED)
        inception = extractor("inception-v3-compat", ["2048"])
        for module in inception.modules():
            if isinstance(module, torch.nn.Conv2d):  # He init: features of size 1, not vanishing through 90 layers
                torch.nn.init.kaiming_normal_(module.weight)
    torch.save(inception.state_dict(), path)
    return inception


def test_inception_fid_reads_the_local_weights_never_downloads_and_sees_what_torch_fidelity_sees(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(feature_extractor_inceptionv3, "load_state_dict_from_url", no_download)
    with pytest.raises(UserError, match="--fid-weights"):
        FID()  # no feature and no weights: refused before torch-fidelity would download
    weights = tmp_path / INCEPTION_FILE
    reference = random_inception(weights, monkeypatch)
    fid = FID(weights=weights)
    print(f"seed {SEED}")
    levels = (faces(1, SEED) * 255).round()  # an 8-bit image, and a decoder's floats that round to it
    jitter = 0.9 * torch.rand(levels.shape, generator=torch.Generator().manual_seed(SEED)) - 0.45
    with torch.no_grad():
        ours = fid.feature((levels + jitter) / 255)
        theirs = reference(levels.to(torch.uint8))[0]  # torch-fidelity's own resize and network
    print(f"Inception features {ours[0, :4].tolist()}, torch-fidelity {theirs[0, :4].tolist()}")
    assert fid.dims == 2048 and ours.shape == (1, 2048)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max() and theirs.abs().max() > 1e-3


def test_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"weight": fractions.Fraction(1, 3)}, pickled)  # loading it would run pickle's constructors
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)  # plain tensors, but not Inception's
    for path in (pickled, garbage, other):
        with pytest.raises(UserError) as error:
            FID(weights=path)
        print(error.value)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_inception_weights_are_said_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a torch.hub.set_dir() elsewhere would win over TORCH_HOME
    assert inception_weights(None) is None
    message = missing_weights_message()
    print(message)
    assert "\n" not in message and "--fid-weights" in message and str(tmp_path / "torch" / "hub") in message
    with pytest.raises(UserError) as error:
        inception_weights("/nonexistent")
    print(error.value)
    assert "/nonexistent" in str(error.value) and "\n" not in str(error.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert inception_weights(None) == cached  # torch-fidelity's cache is used when it holds them
    assert inception_weights(str(cached)) == cached


def test_fid_note_warns_below_full_rank():
    note = fid_note(100, 2048)
    print(note)
    assert "not full rank" in note and "\n" not in note
    assert fid_note(2048, 2048) is not None and fid_note(3000, 2048) is None
