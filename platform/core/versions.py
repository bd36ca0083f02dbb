"""The installed release of a dependency whose private internals cmx uses, checked against the
range those internals were read in."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from cmx.core.errors import CmxError

Release = tuple[int, ...]


def checked_version(
    dist: str,
    label: str,
    tested: tuple[Release, Release],
    error: type[CmxError],
    *,
    missing_hint: str,
    install_hint: str,
) -> str:
    """The installed version of `dist`; `error` (one line) when missing or outside `tested` [low, high)."""
    try:
        found = version(dist)  # the distribution's metadata: some packages' __version__ is wrong
    except PackageNotFoundError:
        raise error(f"{label} is not installed", missing_hint) from None
    parts = tuple(int(p) for p in re.findall(r"\d+", found)[:3])
    low, high = tested
    if not low <= parts < high:
        raise error(
            f"{label} {found} is outside the range cmx was tested with "
            f"({'.'.join(map(str, low))} <= {dist} < {'.'.join(map(str, high))})",
            install_hint,
        )
    return found
