"""Encode generated images (uint8 [H, W, 3]) as PNG, JPEG or WebP bytes.

Encoding is deterministic for a given array and Pillow version, so the same seed gives
the same bytes. Encoders are CPU-bound (PNG of a 1024² image takes ~100 ms): callers in
an event loop must run `encode_image` in a worker thread.
"""

from __future__ import annotations

import io

import numpy as np

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# PNG at zlib level 1, not Pillow's 6: on a 1024^2 generated image it is ~5x faster (~120 vs ~600 ms on one
# CPU core, bench/sampler_cpu.py) for ~15% more bytes, and encode time adds straight to request latency.
# Quality 90 keeps JPEG/WebP artefacts invisible at typical sizes.
_OPTIONS = {"png": {"compress_level": 1}, "jpeg": {"quality": 90}, "webp": {"quality": 90, "method": 4}}
_PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown image format {fmt!r}; choose from {', '.join(MEDIA_TYPES)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, _PIL_NAMES[fmt], **_OPTIONS[fmt])
    return buf.getvalue()
