"""distvae synth --out DIR --n N [--seed S] [--force]      # e.g. --out data/synth --n 20000
python -m distvae synth --out DIR --n N

A synthetic face set in CelebA's exact on-disk layout, standing in for CelebA in tests and `make train`.
Writes DIR/img_align_celeba/000001.jpg ... (178x218 RGB JPEGs, ~10 KB like CelebA's), then
list_attr_celeba.txt, identity_CelebA.txt and, last of all, list_eval_partition.txt: that file
existing means the set is complete. Smiling, Eyeglasses, the hair colours, Male, beards and most
other attributes are drawn into the pictures, so a conditional VAE has something to learn.
Image i depends only on (seed, i), never on n or on generation order.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from distvae.errors import UserError

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
LIST_FILES = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt")
CELEBA_SPLITS = (162770, 19867, 19962)  # train / val / test images in CelebA's 202,599
WIDTH, HEIGHT = 178, 218
CX, CY = 89, 121  # face centre: where CelebA's alignment puts it, inside the central 168x168 crop
PAD = 32  # drawing margin so tilting and shifting never pull in an empty corner
JPEG_QUALITY = 87  # with the grain below this gives CelebA's ~10 KB per file
IDENTITY_BLOCK, IDENTITIES_PER_BLOCK = 200, 10  # ~20 images per identity, like CelebA
HAIR_RGB = {"Black_Hair": (28, 22, 20), "Brown_Hair": (96, 62, 38), "Blond_Hair": (222, 188, 118),
            "Gray_Hair": (172, 170, 168)}


def make_synthetic_celeba(out: str | Path, n: int, seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    """Write n synthetic faces and CelebA's three list files under `out`; return `out` as a Path."""
    out = Path(out)
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more (got {seed})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    images = out / "img_align_celeba"
    if any((out / name).exists() for name in LIST_FILES) or (images.is_dir() and any(images.iterdir())):
        if not force:
            raise UserError(f"{out} already holds a dataset; pass --force to replace it or choose another --out")
        for name in LIST_FILES:  # the partition file first: a half-replaced set must not look complete
            (out / name).unlink(missing_ok=True)
        if images.is_dir():
            shutil.rmtree(images)
    images.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    attribute_lines, identity_lines = [str(n), " ".join(ATTRIBUTES)], []
    for index in _progress(range(n), progress and sys.stderr.isatty()):
        image, attributes, identity = synthetic_face(seed, index)
        name = f"{index + 1:06d}.jpg"
        image.save(images / name, "JPEG", quality=JPEG_QUALITY)
        # CelebA's own padding: " 1" and "-1" line up in columns
        attribute_lines.append(name + " " + " ".join(" 1" if attributes[a] else "-1" for a in ATTRIBUTES))
        identity_lines.append(f"{name} {identity}")

    sizes = split_sizes(n)
    splits = [split for split, size in enumerate(sizes) for _ in range(size)]  # contiguous blocks, like CelebA
    _write_atomically(out / "list_attr_celeba.txt", attribute_lines)
    _write_atomically(out / "identity_CelebA.txt", identity_lines)
    _write_atomically(out / "list_eval_partition.txt", [f"{i + 1:06d}.jpg {split}" for i, split in enumerate(splits)])
    print(f"wrote {n:,} synthetic faces to {out} (train {sizes[0]:,} / val {sizes[1]:,} / test {sizes[2]:,})"
          f" in {time.perf_counter() - start:.1f} s")
    return out


def split_sizes(n: int) -> tuple[int, int, int]:
    """CelebA's train/val/test proportions for n images; every split gets one image once n >= 3."""
    total = sum(CELEBA_SPLITS)
    train, val = round(n * CELEBA_SPLITS[0] / total), round(n * CELEBA_SPLITS[1] / total)
    sizes = [train, val, n - train - val]
    for split in range(3):
        if n >= 3 and sizes[split] == 0:
            sizes[sizes.index(max(sizes))] -= 1
            sizes[split] = 1
    return sizes[0], sizes[1], sizes[2]


def synthetic_face(seed: int, index: int) -> tuple[Image.Image, dict[str, bool], int]:
    """Image `index` (0-based) of the set for `seed`: the picture, its 40 attributes and its identity id."""
    rng = np.random.default_rng([seed, 0, index])
    identity = 1 + index // IDENTITY_BLOCK * IDENTITIES_PER_BLOCK + int(rng.integers(IDENTITIES_PER_BLOCK))
    attributes, look = _identity(seed, identity)
    attributes = dict(attributes)
    _sample_image_attributes(rng, attributes, look)
    return _draw(rng, attributes, look), {name: bool(value) for name, value in attributes.items()}, identity


@lru_cache(maxsize=64)
def _identity(seed: int, identity: int) -> tuple[dict[str, bool], dict]:
    """What stays fixed across one person's photos: gender, age, colours, face shape, hair style."""
    rng = np.random.default_rng([seed, 1, identity])
    r = rng.random(24)
    male = r[0] < 0.42
    young = r[1] < (0.70 if male else 0.82)
    a = dict.fromkeys(ATTRIBUTES, False)
    a.update(Male=male, Young=young, Pale_Skin=r[2] < 0.045, Big_Nose=r[3] < (0.4 if male else 0.12),
             Pointy_Nose=r[4] < 0.28, Big_Lips=r[5] < 0.24, Narrow_Eyes=r[6] < 0.12, Chubby=r[7] < 0.06,
             Oval_Face=r[8] < 0.28, Arched_Eyebrows=not male and r[9] < 0.45, Bushy_Eyebrows=r[10] < 0.14,
             Bald=male and not young and r[11] < 0.2, Attractive=r[12] < (0.62 if young else 0.2))
    a["Double_Chin"] = (a["Chubby"] and r[13] < 0.7) or (not young and r[13] < 0.04)
    a["Receding_Hairline"] = not a["Bald"] and r[14] < (0.25 if not young else 0.05)
    # one drawn hair colour at most; the rest (~37%) are in-between shades that CelebA labels with none
    hair_p = {"Gray_Hair": 0.0 if young else 0.18, "Blond_Hair": 0.02 if male else 0.27,
              "Black_Hair": 0.24, "Brown_Hair": 0.205}
    edges = np.cumsum(list(hair_p.values()))
    colour = next((name for name, edge in zip(hair_p, edges) if r[15] < edge), None)
    if colour:
        a[colour] = True
        hair = np.array(HAIR_RGB[colour]) * (0.9 + 0.2 * rng.random(3))
    else:
        hair = np.array([52, 36, 26]) + rng.random() * np.array([90, 55, 22])  # dark to light brown, some auburn
    a["Wavy_Hair"] = r[16] < (0.14 if male else 0.45)
    a["Straight_Hair"] = not a["Wavy_Hair"] and r[17] < (0.18 if male else 0.45)
    a["Bangs"] = r[18] < (0.08 if male else 0.2)
    beard = r[19] if male else 1.0  # one kind of facial hair per man: beard, goatee, mustache or none
    a.update(Goatee=beard < 0.15, Mustache=0.15 <= beard < 0.25, Sideburns=male and r[20] < 0.14)
    skin_tone = 0.93 + 0.07 * rng.random() if a["Pale_Skin"] else 0.9 * rng.beta(4, 2)  # only Pale_Skin is that pale
    skin = np.array([88, 58, 42]) + skin_tone * np.array([160, 150, 140])
    look = {"skin": skin, "hair": hair, "long_hair": not male or r[21] < 0.05, "full_beard": 0.25 <= beard < 0.37,
            "eye": rng.choice([(70, 45, 25), (40, 25, 15), (70, 110, 150), (85, 110, 70)]),
            "face_w": 37 + 5 * a["Chubby"] - 3 * a["Oval_Face"] + 2 * male + rng.normal(0, 1.2),
            "face_h": 50 + 3 * a["Oval_Face"] + rng.normal(0, 1.2),
            "glasses": r[22] < 0.12, "lipstick": not male and r[23] < 0.85}
    return a, look


def _sample_image_attributes(rng: np.random.Generator, a: dict[str, bool], look: dict) -> None:
    """What changes from photo to photo of one person, at roughly CelebA's base rates."""
    r = rng.random(12)
    male = a["Male"]
    a["Smiling"] = r[0] < 0.48
    a["Mouth_Slightly_Open"] = r[1] < (0.75 if a["Smiling"] else 0.22)
    a["High_Cheekbones"] = r[2] < (0.8 if a["Smiling"] else 0.12)
    a["Eyeglasses"] = look["glasses"] and r[3] < 0.55
    a["Wearing_Hat"] = r[4] < 0.048
    a["Wearing_Lipstick"] = look["lipstick"] and r[5] < 0.95
    a["Heavy_Makeup"] = a["Wearing_Lipstick"] and r[6] < 0.8
    a["Wearing_Earrings"] = not male and r[7] < 0.32
    a["Wearing_Necklace"] = r[8] < (0.02 if male else 0.2)
    a["Wearing_Necktie"] = male and r[9] < 0.17
    a["Blurry"] = r[10] < 0.05
    a["Rosy_Cheeks"] = not male and r[11] < 0.11
    a["Bags_Under_Eyes"] = rng.random() < (0.18 if a["Young"] else 0.45)
    a["5_o_Clock_Shadow"] = male and not look["full_beard"] and rng.random() < 0.3
    a["No_Beard"] = not (look["full_beard"] or a["Goatee"] or a["Mustache"])


def _draw(rng: np.random.Generator, a: dict[str, bool], look: dict) -> Image.Image:
    """Paint the face on a padded canvas, tilt/shift/scale it, then add lighting and grain."""
    width, height = WIDTH + 2 * PAD, HEIGHT + 2 * PAD
    # background: a muted tint (like walls and studio backdrops) fading across the frame
    corners = rng.integers(30, 235) + rng.integers(-40, 41, 3) + rng.integers(-40, 41, (2, 2, 3))
    canvas = Image.fromarray(np.clip(corners, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)

    def rgb(colour, factor=1.0):
        return tuple(int(min(255, c * factor)) for c in colour)

    def box(x, y, rx, ry):  # face coordinates are the output image's; the canvas adds PAD on every side
        return (PAD + x - rx, PAD + y - ry, PAD + x + rx, PAD + y + ry)

    def point(x, y):
        return (PAD + x, PAD + y)

    skin, hair, fw, fh = look["skin"], look["hair"], look["face_w"], look["face_h"]
    lip = rng.integers([150, 20, 40], [215, 60, 90]) if a["Wearing_Lipstick"] else skin * [0.78, 0.6, 0.6]
    draw.ellipse(box(CX, HEIGHT + 38, 88, 62), fill=tuple(rng.integers(20, 230, 3)))  # shoulders
    if a["Wearing_Necktie"]:
        draw.polygon([point(CX + dx, y) for dx, y in ((-15, 196), (0, 212), (15, 196))], fill=(235, 235, 235))
        draw.polygon([point(CX + dx, y) for dx, y in ((-4, 203), (4, 203), (7, HEIGHT), (-7, HEIGHT))],
                     fill=tuple(rng.integers(20, 200, 3)))
    if not a["Bald"]:  # hair behind the head: long down to the shoulders, short just around the skull
        if look["long_hair"]:
            draw.ellipse(box(CX, CY - 8, fw + 14, fh + 14), fill=rgb(hair))
            draw.rectangle(box(CX, CY + 22, fw + 14, 32), fill=rgb(hair))
            if a["Wavy_Hair"]:
                for y in range(CY - 20, CY + 60, 16):
                    for side in (-1, 1):
                        draw.ellipse(box(CX + side * (fw + 14), y, 7, 8), fill=rgb(hair))
        else:
            draw.ellipse(box(CX, CY - 10, fw + 5, fh + 7), fill=rgb(hair))
    draw.rectangle(box(CX, CY + 45, 16, 40), fill=rgb(skin, 0.8))  # neck
    if a["Wearing_Necklace"]:
        draw.arc(box(CX, CY + fh + 4, 18, 14), 20, 160, fill=(215, 180, 70), width=2)
    for side in (-1, 1):
        draw.ellipse(box(CX + side * (fw - 1), CY - 4, 6, 11), fill=rgb(skin, 0.85))  # ears
        if a["Wearing_Earrings"]:
            draw.ellipse(box(CX + side * (fw + 1), CY + 9, 2.5, 2.5), fill=(220, 180, 60))
    light = rng.uniform(-2.5, 2.5)  # three nested ovals: shading that the blur and JPEG turn into a gradient
    draw.ellipse(box(CX, CY, fw, fh), fill=rgb(skin, 0.84))
    draw.ellipse(box(CX + light, CY - 2, fw - 3, fh - 3), fill=rgb(skin, 0.93))
    draw.ellipse(box(CX + 2 * light, CY - 4, fw - 9, fh - 10), fill=rgb(skin))
    beard_colour = rgb(hair, 0.8)
    if look["full_beard"] or a["5_o_Clock_Shadow"]:
        colour = beard_colour if look["full_beard"] else rgb(0.7 * skin + 0.3 * hair, 0.85)
        start = round(math.degrees(math.asin(10 / fh)))  # whole degrees: PIL's chord smears otherwise
        draw.chord(box(CX, CY, fw, fh), start, 180 - start, fill=colour)
    if a["Double_Chin"]:
        draw.arc(box(CX, CY + fh - 1, 14, 5), 20, 160, fill=rgb(skin, 0.72), width=2)
    if not a["Bald"]:  # hairline: high when receding, low when the hair falls in bangs
        drop = 0.42 if a["Bangs"] else 0.8 if a["Receding_Hairline"] else 0.6
        start = 180 + round(math.degrees(math.asin(drop)))
        draw.chord(box(CX, CY, fw + 1, fh + 1), start, 540 - start, fill=rgb(hair))
        if a["Sideburns"]:
            for side in (-1, 1):
                draw.rectangle(box(CX + side * (fw - 3), CY + 2, 3, 14), fill=beard_colour)
    for side in (-1, 1):
        ex, ey = CX + side * 17, CY - 9
        eye_h = (2.0 if a["Narrow_Eyes"] else 3.3) * (0.8 if a["Smiling"] else 1.0)
        if a["Heavy_Makeup"]:
            draw.ellipse(box(ex, ey - 2, 8, 5), fill=tuple(rng.integers([70, 30, 50], [150, 80, 130])))
        if a["Bags_Under_Eyes"]:
            draw.arc(box(ex, ey + 2, 6, 4), 20, 160, fill=rgb(skin, 0.7), width=1)
        if a["High_Cheekbones"] or a["Rosy_Cheeks"]:
            cheek = (235, 120, 130) if a["Rosy_Cheeks"] else rgb(skin, 1.08)
            draw.ellipse(box(CX + side * 21, CY + 8, 6, 4), fill=cheek)
        draw.ellipse(box(ex, ey, 6.5, eye_h), fill=(236, 232, 226), outline=(60, 40, 35))
        draw.ellipse(box(ex + side * 0.5, ey, min(eye_h, 3), min(eye_h, 3)), fill=tuple(look["eye"]))
        draw.ellipse(box(ex + side * 0.5, ey, 1.2, 1.2), fill=(10, 8, 8))
        brow_y, brow_w = ey - 8, 2 + 2 * a["Bushy_Eyebrows"] + a["Male"]
        if a["Arched_Eyebrows"]:
            draw.arc(box(ex, brow_y + 3, 8, 4), 200, 340, fill=rgb(hair, 0.65), width=brow_w)
        else:
            draw.line([point(ex - 8 * side, brow_y - 1), point(ex + 8 * side, brow_y + 1)],
                      fill=rgb(hair, 0.65), width=brow_w)
    nose = 1.35 if a["Big_Nose"] else 1.0
    if a["Pointy_Nose"]:
        tip = [point(CX - 5 * nose, CY + 15), point(CX + 5 * nose, CY + 15)]
        draw.polygon([point(CX, CY - 2), *tip], fill=rgb(skin, 0.9))
    else:
        draw.ellipse(box(CX, CY + 12, 5 * nose, 3.5 * nose), fill=rgb(skin, 0.88))
    for side in (-1, 1):
        draw.ellipse(box(CX + side * 3 * nose, CY + 14, 1.6, 1), fill=rgb(skin, 0.45))
    if a["Goatee"]:
        draw.ellipse(box(CX, CY + fh - 8, 9, 9), fill=beard_colour)
    mouth_y, mouth_w, lips = CY + 30, 11 + 3 * a["Smiling"], 1.5 if a["Big_Lips"] else 1.0
    if a["Mustache"]:
        draw.line([point(CX - 11, mouth_y - 6), point(CX + 11, mouth_y - 6)], fill=beard_colour, width=4)
    if a["Smiling"]:  # lips curve up; an open smile shows teeth
        draw.chord(box(CX, mouth_y - 4, mouth_w, 6 + 2 * lips), 0, 180, fill=rgb(lip))
        if a["Mouth_Slightly_Open"]:
            draw.chord(box(CX, mouth_y - 3, mouth_w - 2, 5), 0, 180, fill=(242, 238, 228))
        else:
            draw.arc(box(CX, mouth_y - 5, mouth_w - 1, 6), 10, 170, fill=rgb(lip, 0.6), width=1)
    else:
        draw.ellipse(box(CX, mouth_y, mouth_w, 2.5 * lips + 2 * a["Mouth_Slightly_Open"]), fill=rgb(lip))
        inner = 2.5 if a["Mouth_Slightly_Open"] else 0.6
        draw.ellipse(box(CX, mouth_y, mouth_w - 3, inner), fill=(70, 28, 32))
    if a["Eyeglasses"]:
        frame = tuple(rng.integers(10, 70, 3))
        lens = (30, 30, 36) if rng.random() < 0.25 else None  # sunglasses
        for side in (-1, 1):
            draw.rounded_rectangle(box(CX + side * 17, CY - 9, 10, 7), radius=4, outline=frame, fill=lens, width=2)
            draw.line([point(CX + side * 27, CY - 11), point(CX + side * fw, CY - 12)], fill=frame, width=2)
        draw.line([point(CX - 7, CY - 11), point(CX + 7, CY - 11)], fill=frame, width=2)
    if a["Wearing_Hat"]:
        colour = tuple(rng.integers(10, 240, 3))
        draw.chord(box(CX, CY - 0.5 * fh, fw + 9, 0.8 * fh), 180, 360, fill=colour)
        draw.ellipse(box(CX, CY - 0.5 * fh, fw + 18, 4), fill=rgb(colour, 0.8))

    # Pose: one affine resample does the tilt, shift, scale and crop; nearest-neighbour is 15x cheaper than
    # bilinear and the box blur after it smooths the stair-steps and softens every edge.
    angle, scale = math.radians(np.clip(rng.normal(0, 3), -7, 7)), rng.uniform(0.94, 1.06)
    shift_x, shift_y = np.clip(rng.normal(0, 2.5, 2), -5, 5)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    ox, oy = CX + shift_x, CY + shift_y  # output pixel (x, y) reads canvas pixel PAD + centre + R(x - ox, y - oy)
    coeffs = (cos, -sin, PAD + CX - cos * ox + sin * oy, sin, cos, PAD + CY - sin * ox - cos * oy)
    image = canvas.transform((WIDTH, HEIGHT), Image.AFFINE, coeffs, resample=Image.NEAREST)
    image = image.filter(ImageFilter.GaussianBlur(2.2) if a["Blurry"] else ImageFilter.BoxBlur(1))
    grain_tiles, light_tile = _textures()
    lx, ly = rng.integers(0, light_tile.width - WIDTH), rng.integers(0, light_tile.height - HEIGHT)
    image = ImageChops.multiply(image, light_tile.crop((lx, ly, lx + WIDTH, ly + HEIGHT)))
    grain = grain_tiles[int(rng.integers(len(grain_tiles)))]
    gx, gy = rng.integers(0, grain.width - WIDTH), rng.integers(0, grain.height - HEIGHT)
    return ImageChops.add(image, grain.crop((gx, gy, gx + WIDTH, gy + HEIGHT)), scale=1.0, offset=-128)


@lru_cache(maxsize=1)
def _textures() -> tuple[list[Image.Image], Image.Image]:
    """Made once per process: film-grain tiles (fine noise plus soft blotches) and a soft light fall-off."""
    rng = np.random.default_rng(20240601)
    width, height = WIDTH + 96, HEIGHT + 96
    tiles = []
    for strength in (3.0, 4.5, 6.5):
        fine = rng.normal(0, strength, (height, width, 1)) + rng.normal(0, strength / 3, (height, width, 3))
        blotches = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8))
                              .resize((width, height), Image.BICUBIC), dtype=np.float32)[..., None]
        noise = 128 + fine + (blotches - 128) * 0.06 * strength
        tiles.append(Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB"))
    y, x = np.mgrid[-1:1:(2 * HEIGHT) * 1j, -1:1:(2 * WIDTH) * 1j]
    light = np.clip(255 * (1 - 0.22 * (x * x + y * y)), 0, 255).astype(np.uint8)
    return tiles, Image.fromarray(np.repeat(light[..., None], 3, axis=2), "RGB")


def _write_atomically(path: Path, lines: list[str]) -> None:
    """Write to a temporary name then rename, so a crash never leaves a truncated list file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, path)


def _progress(items: range, show: bool):
    """A rich progress bar on stderr for people at a terminal; nothing in logs and pipes."""
    if not show:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description="synthetic faces", console=Console(stderr=True), transient=True)
