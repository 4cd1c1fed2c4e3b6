"""The synthetic CelebA-layout face set: layout, formats, determinism, size, visible attributes, speed, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distvae.data import synth
from distvae.data.synth import ATTRIBUTES, make_synthetic_celeba, split_sizes
from distvae.errors import UserError

CELEBA_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def thousand(tmp_path_factory) -> tuple[Path, float]:
    """One 1,000-image set shared by the layout, size and speed tests, with the seconds it took."""
    out = tmp_path_factory.mktemp("synth") / "celeba"
    start = time.perf_counter()
    make_synthetic_celeba(out, n=1000, progress=False)
    return out, time.perf_counter() - start


def read_attributes(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    assert int(lines[0]) == len(lines) - 2
    rows = [line.split() for line in lines[2:]]
    return lines[1].split(), [row[0] for row in rows], np.array([[int(v) for v in row[1:]] for row in rows])


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}


def faces_at(indices) -> tuple[list[Image.Image], np.ndarray]:
    """Images of seed 0 straight from memory, and their attributes as a (n, 40) array of 1 / -1."""
    faces = [synth.synthetic_face(0, index) for index in indices]
    values = np.array([[1 if attrs[a] else -1 for a in ATTRIBUTES] for _, attrs, _ in faces])
    return [image for image, _, _ in faces], values


def test_layout_and_formats(thousand):
    root, _ = thousand
    names, files, values = read_attributes(root)
    assert names == CELEBA_NAMES == list(ATTRIBUTES)
    assert files == [f"{i:06d}.jpg" for i in range(1, 1001)]
    assert values.shape == (1000, 40) and set(np.unique(values)) == {-1, 1}
    hair = values[:, [names.index(h) for h in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")]]
    assert ((hair == 1).sum(axis=1) <= 1).all(), "at most one hair colour per image"

    partition = [line.split() for line in (root / "list_eval_partition.txt").read_text().splitlines()]
    assert [row[0] for row in partition] == files
    splits = [int(row[1]) for row in partition]
    assert set(splits) == {0, 1, 2} and splits == sorted(splits), "contiguous train, val, test blocks"
    for split, celeba in enumerate((162770, 19867, 19962)):
        assert abs(splits.count(split) / 1000 - celeba / 202599) < 0.02

    identities = [line.split() for line in (root / "identity_CelebA.txt").read_text().splitlines()]
    assert [row[0] for row in identities] == files
    ids = [int(row[1]) for row in identities]
    assert min(ids) >= 1 and 20 <= len(set(ids)) < 1000, "identities repeat, like CelebA's"

    assert sorted(p.name for p in (root / "img_align_celeba").iterdir()) == files
    for name in files[::50]:
        with Image.open(root / "img_align_celeba" / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (178, 218))


def test_identity_shares_base_appearance():
    attributes = {}
    for index in range(200):  # one block of identities
        _, attrs, identity = synth.synthetic_face(0, index)
        fixed = tuple(attrs[a] for a in ("Male", "Young", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"))
        assert attributes.setdefault(identity, fixed) == fixed


def test_rates_roughly_celeba():
    _, values = faces_at(range(0, 200 * 600, 200))  # one image per identity block
    rates = dict(zip(ATTRIBUTES, (values == 1).mean(axis=0)))
    for name, celeba in {"Smiling": 0.48, "Male": 0.42, "Young": 0.77, "No_Beard": 0.83, "Blond_Hair": 0.15}.items():
        assert abs(rates[name] - celeba) < 0.08, (name, rates[name])


def test_split_sizes_small_and_large():
    for n in range(1, 40):
        sizes = split_sizes(n)
        assert sum(sizes) == n
        if n >= 3:
            assert min(sizes) >= 1
    assert split_sizes(202599) == (162770, 19867, 19962)


def test_deterministic_and_prefix_stable(tmp_path):
    make_synthetic_celeba(tmp_path / "a", n=40, seed=3, progress=False)
    make_synthetic_celeba(tmp_path / "b", n=40, seed=3, progress=False)
    make_synthetic_celeba(tmp_path / "c", n=40, seed=4, progress=False)
    make_synthetic_celeba(tmp_path / "short", n=25, seed=3, progress=False)
    a, b, c, short = (hashes(tmp_path / name) for name in ("a", "b", "c", "short"))
    assert a == b
    images = [key for key in a if key.endswith(".jpg")]
    assert len(images) == 40 and all(a[key] != c[key] for key in images)
    assert all(short[key] == a[key] for key in short if key.endswith(".jpg")), "image i depends on (seed, i) only"
    lines = (tmp_path / "a" / "list_attr_celeba.txt").read_text().splitlines()[2:27]
    assert (tmp_path / "short" / "list_attr_celeba.txt").read_text().splitlines()[2:] == lines


def test_file_size_like_celeba(thousand):
    root, _ = thousand
    sizes = [p.stat().st_size for p in sorted((root / "img_align_celeba").iterdir())[:400]]
    mean = sum(sizes) / len(sizes)
    print(f"mean JPEG size {mean / 1000:.1f} KB")
    assert 6_000 < mean < 16_000


def test_speed(thousand):
    _, seconds = thousand
    print(f"1,000 images in {seconds:.2f} s: {seconds:.2f} ms per image")
    assert seconds < 10


def region_mean(images: list[Image.Image], box: tuple[int, int, int, int], channels=(0, 1, 2)) -> np.ndarray:
    """Mean of a (left, top, right, bottom) region per image, over the given colour channels."""
    return np.array([np.asarray(image.crop(box), dtype=np.float32)[..., list(channels)].mean() for image in images])


def test_drawn_attributes_are_visible():
    # one image per identity block: 400 different people, so every attribute has both groups
    images, values = faces_at(range(0, 200 * 400, 200))
    halves = np.random.default_rng(0).permutation(len(images)) < len(images) // 2
    everyone = np.ones(len(images), dtype=bool)
    open_mouth = values[:, ATTRIBUTES.index("Mouth_Slightly_Open")] == 1
    blue = region_mean(images, (75, 62, 104, 84), channels=(2,))
    features = {  # attribute: (feature per image, the images to compare)
        # open mouths: a smile shows teeth, a neutral face a dark gap (Smiling alone correlates with open mouths)
        "Smiling": (region_mean(images, (83, 146, 96, 155)), open_mouth),
        "Eyeglasses": (region_mean(images, (62, 103, 117, 121)), everyone),  # dark frames around the eyes
        "Blond_Hair": (region_mean(images, (75, 62, 104, 84), channels=(0, 1)) - blue, everyone),  # yellow hair
        "Male": (region_mean(images, (28, 140, 44, 180)), everyone),  # long hair beside the neck on women
        "No_Beard": (region_mean(images, (60, 150, 118, 175)), everyone),  # beards and goatees darken the jaw
    }
    for name, (feature, subset) in features.items():
        group = values[subset, ATTRIBUTES.index(name)] == 1
        feature, chance = feature[subset], halves[subset]
        assert 5 <= group.sum() <= len(group) - 5, name
        effect = abs(feature[group].mean() - feature[~group].mean())
        noise = abs(feature[chance].mean() - feature[~chance].mean())
        print(f"{name}: group difference {effect:.1f}, random halves {noise:.1f}")
        assert effect > 3 * noise + 5, name


def test_errors(tmp_path):
    with pytest.raises(UserError, match="--n"):
        make_synthetic_celeba(tmp_path / "zero", n=0, progress=False)
    out = tmp_path / "set"
    make_synthetic_celeba(out, n=10, progress=False)
    with pytest.raises(UserError, match="--force"):
        make_synthetic_celeba(out, n=10, progress=False)
    make_synthetic_celeba(out, n=5, seed=1, force=True, progress=False)
    assert len(list((out / "img_align_celeba").iterdir())) == 5
    assert len((out / "list_eval_partition.txt").read_text().splitlines()) == 5


def test_interrupted_run_does_not_look_complete(tmp_path, monkeypatch):
    real = synth.synthetic_face

    def interrupt_at_five(seed, index):
        if index == 5:
            raise KeyboardInterrupt
        return real(seed, index)

    monkeypatch.setattr(synth, "synthetic_face", interrupt_at_five)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_celeba(tmp_path, n=10, progress=False)
    assert len(list((tmp_path / "img_align_celeba").iterdir())) == 5
    assert not any(tmp_path.glob("list_*.txt")) and not (tmp_path / "identity_CelebA.txt").exists()


def test_quiet_without_terminal(tmp_path, capsys):
    make_synthetic_celeba(tmp_path, n=3, progress=True)  # pytest's stderr is not a terminal
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("wrote 3 synthetic faces to ") and "(train 1 / val 1 / test 1)" in captured.out
    assert captured.out.count("\n") == 1


def test_cli(tmp_path):
    command = [sys.executable, "-m", "distvae", "synth", "--out", str(tmp_path / "d"), "--n", "20"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr
    assert "wrote 20 synthetic faces" in first.stdout
    assert len(list((tmp_path / "d" / "img_align_celeba").glob("*.jpg"))) == 20
    assert (tmp_path / "d" / "list_eval_partition.txt").exists()

    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert "already holds a dataset" in second.stderr and "--force" in second.stderr
