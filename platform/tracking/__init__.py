"""MLflow tracking: the store, the `Tracker` every write goes through, runs read back, the pyfunc
model, plots and provenance. The only part of cmx that imports mlflow."""

import os

# Before mlflow is first imported: it sends telemetry otherwise (see docs/architecture.md, MLflow).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
