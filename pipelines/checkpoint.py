"""Checkpoint files: atomic writes, `weights_only=True` loads, and the RNG states that make a
resumed run continue exactly.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)` (no pickled code runs) and with the numpy RNG state converted to a
tensor, since numpy arrays are not on the safe-unpickling allow-list.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmx.core.errors import CheckpointError
from cmx.core.files import atomic_path

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "config", "epoch", "step")


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states, in weights_only-safe types."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    py = state["python"]
    # weights_only loading returns the inner tuple as a list; random.setstate needs tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a temp file in the same directory, fsync, then rename over `path`.

    A crash (or a divergence, or a killed worker) mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file, a checkpoint directory, or a run directory."""
    p = Path(path).expanduser()
    candidates = [p, p / CHECKPOINT_FILE, p / "checkpoints" / "last" / CHECKPOINT_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"no checkpoint at {p}",
        f"pass a {CHECKPOINT_FILE} file, the directory holding it, or a run directory",
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with `weights_only=True` onto the CPU; errors become one CheckpointError."""
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        # torch's weights_only refusal puts the reason on a later line.
        first = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])
        raise CheckpointError(
            f"{file}: unreadable checkpoint ({first[:200]})",
            "the file is corrupt or not a cmx checkpoint; use checkpoints/best or an earlier run",
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{file}: not a cmx checkpoint (missing keys)")
    _check_types(file, state)
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format {state['format_version']} is newer than this cmx ({FORMAT_VERSION})",
            "upgrade cmx",
        )
    return state


# key -> (expected types, in words); a checkpoint edited or written by another tool fails here,
# as one CheckpointError, rather than as a TypeError deep inside a resume or an evaluation.
_KEY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "format_version": ((int,), "an integer"),
    "epoch": ((int,), "an integer"),
    "step": ((int,), "an integer"),
    "num_classes": ((int,), "an integer"),
    "model": ((dict,), "a dict of tensors"),
    "config": ((dict,), "a dict"),
    "class_names": ((list,), "a list"),
}


def _check_types(file: Path, state: dict[str, Any]) -> None:
    """Every known key holds the type cmx wrote (bool is no integer here)."""
    for key, (types, words) in _KEY_TYPES.items():
        if key not in state:
            continue
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CheckpointError(
                f"{file}: not a cmx checkpoint ({key} is {type(value).__name__} {str(value)[:40]!r}, expected {words})",
                "use a checkpoint written by `cmx train`",
            )
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{file}: not a cmx checkpoint (model weights are not all tensors)")


def load_weights(model: torch.nn.Module, weights: dict[str, Any], file: str | Path) -> None:
    """`model.load_state_dict(weights)`; a checkpoint of another model or size is one CheckpointError."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        # torch lists every mismatch on its own line: name the first and count them.
        detail = next(
            (ln for ln in lines[1:] if "size mismatch" in ln or "Missing" in ln or "Unexpected" in ln), lines[0]
        )
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise CheckpointError(
            f"{file}: weights do not fit the model ({detail[:200]}{more})",
            "the checkpoint belongs to another model or size; use its run's own config",
        ) from None
