"""The exception classes cmx raises; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class CmxError(Exception):
    """Base class: a problem the user can fix. `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the fix, on one line."""
        return f"{self.message} — {self.hint}" if self.hint else self.message


class ConfigError(CmxError):
    """Invalid YAML, unknown key, impossible value or range."""

    exit_code = 2


class ModelError(ConfigError):
    """An invalid ConvMixer architecture (bad depth, kernel list, patch size, ...)."""


class DataError(CmxError):
    """Missing, unreadable or corrupt data (image folder, .beton, dataset package)."""


class TrainingDiverged(CmxError):
    """The loss became NaN or infinite; the last good checkpoint is intact."""

    exit_code = 3


class CheckpointError(CmxError):
    """A checkpoint file is missing, corrupt or incompatible."""


class TrackingError(CmxError):
    """The MLflow tracking server is unreachable or refused a request."""


class ClusterError(CmxError):
    """A Ray cluster cannot be reached or cannot satisfy the request."""
