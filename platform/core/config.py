"""Typed configuration, one object per concern, loaded from YAML with unknown keys rejected.

Order everywhere: class defaults -> YAML file -> `--set a.b=c` overrides. Errors name the file
and the dotted key, and say how to fix it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmx.core.errors import ConfigError, DataError
from cmx.core.files import data_fingerprint
from cmx.core.metrics import ALL, MODES
from cmx.core.uris import is_uri
from cmx.core.yaml_files import YamlRefused, load_yaml_file, yaml_value

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
_INF = float("inf")

# A kernel size spec: one int for all blocks, a list with one entry per block (an entry that is a
# list means mixed kernels within that block), or a stage schedule [{blocks: n, kernel_size: k}].
KernelSpec = int | list[int | list[int]] | list[dict[str, Any]]

# Upper bounds of the sizes that allocate memory, checked by the schema before anything is built
# (generous for ImageNet-scale work; docs/search-space.md lists them). A sweep range is checked
# against them too, through its low and high ends.
MAX_DIM = 65_536  # model.dim
MAX_DEPTH = 1_024  # model.depth, entries of a kernel list, blocks of a stage schedule
MAX_KERNEL = 1_023  # one depthwise kernel size
MAX_MIXED_KERNELS = 64  # kernels mixed within one block
MAX_PATCH = 1_024  # model.patch_size
MAX_RESOLUTION = 4_096  # data.resolution, data.val_resolution, progressive resize
MAX_BATCH = 65_536  # data.batch_size, data.val_batch_size
MAX_WORKERS = 1_024  # data.num_workers
MAX_EPOCHS = 100_000  # loop.epochs, scheduler epochs


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProgressiveResize(StrictModel):
    """Train resolution grows linearly from start_res to end_res between the two epochs (FFCV recipe)."""

    start_res: int = Field(160, ge=8, le=MAX_RESOLUTION)
    end_res: int = Field(192, ge=8, le=MAX_RESOLUTION)
    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(10, ge=0)
    step: int = Field(32, ge=1, le=MAX_RESOLUTION, description="resolutions are rounded to a multiple of this")

    @model_validator(mode="after")
    def _ordered(self) -> ProgressiveResize:
        if self.end_epoch < self.start_epoch:
            raise ValueError("end_epoch must be >= start_epoch")
        return self

    def resolution_at(self, epoch: int) -> int:
        """FFCV ImageNet's `get_resolution`: linear ramp rounded to `step`, kept within the two ends."""
        if epoch <= self.start_epoch:
            return self.start_res
        if epoch >= self.end_epoch:
            return self.end_res
        frac = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        res = int(round((self.start_res + frac * (self.end_res - self.start_res)) / self.step)) * self.step
        lo, hi = sorted((self.start_res, self.end_res))
        return min(max(res, lo), hi)


class AugmentConfig(StrictModel):
    """Train-time augmentation applied by either loader backend."""

    hflip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment: bool = False
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    randaugment_ops: int = Field(2, ge=1, le=16)
    color_jitter: float = Field(0.0, ge=0.0)
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)


class DataConfig(StrictModel):
    """Where the data is and how it is loaded."""

    backend: Literal["ffcv", "torchvision"] = "ffcv"
    train_path: str | None = Field(None, description=".beton (ffcv) or ImageFolder dir (torchvision)")
    val_path: str | None = Field(None, description="what training and a sweep's search measure (val/ metrics)")
    test_path: str | None = Field(
        None,
        description="held-out test split: never loaded while training; a sweep evaluates its best trial on it "
        "at the end (test/ metrics); must not be the val data",
    )
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="per worker")
    val_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    num_workers: int = Field(2, ge=0, le=MAX_WORKERS)
    resolution: int = Field(224, ge=8, le=MAX_RESOLUTION, description="train crop size")
    val_resolution: int = Field(224, ge=8, le=MAX_RESOLUTION)
    center_crop_ratio: float = Field(224 / 256, gt=0.0, le=1.0)
    progressive: ProgressiveResize | None = None
    os_cache: bool = False
    cache_dir: str | None = Field(
        None,
        description="node-local dir: train/val data (path or s3://) is copied here once per node and read locally",
    )
    order: Literal["random", "quasi_random", "sequential"] = "random"
    drop_last: bool = True
    batches_ahead: int = Field(3, ge=1, le=64)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    limit: int | None = Field(None, ge=1, description="use N evenly spaced samples (quick runs)")

    @field_validator("mean")
    @classmethod
    def _finite_mean(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(-_INF < x < _INF for x in v):
            raise ValueError("every entry must be a finite number")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        """Images are divided by std: a zero, negative or non-finite entry is a config error, not divergence."""
        if not all(0 < x < _INF for x in v):
            raise ValueError("every entry must be a finite number > 0 (images are divided by it)")
        return v

    @model_validator(mode="after")
    def _feasible(self) -> DataConfig:
        if self.backend == "ffcv" and self.augment.randaugment:
            # RandAugment is PIL/tensor code: inside an FFCV CPU pipeline it would sit between
            # compiled ops, the order FFCV 1.0.2 spins forever on (docs/architecture.md, FFCV).
            raise ValueError("augment.randaugment needs backend torchvision (FFCV has no RandAugment)")
        if self.test_path and self.val_path and same_data_path(self.test_path, self.val_path):
            raise ValueError(
                f"test_path is the val data ({self.test_path}): the search would select on the test split; "
                "export a validation split (cmx data builtin / cmx data convert --val-fraction) and keep test apart"
            )
        return self

    def train_resolution(self, epoch: int) -> int:
        """Train crop size at a 0-based epoch: the progressive schedule, else `resolution`."""
        return self.progressive.resolution_at(epoch) if self.progressive else self.resolution


class ModelConfig(StrictModel):
    """A registry name plus overrides of its constructor arguments (None keeps the variant's)."""

    name: str = "convmixer_256_8_ks5_p2"
    dim: int | None = Field(None, ge=1, le=MAX_DIM)
    depth: int | None = Field(None, ge=1, le=MAX_DEPTH)
    kernel_size: KernelSpec | None = None
    patch_size: int | None = Field(None, ge=1, le=MAX_PATCH)
    act_layer: Literal["gelu", "relu", "silu"] | None = None
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0)
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)

    @field_validator("kernel_size")
    @classmethod
    def _bounded_kernels(cls, v: KernelSpec | None) -> KernelSpec | None:
        """Kernel sizes and list lengths within the limits (the model checks oddness and depth)."""
        if v is None:
            return v
        entries: list[Any] = [v] if isinstance(v, int) else list(v)
        if len(entries) > MAX_DEPTH:
            raise ValueError(f"{len(entries)} entries, more than the {MAX_DEPTH} blocks model.depth allows")
        for entry in entries:
            if isinstance(entry, dict):
                blocks = entry.get("blocks")
                if isinstance(blocks, int) and blocks > MAX_DEPTH:
                    raise ValueError(f"a stage of {blocks} blocks, more than the {MAX_DEPTH} model.depth allows")
                entry = entry.get("kernel_size")
            kernels = entry if isinstance(entry, list) else [entry]
            if len(kernels) > MAX_MIXED_KERNELS:
                raise ValueError(f"{len(kernels)} kernels mixed in one block, more than {MAX_MIXED_KERNELS}")
            for k in kernels:
                if isinstance(k, int) and k > MAX_KERNEL:
                    raise ValueError(f"kernel {k} is over the limit of {MAX_KERNEL}")
        return v

    def overrides(self) -> dict[str, Any]:
        """Constructor arguments that differ from the registered variant."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}


class OptimConfig(StrictModel):
    """Optimiser. Weight decay skips norm layers and biases."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    grad_clip: float | None = Field(None, gt=0.0)


class ScheduleConfig(StrictModel):
    """Per-step learning-rate schedule with linear warm-up."""

    name: Literal["onecycle", "cosine", "step", "piecewise", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final lr / peak lr")
    pct_start: float = Field(0.25, gt=0.0, lt=1.0, description="onecycle: fraction spent rising")
    div_factor: float = Field(25.0, ge=1.0, description="onecycle: start lr = peak lr / div_factor")
    step_size: int = Field(20_000, ge=1, description="step: multiply by gamma every N steps")
    gamma: float = Field(0.1, gt=0.0)
    milestones: list[float] = Field(
        default_factory=lambda: [0.0, 0.4, 0.8, 1.0],
        description="piecewise: knots as fractions of training",
    )
    values: list[float] = Field(
        default_factory=lambda: [0.0, 1.0, 0.05, 0.0],
        description="piecewise: lr multipliers at the knots",
    )

    @model_validator(mode="after")
    def _piecewise(self) -> ScheduleConfig:
        if len(self.milestones) != len(self.values) or len(self.milestones) < 2:
            raise ValueError("milestones and values must have the same length (>= 2)")
        if any(b < a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError("milestones must be non-decreasing")
        return self


class LoopConfig(StrictModel):
    """The training loop: length, regularisation, precision, determinism."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    seed: int = 0
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0, description="mixup alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0.0, description="cutmix alpha (0 = off)")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    early_stop_patience: int | None = Field(None, ge=1, description="epochs without improvement")
    early_stop_metric: str = "val/top1"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, le=MAX_WORKERS, description="torch CPU threads (default: all cores)")
    cpu_allocator: Literal["keep", "default"] = Field(
        "keep",
        description="on CPU, keep: glibc reuses freed tensor buffers instead of unmapping them after "
        "every op (fewer page faults, faster steps; memory stays at its peak); default: glibc's policy",
    )

    @model_validator(mode="after")
    def _known_metric(self) -> LoopConfig:

        known = [m for m in ALL if m in MODES]
        if self.early_stop_metric not in known:
            raise ValueError(f"early_stop_metric must be one of {', '.join(known)}")
        return self


class CheckpointConfig(StrictModel):
    """Where checkpoints go and which are kept."""

    every_epoch: bool = True
    keep_best: bool = True


class TrainConfig(StrictModel):
    """Everything `cmx train` needs; saved with every run and checkpoint."""

    name: str = "run"
    output_dir: str | None = Field(None, description="parent of run dirs (default $CMX_HOME/runs)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _deterministic_feasible(self) -> TrainConfig:
        if self.loop.deterministic and self.data.backend == "ffcv" and self.data.augment.color_jitter > 0:
            # FFCV's RandomBrightness/Contrast/Saturation draw per-thread numba random numbers.
            raise ValueError(
                "loop.deterministic with data.augment.color_jitter > 0 is not deterministic on FFCV: "
                "set data.augment.color_jitter=0, data.backend=torchvision or loop.deterministic=false"
            )
        return self


# ----------------------------------------------------------------------------- loading

T = TypeVar("T", bound=BaseModel)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping through `yaml_files` (size limit, UTF-8, safe and bounded YAML, no duplicate
    keys); errors name the file and line."""
    p = Path(path)
    data = load_yaml_file(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for `dotted == "a.b"`, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def get_dotted(data: dict[str, Any], dotted: str) -> Any:
    """Return `data["a"]["b"]` for `"a.b"` (KeyError if absent)."""
    node: Any = data
    for k in dotted.split("."):
        node = node[k]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `key.path=value` strings; values are parsed as YAML (`3`, `[3, 5]`, `true`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value", "e.g. --set optim.lr=0.01")
        key, raw = item.split("=", 1)
        try:
            value = yaml_value(raw)
        except YamlRefused as e:
            raise ConfigError(f"--set {key.strip()}: invalid YAML value ({e.problem})", "write the value out") from None
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value)
    return data


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Known keys at a location in a config class (for did-you-mean hints)."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            for arg in getattr(cls, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    cls = arg
                    break
            else:
                return []
    return list(getattr(cls, "model_fields", {}))


def _input_path(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The error location as keys of the input, without pydantic's union-tag entries."""
    out: list[Any] = []
    node = data
    for part in loc:
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            node = node[part]
        elif isinstance(node, dict) and part not in node and out and isinstance(node.get("type"), str):
            continue  # a discriminated-union tag such as `int` in space.model.depth.int
        else:
            node = None
        out.append(part)
    return tuple(out)


def validate_config(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build a config object; the first error becomes one ConfigError naming source and key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _input_path(data, err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _field_names(cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown key {key!r}", hint) from None
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {_short_repr(got)})"
        raise ConfigError(f"{source}: {key}: {msg}{shown}", "fix the value and re-run") from None


def _short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: an error stays one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too long to show"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def same_data_path(a: str, b: str) -> bool:
    """True when two data paths name the same file or folder (after `~`, `$VARS` and symlinks)."""
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    pa, pb = (Path(os.path.expandvars(x)).expanduser() for x in (a, b))
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def resolve_data_paths(config: dict[str, Any], root: Path) -> None:
    """Make a config's relative `data.train_path` / `data.val_path` / `data.test_path` absolute against
    `root`, the folder of the file they were written in (trials run elsewhere). `$VARS` and `~` expand;
    URIs stay as they are."""
    section = config.get("data")
    if not isinstance(section, dict):
        return
    for key in ("train_path", "val_path", "test_path"):
        value = section.get(key)
        if isinstance(value, str) and value and not is_uri(value):
            p = Path(os.path.expandvars(value)).expanduser()
            section[key] = str(p if p.is_absolute() else (root / p).resolve())


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults -> YAML file -> overrides, validated into a TrainConfig."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return validate_config(TrainConfig, data, str(path) if path else "--set")


def dump_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def check_test_apart(data: DataConfig, source: str, *, must_exist: bool = False) -> None:
    """ConfigError when `data.test_path` is the val data: the same path, or the same content
    (`data_fingerprint`: a copy of the val `.beton` or folder). Cheap: reads at most 2 MiB each.
    `must_exist`: a local test path that is missing is a DataError too (a sweep reads it at its end)."""
    test, val = data.test_path, data.val_path
    if test and must_exist and not is_uri(test) and not Path(test).expanduser().exists():
        raise DataError(
            f"{source}: data.test_path {test} does not exist",
            "export it (cmx data builtin fashion-mnist writes test/ and test.beton) or drop data.test_path",
        )
    if not test or not val:
        return
    hint = "give data.test_path the held-out test split, not a copy of data.val_path"
    if same_data_path(test, val):
        raise ConfigError(f"{source}: data.test_path {test} is data.val_path: the search would select on test", hint)
    if is_uri(test) or is_uri(val):
        return
    a, b = data_fingerprint(val), data_fingerprint(test)
    if a not in ("missing", "unavailable") and a == b:
        raise ConfigError(
            f"{source}: data.test_path {test} holds the same data as data.val_path {val} ({a})",
            hint,
        )
