"""Locations given as a URI (s3://, gs://, file://, http://, sqlite:///...) or a local path."""

from __future__ import annotations

from pathlib import Path


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations (opened through pyarrow.fs or MLflow), False for local paths."""
    return "://" in str(location)
