"""Keyed random numbers for deterministic FFCV augmentation (`loop.deterministic: true`).

FFCV's own `RandomResizedCropRGBImageDecoder` and `RandomHorizontalFlip` draw from numba's
`np.random`, whose state is per thread and seeded from the OS: two runs (or two worker counts)
crop differently. Here every random number is a counter-based hash (splitmix64) of
(seed, epoch, sample index, draw number), so a sample's crop and flip depend only on those,
whatever the numba thread that decodes it, the number of threads, the process, or a resume.
`ffcv_compat.keyed_crop_decoder_class` uses these kernels in FFCV's decoder (the flip is folded
into the crop decoder, which knows the sample indices). The kernels are numba-compiled on first
use (`kernels()`), so importing this module costs nothing, and kept in numba's disk cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@dataclass(frozen=True)
class Kernels:
    """The compiled kernels (numba dispatchers, callable from Python and from compiled code)."""

    uniform01: Any  # (seed, epoch, sample, draw) -> float in [0, 1)
    keyed_crop: Any  # (height, width, scale, ratio, seed, epoch, sample, flip_prob) -> (i, j, h, w, flip)
    flip_columns_: Any  # (H, W, C) image -> None, mirrored in place


@functools.cache
def kernels() -> Kernels:
    """Compile the keyed kernels (once per process)."""
    from numba import njit

    jit = njit(nogil=True, cache=True)  # kept in numba's disk cache (ffcv_compat.enable_jit_cache)

    # Each kernel is self-contained (the hash is an inner function): a kernel that called another
    # dispatcher from this closure would miss numba's disk cache in every new process.
    @jit
    def uniform01(seed: np.uint64, epoch: np.uint64, sample: np.uint64, draw: np.uint64) -> float:
        def mix(z: np.uint64) -> np.uint64:  # splitmix64's finaliser (uint64 arithmetic wraps)
            z = (z ^ (z >> _S30)) * _M1
            z = (z ^ (z >> _S27)) * _M2
            return z ^ (z >> _S31)

        h = mix(mix(mix(mix(seed + _GAMMA) ^ (epoch + _GAMMA)) ^ (sample + _GAMMA)) ^ (draw + _GAMMA))
        return float(h >> _S11) * _TO_UNIT

    @jit
    def keyed_crop(
        height: int,
        width: int,
        scale: np.ndarray,
        ratio: np.ndarray,
        seed: np.uint64,
        epoch: np.uint64,
        sample: np.uint64,
        flip_prob: float,
    ) -> tuple[int, int, int, int, bool]:
        """FFCV's `get_random_crop` (torchvision's algorithm) with keyed draws, plus the flip decision."""

        def mix(z: np.uint64) -> np.uint64:
            z = (z ^ (z >> _S30)) * _M1
            z = (z ^ (z >> _S27)) * _M2
            return z ^ (z >> _S31)

        key = mix(mix(mix(seed + _GAMMA) ^ (epoch + _GAMMA)) ^ (sample + _GAMMA))

        def u(draw: int) -> float:  # uniform01(seed, epoch, sample, draw)
            return float(mix(key ^ (np.uint64(draw) + _GAMMA)) >> _S11) * _TO_UNIT

        area = height * width
        log_r0, log_r1 = np.log(ratio[0]), np.log(ratio[1])
        flip = u(0) < flip_prob
        for attempt in range(10):
            d = 1 + 4 * attempt
            target_area = area * (scale[0] + (scale[1] - scale[0]) * u(d))
            aspect = np.exp(log_r0 + (log_r1 - log_r0) * u(d + 1))
            w = int(round(np.sqrt(target_area * aspect)))
            h = int(round(np.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(u(d + 2) * (height - h + 1))
                j = int(u(d + 3) * (width - w + 1))
                return i, j, h, w, flip
        in_ratio = float(width) / float(height)
        if in_ratio < min(ratio[0], ratio[1]):
            w = width
            h = int(round(w / min(ratio[0], ratio[1])))
        elif in_ratio > max(ratio[0], ratio[1]):
            h = height
            w = int(round(h * max(ratio[0], ratio[1])))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w, flip

    @jit
    def flip_columns_(image: np.ndarray) -> None:
        w = image.shape[1]
        for r in range(image.shape[0]):
            for c in range(w // 2):
                for k in range(image.shape[2]):
                    tmp = image[r, c, k]
                    image[r, c, k] = image[r, w - 1 - c, k]
                    image[r, w - 1 - c, k] = tmp

    return Kernels(uniform01, keyed_crop, flip_columns_)
