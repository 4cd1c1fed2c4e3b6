"""Image-quality figures of `distvae evaluate`: SSIM per image, and FID of reconstructions and of decoder samples.

    weights = inception_weights(args.fid_weights)        # None: skip FID and print missing_weights_message()
    fid = FID(weights=weights, device=device)            # or FID(feature=net): any net of images -> (B, F)
    fid.update(images, recon); fid.update_samples(samples)    # floats (B, C, H, W) in [0, 1]
    fid.compute()     # {"fid_recon", "fid_samples", "fid_images"}; fid_note(count, fid.dims) warns on few images

Both FIDs are torchmetrics' FrechetInceptionDistance against the same real images, whose features are computed once.
Under torch.distributed, compute() sums the feature statistics over all processes itself: every rank must call it.
Inception weights are only ever read from a local file (never downloaded); torch-fidelity's cache is looked at too.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from distvae.errors import UserError

FULL_RANK_IMAGES = 2048  # Inception's pool features: FID needs more real images than this for a full-rank covariance
INCEPTION_FILE = Path(urlparse(URL_INCEPTION_V3).path).name  # weights-inception-2015-12-05-6726825d.pth


def ssim_per_image(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of each pair of float (B, C, H, W) images in [0, 1]: Gaussian window 11, sigma 1.5."""
    return structural_similarity_index_measure(recon.float(), images.float(), data_range=1.0, reduction="none")


def cached_inception_weights() -> Path:
    """Where torch-fidelity keeps the FID Inception it downloads: torch.hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights(path: str | None) -> Path | None:
    """The Inception weights file FID will use: `path`, else torch-fidelity's cached one, else None."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--fid-weights {path}: no such file (give torch-fidelity's {INCEPTION_FILE})")
        return Path(path)
    cached = cached_inception_weights()
    return cached if cached.is_file() else None


def missing_weights_message() -> str:
    return (f"FID skipped: no Inception weights at {cached_inception_weights()}, and distvae never downloads them; "
            f"copy {INCEPTION_FILE} there or pass --fid-weights PATH")


def fid_note(count: int, dims: int) -> str | None:
    """One line when `count` images cannot give a full-rank covariance of `dims` features, else None."""
    if count > dims:
        return None
    return (f"FID over {count} images of {dims} features: the covariance is not full rank (needs more than {dims} "
            f"images), so FID is biased and unreliable; raise --fid-images")


class FID:
    """FID of the real images against their reconstructions, and against decoder samples.

    `feature` maps float images (B, C, H, W) in [0, 1] to (B, F) features and may say F in `num_features`, as
    torchmetrics reads it; None: torchmetrics' 2048-feature Inception from the local file `weights`.
    """

    def __init__(self, feature: torch.nn.Module | None = None, weights: Path | None = None, device="cpu"):
        self.feature = (_inception(weights) if feature is None else feature).eval().to(device)
        self.dims = _feature_dims(self.feature, device)
        self.recon = FrechetInceptionDistance(feature=_Given(self.dims)).to(device)
        self.samples = FrechetInceptionDistance(feature=_Given(self.dims)).to(device)
        for metric in (self.recon, self.samples):
            # An empty update fixes the output dtype, so a process that sees no images can still join compute().
            metric.update(torch.zeros(0, self.dims, dtype=torch.float64, device=device), real=True)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature(images.float()).double()

    def update(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Add real images and their reconstructions, float (B, C, H, W) in [0, 1]."""
        real = self._features(images)
        self.recon.update(real, real=True)
        self.samples.update(real, real=True)
        self.recon.update(self._features(recon), real=False)

    def update_samples(self, samples: torch.Tensor) -> None:
        """Add decoder samples, float (B, C, H, W) in [0, 1]."""
        self.samples.update(self._features(samples), real=False)

    def compute(self) -> dict:
        """FIDs over everything added, on every process: None where fewer than 2 images of a set were added."""
        with self.samples.sync_context():  # the counts over all processes, so every rank takes the same branch
            real = int(self.samples.real_features_num_samples)
            samples = int(self.samples.fake_features_num_samples)
        return {
            "fid_recon": float(self.recon.compute()) if real >= 2 else None,
            "fid_samples": float(self.samples.compute()) if real >= 2 and samples >= 2 else None,
            "fid_images": real,
        }


def _inception(weights: Path | None) -> torch.nn.Module:
    if weights is None:  # torch-fidelity would download them
        raise UserError(missing_weights_message())
    try:
        torch.load(weights, map_location="cpu", weights_only=True)  # torch-fidelity loads with weights_only=False
        # antialias=False: torch-fidelity's TF1 resize to 299, so the figures compare with the original FID's
        inception = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights),
                                       antialias=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:  # not plain tensors; cut short; other keys
        raise UserError(f"Inception weights {weights} are not torch-fidelity's {INCEPTION_FILE} as plain tensors "
                        f"({type(error).__name__})") from error
    return _InceptionInput(inception)


def _feature_dims(feature: torch.nn.Module, device) -> int:
    """F as torchmetrics finds it: `num_features`, else the width of the features of one 299x299 image."""
    if hasattr(feature, "num_features"):
        return int(feature.num_features)
    with torch.no_grad():
        return int(feature(torch.rand(1, 3, 299, 299, device=device)).shape[-1])


class _Given(torch.nn.Module):
    """The feature network of a FrechetInceptionDistance that is handed features already computed."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _InceptionInput(torch.nn.Module):
    """Floats (B, C, H, W) in [0, 1] -> the uint8 RGB images Inception takes (it resizes them itself)."""

    num_features = 2048  # its pool features, the ones FID uses

    def __init__(self, inception: torch.nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale: the RGB Inception was trained on
        # Rounded, not truncated as torchmetrics' normalize=True does, so 8-bit inputs come back exactly.
        return self.inception((images.clamp(0, 1) * 255).round().to(torch.uint8))
