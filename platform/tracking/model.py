"""The sweep's best model as an MLflow pyfunc model: checkpoint, config, class names, signature."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.pyfunc import PythonModel

from cmx.core.config import TrainConfig, dump_yaml
from cmx.models import create_model
from cmx.pipelines.checkpoint import load_checkpoint, load_weights
from cmx.tracking.provenance import package_version


class ConvMixerPyfunc(PythonModel):
    """A registered cmx model: loads the checkpoint (weights only) and returns class logits for
    float32 NCHW batches normalised with the config's mean/std."""

    def load_context(self, context: Any) -> None:
        import torch

        state = load_checkpoint(context.artifacts["checkpoint"])
        config = TrainConfig.model_validate(state["config"])
        model = create_model(config.model.name, num_classes=state["num_classes"], **config.model.overrides())
        weights = state["model"]
        if state.get("ema"):  # what validation used, as in `cmx eval`
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        load_weights(model, weights, context.artifacts["checkpoint"])
        self.model = model.eval()
        self.torch = torch

    # `np.ndarray` is a hint MLflow 3 accepts without trying to infer a schema from it.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        x = self.torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with self.torch.no_grad():
            return self.model(x).numpy()


@contextlib.contextmanager
def _quiet_save() -> Iterator[None]:
    """No per-file progress bars while MLflow copies the artifacts into the model, and no warning that
    `python_model` is pickled: it is pickled by reference to `cmx.tracking.model`, an installed module."""
    logger = logging.getLogger("mlflow.pyfunc")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():  # the signature is given; an input example would run the model
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def build_model_dir(checkpoint_file: Path, out_dir: Path) -> Path:
    """An MLflow pyfunc model directory around a cmx checkpoint, with config, class names and a
    signature (float32 [-1, 3, res, res] -> [-1, num_classes])."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    state = load_checkpoint(checkpoint_file)
    config = TrainConfig.model_validate(state["config"])
    res = config.data.val_resolution
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, res, res))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(state["num_classes"])))]),
    )
    extra = out_dir.parent / f"{out_dir.name}-extra"
    extra.mkdir(parents=True, exist_ok=True)
    (extra / "config.yaml").write_text(dump_yaml(config))
    (extra / "class_names.json").write_text(json.dumps(list(state.get("class_names") or []), indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    with _quiet_save():
        mlflow.pyfunc.save_model(
            str(out_dir),
            python_model=ConvMixerPyfunc(),
            artifacts={
                "checkpoint": str(checkpoint_file),
                "config": str(extra / "config.yaml"),
                "class_names": str(extra / "class_names.json"),
            },
            signature=signature,
            # Listing requirements skips MLflow's inference, which imports and runs the model.
            pip_requirements=[f"cmx=={package_version('cmx')}", f"torch=={package_version('torch').split('+')[0]}"],
            metadata={
                "cmx_model": config.model.name,
                "num_classes": int(state["num_classes"]),
                "class_names": list(state.get("class_names") or []),
                "mean": list(config.data.mean),
                "std": list(config.data.std),
                "resolution": res,
                "epoch": int(state["epoch"]),
            },
        )
    shutil.rmtree(extra, ignore_errors=True)
    return out_dir
