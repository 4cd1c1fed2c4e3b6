"""Sample bytes -> a uint8 (R, R, C) image, as fast as each format allows.

- `npy` (shards pre-resized at pack time): no decoding at all, the array is a view of the bytes.
- JPEG: PIL's `draft()` lets libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain when the
  target is that much smaller than the crop, and one `resize(box=...)` crops and resizes in a single
  pass. On CelebA-size files at 64 px this runs about 1.7x the reference loader's PIL + CenterCrop +
  Resize + ToTensor on one core here (torchvision's decode_jpeg + interpolate was slower: 1.3x).
- PNG/WebP: the same crop + resize without the draft shortcut.

The crop matches torchvision's CenterCrop(crop) then Resize(R): a centred crop x crop square (or the
shorter side when crop is 0 or larger than the image), bilinear with antialiasing.
"""

from __future__ import annotations

import ast
import io
import math

import numpy as np
from PIL import Image

IMAGE_EXTS = ("npy", "jpg", "jpeg", "png", "webp")

_npy_layouts: dict[bytes, tuple[tuple[int, ...], np.dtype, int]] = {}


def _npy_array(data: bytes) -> np.ndarray:
    """Parse a .npy payload without np.load's per-call overhead (the header is cached)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("npy member has no NumPy header")
    header_bytes = 4 if data[6] >= 2 else 2
    start = 8 + header_bytes + int.from_bytes(data[8 : 8 + header_bytes], "little")
    header = bytes(data[:start])
    layout = _npy_layouts.get(header)
    if layout is None:
        fields = ast.literal_eval(header[8 + header_bytes :].decode("latin1").strip())
        if fields["fortran_order"]:
            raise ValueError("npy member is in Fortran order")
        shape = tuple(fields["shape"])
        layout = shape, np.dtype(fields["descr"]), math.prod(shape)
        _npy_layouts[header] = layout
    shape, dtype, count = layout
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)


def _from_array(array: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"npy member has dtype {array.dtype}, expected uint8")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != channels:
        mode = "L" if array.shape[2] == 1 else "RGB"
        image = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        array = array[:, :, None] if array.ndim == 2 else array
    if array.shape[:2] != (resolution, resolution):  # shards packed at another size: slow path
        return _crop_resize(Image.fromarray(array.squeeze(2) if channels == 1 else array), resolution, 0, channels)
    return array


def _crop_resize(image: Image.Image, resolution: int, crop: int, channels: int) -> np.ndarray:
    width, height = image.size
    side = crop if 0 < crop <= min(width, height) else min(width, height)
    if image.format == "JPEG":
        # libjpeg picks the largest 1/2^k reduction that keeps the image at least this big.
        image.draft("RGB" if channels == 3 else "L", (math.ceil(width * resolution / side),
                                                       math.ceil(height * resolution / side)))
    scale = image.size[0] / width
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    box = (left * scale, top * scale, (left + side) * scale, (top + side) * scale)
    mode = "RGB" if channels == 3 else "L"
    if image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(image.resize((resolution, resolution), Image.BILINEAR, box=box))
    return array[:, :, None] if array.ndim == 2 else array


def decode_sample(sample: dict, resolution: int, crop: int = 0, channels: int = 3) -> np.ndarray:
    """The sample's image as uint8 (resolution, resolution, channels); raises on unreadable data."""
    if "npy" in sample:
        return _from_array(_npy_array(sample["npy"]), resolution, channels)
    for ext in IMAGE_EXTS[1:]:
        if ext in sample:
            image = Image.open(io.BytesIO(sample[ext]))
            return _crop_resize(image, resolution, crop, channels)
    raise ValueError(f"sample has no image member (looked for {', '.join(IMAGE_EXTS)})")
