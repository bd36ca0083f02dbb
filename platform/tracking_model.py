"""Where the registered model's pyfunc class lived before 0.2: models registered by earlier cmx
versions pickle it by this import path, so it stays importable here."""

from cmx.tracking.model import ConvMixerPyfunc

__all__ = ["ConvMixerPyfunc"]
