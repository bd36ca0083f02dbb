"""Locations given as a URI (s3://, gs://, file://, http://, sqlite:///...) or a local path."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from cmx.core.errors import ConfigError


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations (opened through pyarrow.fs or MLflow), False for local paths."""
    return "://" in str(location)


# Stores MLflow opens that cmx documents (README, tracking): a server, or a database MLflow's SQL
# store speaks (`+driver` allowed, e.g. postgresql+psycopg2://).
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")
# Storage Ray Tune (pyarrow.fs) writes sweep state to.
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "az", "hdfs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def _scheme_of(location: str) -> str | None:
    """The URI scheme of `location`, also of a typo'd one (`htp:/host`); None for a plain path."""
    m = _SCHEME.match(location)
    return m.group(1).lower() if m else None


def check_tracking_uri(uri: str, what: str) -> str:
    """`uri` when it is a tracking store cmx supports (a plain path is a sqlite file); else ConfigError.

    `what` names where the URI came from (`--tracking-uri`, `tracking.uri`, ...).
    """
    scheme = _scheme_of(uri)
    if scheme is None:
        return uri
    hint = "use http(s)://HOST[:PORT], sqlite:///PATH, a postgresql/mysql/mssql:// database URI or a plain path"
    base = scheme.split("+", 1)[0]
    if base not in TRACKING_SCHEMES:
        raise ConfigError(
            f"{what} {uri!r}: unsupported scheme {scheme!r} (supported: {', '.join(TRACKING_SCHEMES)})", hint
        )
    if not uri[len(scheme) + 1 :].startswith("//") and base != "databricks":
        raise ConfigError(f"{what} {uri!r} is not a URI ({scheme}: must be followed by //)", hint)
    try:
        parsed = urlsplit(uri)
        parsed.port  # noqa: B018  (parses the port: raises on a bad one)
    except ValueError as e:
        raise ConfigError(f"{what} {uri!r} is not a valid URI ({e})", hint) from None
    if base in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"{what} {uri!r} names no host", hint)
    if base == "sqlite" and not parsed.path.strip("/"):
        raise ConfigError(f"{what} {uri!r} names no database file", "use sqlite:///PATH/mlflow.db")
    return uri


def check_storage_location(location: str, what: str) -> str:
    """`location` when it is a local path or a storage URI Tune can write to; else ConfigError."""
    scheme = _scheme_of(location)
    if scheme is None:
        return location
    hint = f"use a local path or a URI with one of: {', '.join(s + '://' for s in STORAGE_SCHEMES)}"
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"{what} {location!r}: unsupported scheme {scheme!r}", hint)
    if not location[len(scheme) + 1 :].startswith("//"):
        raise ConfigError(f"{what} {location!r} is not a URI ({scheme}: must be followed by //)", hint)
    try:
        urlsplit(location)
    except ValueError as e:
        raise ConfigError(f"{what} {location!r} is not a valid URI ({e})", hint) from None
    return location
