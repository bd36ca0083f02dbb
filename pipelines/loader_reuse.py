"""FFCV loaders kept alive across the runs of one process (a reused Ray actor's trials).

A new FFCV `Loader` opens the `.beton`, allocates its batch buffers and loads its compiled
pipeline (~0.5-1 s even with numba's cache on). Sweep trials in a reused actor usually read the
same files with the same pipeline, so the last few loaders are kept, keyed by everything that
shapes them (the file's identity and stat, the data config, split, resolution, device, seed,
shard and indices); a key that differs in anything builds a new one. The epoch's order and crop
size are set at each epoch's start, so a kept loader carries no state between runs.
`CMX_LOADER_REUSE=0` turns this off.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from cmx.core.config import DataConfig

KEEP = 2  # a run's train and val loaders; an older pair is dropped (each holds its buffers)
REUSE_ENV = "CMX_LOADER_REUSE"


def reuse_enabled() -> bool:
    """Whether loaders are kept (`CMX_LOADER_REUSE` unset, or anything but 0/false/off)."""
    return os.environ.get(REUSE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def loader_key(path: Path, cfg: DataConfig, split: str, indices: np.ndarray, **shape: Any) -> tuple[Any, ...]:
    """What identifies a loader: the file (path, inode, size, mtime), the config and `shape`'s values."""
    st = path.stat()
    digest = hashlib.sha256(np.ascontiguousarray(indices).tobytes()).hexdigest()
    return (
        str(path.resolve()),
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        split,
        cfg.model_dump_json(),
        digest,
        tuple(sorted((k, repr(v)) for k, v in shape.items())),
    )


class ReusableLoaders:
    """The last `KEEP` loaders built in this process, by key (least recently used dropped first)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._kept: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> Any | None:
        """The loader kept under `key`, or None."""
        if key not in self._kept or not reuse_enabled():
            return None
        self._kept.move_to_end(key)
        return self._kept[key]

    def put(self, key: tuple[Any, ...], loader: Any) -> None:
        """Keep `loader` under `key`, dropping the least recently used beyond `keep`."""
        if not reuse_enabled():
            return
        self._kept[key] = loader
        self._kept.move_to_end(key)
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)

    def clear(self) -> None:
        """Drop every kept loader."""
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)


FFCV_LOADERS = ReusableLoaders()
