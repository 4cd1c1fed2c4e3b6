"""The crop belongs to the shards: pre-cropped shards are never cropped again, `data.crop=auto` picks
CelebA's 168 px crop only for CelebA's layout, and pack time and training time give the same pixels."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from distvae.config import ConfigError, DataConfig, load_config
from distvae.data.decode import crop_side
from distvae.data.pack import pack
from distvae.data.shards import read_samples, resolve_shards
from distvae.data.stream import ShardStream, describe_crop

# Training from original JPEG bytes decodes CelebA-size images at 1/2 scale in the DCT domain (PIL draft) from
# 64 px down; `pack --resolution` decodes them whole. Measured on the synthetic faces at 64 px: mean 0.73
# levels (of 255), 99% of values within 4. The README states these bounds.
DRAFT_MEAN, DRAFT_P99 = 1.5, 8


def first_batch(manifest_or_spec: str, resolution: int, batch_size: int = 8, **options):
    """The first batch as training reads it (the config's default crop unless one is given), and which
    (shard, index) each of its rows is."""
    options = {"crop": DataConfig().crop, **options}
    stream = ShardStream(resolve_shards(str(manifest_or_spec)), batch_size=batch_size, resolution=resolution,
                         shuffle_buffer=0, seed=0, **options)
    batch = next(iter(stream))
    return batch.images.numpy(), stream.locate(batch.epoch, batch.positions)


def sample_of(ref) -> dict:
    shard, index = ref
    return next(read_samples(shard.url, index, index + 1))[1]


def packed_pixels(refs) -> np.ndarray:
    """What the shards hold for these rows: each image decoded whole, without any crop or resize."""
    images = []
    for ref in refs:
        sample = sample_of(ref)
        ext = next(ext for ext in ("npy", "png", "jpg") if ext in sample)
        data = sample[ext]
        images.append(np.load(io.BytesIO(data)) if ext == "npy" else np.asarray(Image.open(io.BytesIO(data))))
    return np.stack(images)


@pytest.fixture(scope="module")
def packed256(synth_root, tmp_path_factory):
    """The synthetic CelebA set packed at 256 px as png and as jpg, all of train in one shard."""
    out = {}
    for image_format in ("png", "jpg"):
        folder = tmp_path_factory.mktemp(f"p256{image_format}") / "shards"
        pack(synth_root, folder, name="synth", resolution=256, image_format=image_format, shard_size=1000,
             progress=False)
        out[image_format] = folder
    return out


@pytest.mark.parametrize("image_format", ["png", "jpg"])
@pytest.mark.parametrize("crop", ["auto", "168"])
def test_shards_packed_at_256_train_on_their_packed_pixels(packed256, image_format, crop):
    folder = packed256[image_format]
    batch, refs = first_batch(folder / "manifest.json", 256, crop=crop)
    packed = packed_pixels(refs)
    # jpg: the same libjpeg decodes the packed file whole in both (no draft at R = the packed size): exact too.
    np.testing.assert_array_equal(batch, packed)
    # Control: what main did before, the central 168 px zoomed back to 256, is nowhere near.
    zoomed = np.stack([np.asarray(Image.fromarray(image).crop((44, 44, 212, 212)).resize((256, 256), Image.BILINEAR))
                       for image in packed])
    assert np.abs(zoomed.astype(int) - packed).mean() > 10


def test_pre_cropped_shards_without_their_manifest_are_not_cropped(packed256, tmp_path):
    alone = tmp_path / "alone.tar"  # copied away from manifest.json: each sample's JSON says it was cropped
    shutil.copy(packed256["png"] / "synth-train-000000.tar", alone)
    (shard,) = resolve_shards(str(alone))
    assert shard.cropped == "celeba-center-168"
    batch, refs = first_batch(alone, 256, crop="168")
    np.testing.assert_array_equal(batch, packed_pixels(refs))
    # At a lower model resolution the whole packed image is resized, row 0 included.
    batch, refs = first_batch(alone, 64, crop="168")
    expected = np.stack([np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))
                         for image in packed_pixels(refs)])
    np.testing.assert_array_equal(batch, expected)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """Six 1024x1024 images with a 128 px red frame: a centre crop of any size below 768 px loses all the red."""
    root = tmp_path_factory.mktemp("ffhq") / "images"
    root.mkdir()
    rng = np.random.default_rng(13)
    print("big_folder seed 13")
    for index in range(6):
        y, x = np.mgrid[0:1024, 0:1024]
        image = np.stack([x // 4, y // 4, (x + y) // 8 + index * 20], axis=-1) % 256
        image = (image + rng.integers(0, 8, image.shape)).clip(0, 255).astype(np.uint8)
        frame = np.zeros((1024, 1024), bool)
        frame[:128], frame[-128:], frame[:, :128], frame[:, -128:] = True, True, True, True
        image[frame] = (230, 20, 20)
        Image.fromarray(image).save(root / f"face{index}.{'png' if index % 2 else 'jpg'}", quality=95)
    return root


def test_a_folder_of_1024_px_images_trains_on_the_whole_image(big_folder, tmp_path):
    pack(big_folder, tmp_path / "shards", val_fraction=0, test_fraction=0, progress=False)  # original bytes
    shard = tmp_path / "shards" / "images-train-000000.tar"
    batch, refs = first_batch(tmp_path / "shards" / "manifest.json", 32, batch_size=6)
    sources = [json.loads(sample_of(ref)["json"])["src"] for ref in refs]
    assert len(sources) == len(batch) == 6 and sorted(sources) == sorted(
        json.loads(sample["json"])["src"] for _, sample in read_samples(str(shard)))
    for image, src in zip(batch, sources):
        whole = np.asarray(Image.open(big_folder / src).convert("RGB").resize((32, 32), Image.BILINEAR))
        # png: the very same resize; jpg: decoded at 1/8 scale in the DCT domain first.
        limit = 0 if src.endswith(".png") else 6
        assert np.abs(image.astype(int) - whole).mean() <= limit, src
        assert (image[:2, :, 0] > 150).all() and (image[:2, :, 1] < 100).all()  # the red frame is there, all of it
    # Control: main's old behaviour, data.crop=168 on these images, shows none of the frame.
    cropped, _ = first_batch(tmp_path / "shards" / "manifest.json", 32, batch_size=6, crop="168")
    assert not ((cropped[:, :2, :, 0] > 150) & (cropped[:, :2, :, 1] < 100)).any()


def test_celeba_layout_jpegs_still_get_the_tutorial_crop(jpeg_shards):
    batch, _ = first_batch(jpeg_shards, 64, train=False)  # validation order: shard 0 first
    shard = resolve_shards(str(jpeg_shards))[0]
    assert shard.cropped is None
    tutorial, shorter = [], []
    for _, sample in read_samples(shard.url, 0, 8):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        assert image.size == (178, 218)
        tutorial.append(np.asarray(TF.resize(TF.center_crop(image, 168), 64)))  # CenterCrop(168), Resize(64)
        shorter.append(np.asarray(TF.resize(TF.center_crop(image, 178), 64)))
    error = np.abs(batch.astype(int) - np.stack(tutorial)).mean()
    control = np.abs(batch.astype(int) - np.stack(shorter)).mean()
    assert error < 3.0, error  # the DCT-domain 1/2 decode differs by a few levels at most
    assert control > 3 * error and control > 5.0, (error, control)  # a wrong crop would be seen


@pytest.mark.parametrize("resolution", [32, 64])
def test_packed_at_r_and_cropped_in_training_agree(synth_root, tmp_path, resolution):
    """The same source, packed at R or cropped and resized in training, within the stated draft bounds."""
    pack(synth_root, tmp_path / "npy", name="synth", resolution=resolution, shard_size=100, progress=False)
    pack(synth_root, tmp_path / "jpg", name="synth", shard_size=100, progress=False)
    options = dict(batch_size=16, resolution=resolution, shuffle_buffer=64, seed=3, hflip=True, crop=DataConfig().crop)
    packed = ShardStream(resolve_shards(str(tmp_path / "npy" / "manifest.json")), **options)
    original = ShardStream(resolve_shards(str(tmp_path / "jpg" / "manifest.json")), **options)
    shifted = ShardStream(resolve_shards(str(tmp_path / "jpg" / "manifest.json")), **{**options, "crop": "0"})
    differences, control = [], []
    for a, b, c, _ in zip(packed, original, shifted, range(10)):
        differences.append((a.images.int() - b.images.int()).abs().flatten())
        control.append((a.images.int() - c.images.int()).abs().flatten().float())
    difference = torch.cat(differences).float()
    p99 = difference.quantile(0.99).item()
    print(f"R={resolution}: mean {difference.mean():.3f}, p99 {p99}, max {difference.max():.0f}")
    assert difference.mean() < DRAFT_MEAN and p99 <= DRAFT_P99
    # Control: the shorter side (178 px) instead of CelebA's 168 px crop is far outside the bounds.
    assert torch.cat(control).mean() > 2 * DRAFT_MEAN


def test_crop_rule_and_the_line_that_says_it(packed256, jpeg_shards, npy32_shards, big_folder, tmp_path, capfd):
    assert crop_side(178, 218, "auto") == 168 and crop_side(1024, 1024, "auto") == 1024
    assert crop_side(300, 200, "auto") == 200 and crop_side(300, 200, "150") == 150
    assert crop_side(100, 120, "168") == 100 and crop_side(178, 218, "0") == 178
    line = describe_crop(resolve_shards(str(jpeg_shards)), "auto", 64)
    assert line == ("data: original images (the first is 178x218): CelebA's aligned layout: centre crop 168, "
                    "then resized to 64 px (data.crop=auto)")
    line = describe_crop(resolve_shards(str(packed256["png"] / "manifest.json")), "168", 64)
    assert "cropped at pack time (celeba-center-168): no crop in training" in line
    assert "no crop" in describe_crop(resolve_shards(str(npy32_shards)), "auto", 32)
    pack(big_folder, tmp_path / "big", val_fraction=0, test_fraction=0, progress=False)
    big = resolve_shards(str(tmp_path / "big" / "manifest.json"))
    assert "centre 1024x1024 square, then resized to 32 px" in describe_crop(big, "auto", 32)
    # A crop larger than the image: one line in the run log and one notice from the stream, not silence.
    small = tmp_path / "small"
    small.mkdir()
    for index in range(4):
        Image.fromarray(np.full((120, 100, 3), 40 * index, np.uint8)).save(small / f"s{index}.png")
    pack(small, tmp_path / "smallshards", val_fraction=0, test_fraction=0, progress=False)
    shards = resolve_shards(str(tmp_path / "smallshards" / "manifest.json"))
    assert "data.crop=168 is larger than the image" in describe_crop(shards, "168", 32)
    capfd.readouterr()
    ShardStream(shards, batch_size=2, resolution=32, crop="168", shuffle_buffer=0).__iter__().__next__()
    err = capfd.readouterr().err
    assert err.count("data.crop=168 is larger than a 100x120 image: its centre 100x100 square is used") == 1


def test_crop_config_values():
    assert load_config("tiny").data.crop == "auto"
    assert load_config("reference").data.crop == "168"
    assert load_config("tiny", ["data.crop=0"]).data.crop == "0"
    with pytest.raises(ConfigError, match="data.crop='big' must be auto or a size in pixels"):
        load_config("tiny", ["data.crop=big"])


def test_shards_packed_before_the_tags_still_say_what_was_cropped(packed256, tmp_path):
    """Older shards carry no per-sample tag: the manifest beside a brace pattern says what was cropped."""
    folder = tmp_path / "old"
    shutil.copytree(packed256["png"], folder)
    path = folder / "synth-train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    assert b'"crop":"celeba-center-168"' in members[1][1]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".json"):
                meta = json.loads(data)
                data = json.dumps({k: v for k, v in meta.items() if k not in ("crop", "resolution")}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    (shard,) = resolve_shards(str(folder / "synth-train-{000000..000000}.tar"))
    assert shard.cropped == "celeba-center-168"
    batch, refs = first_batch(folder / "synth-train-{000000..000000}.tar", 256, crop="168")
    packed = packed_pixels(refs)
    np.testing.assert_array_equal(batch, packed)
    (folder / "manifest.json").unlink()  # neither tag nor manifest: an explicit crop applies, as it must
    (shard,) = resolve_shards(str(path))
    assert shard.cropped is None
    assert np.abs(first_batch(path, 256, crop="168")[0].astype(int) - packed).mean() > 10
