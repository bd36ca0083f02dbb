"""Train / validation loaders from a `DataConfig`, for FFCV or torchvision, interchangeable.

Both yield `(images, labels)`: images float32 (N, 3, H, W) in channels_last memory, normalized
with `cfg.mean`/`cfg.std`, on `device`; labels contiguous int64 (N,) on `device`. Both crop the
same way (FFCV's crop geometry, area resampling when shrinking), flip, and normalize alike.

FFCV 1.0.2 traps handled here (docs/architecture.md, FFCV):
- a compiled op after a plain op loops forever inside `Loader()`: on CPU `NormalizeImage` runs
  before `ToTensor`; `check_pipeline_order` rejects any other order before FFCV sees it;
- `import ffcv`, every `Loader()` and every epoch call `torch.set_num_threads`: we restore it;
- FFCV's epoch thread dies silently on an exception and the consumer waits forever; breaking out
  of an epoch leaks that thread: `ffcv_compat.guarded_epoch_iterator_class` reports errors and always stops it;
- batches live in 5 reused buffers: labels are always copied, images with `clone=True`.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from cmx.core.config import DataConfig
from cmx.core.errors import ConfigError, DataError
from cmx.pipelines.beton import dataset_info, evenly_spaced, read_beton
from cmx.pipelines.data_cache import local_data_path
from cmx.pipelines.ffcv_compat import (
    check_pipeline_order,
    ffcv_imported,
    guarded_epoch_iterator_class,
    keep_torch_threads,
    keyed_crop_decoder_class,
    start_epoch,
)
from cmx.pipelines.images import find_classes, load_rgb, scan_image_folder
from cmx.pipelines.loader_reuse import FFCV_LOADERS, loader_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
Split = Literal["train", "val"]


@runtime_checkable
class Loader(Protocol):
    """What `build_loader` returns, for either backend."""

    num_samples: int  # samples in the dataset (all ranks)
    class_names: list[str]
    num_classes: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...  # batches per epoch on this rank
    def set_epoch(self, epoch: int) -> None: ...  # 0-based: resolution and shuffling
    def resolution(self, epoch: int) -> int: ...


# --------------------------------------------------------------------------- FFCV side effects


# --------------------------------------------------------------------------- shared pieces


def _auto_distributed(distributed: bool | None) -> tuple[bool, int, int]:
    """(distributed, rank, world_size); None means: on iff a process group with >1 rank exists."""
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if ready else 1
    if distributed is None:
        distributed = ready and world > 1
    if distributed and not ready:
        raise ConfigError(
            "distributed=True but torch.distributed has no process group",
            "call torch.distributed.init_process_group first (gloo works on CPU)",
        )
    return bool(distributed), (dist.get_rank() if distributed else 0), (world if distributed else 1)


def subset_indices(n: int, limit: int | None) -> np.ndarray:
    """`limit` evenly spaced sample indices (every class of a class-sorted dataset appears)."""

    return evenly_spaced(n, limit)


def keyed_seed(kind: str, seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """A torch seed that is a function of (kind, seed, epoch, batch or sample index, rank) only."""
    digest = hashlib.blake2b(f"{kind}/{seed}/{epoch}/{index}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_erase_(images: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random erasing in place (torchvision's boxes, value 0 = the mean colour)."""
    import torch

    if p <= 0:
        return images
    n, _, h, w = images.shape
    area = h * w
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    apply = torch.rand(n, generator=generator) < p
    for i in torch.nonzero(apply).flatten().tolist():
        for _ in range(10):
            erase_area = area * float(torch.empty(1).uniform_(0.02, 0.33, generator=generator))
            ratio = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
            eh, ew = (
                int(round(math.sqrt(erase_area * ratio))),
                int(round(math.sqrt(erase_area / ratio))),
            )
            if eh < h and ew < w:
                top = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
                images[i, :, top : top + eh, left : left + ew] = 0
                break
    return images


def check_deterministic_augment(cfg: DataConfig) -> None:
    """Refuse augmentations that cannot be made deterministic on `cfg.backend` (never a silent pass)."""
    if cfg.backend == "ffcv" and cfg.augment.color_jitter > 0:
        raise ConfigError(
            "data.augment.color_jitter > 0 is not deterministic on the FFCV backend "
            "(FFCV's jitter draws per-thread random numbers)",
            "set data.augment.color_jitter=0, data.backend=torchvision, or loop.deterministic=false",
        )


class _Base:
    """Config, split, device and epoch bookkeeping common to both backends."""

    def __init__(
        self,
        cfg: DataConfig,
        split: Split,
        device: torch.device,
        seed: int,
        distributed: bool,
        rank: int,
        world: int,
        clone: bool,
        deterministic: bool = False,
    ) -> None:
        self.cfg, self.split, self.device, self.seed = cfg, split, device, seed
        self.deterministic = deterministic
        self.distributed, self.rank, self.world_size, self.clone = distributed, rank, world, clone
        self.train = split == "train"
        self.batch_size = cfg.batch_size if self.train else (cfg.val_batch_size or cfg.batch_size)
        self.drop_last = cfg.drop_last if self.train else False
        self._epoch = 0
        self._epoch_set = False
        self.in_chans = 3
        self.class_names: list[str] = []
        self.num_classes = 0
        self.num_samples = 0

    def resolution(self, epoch: int) -> int:
        """Crop size at `epoch`: the progressive schedule for training, fixed for validation."""
        return self.cfg.train_resolution(epoch) if self.train else self.cfg.val_resolution

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (0-based): resolution and shuffling follow it."""
        if epoch < 0:
            raise ConfigError(f"set_epoch({epoch}): epochs are 0-based")
        self._epoch, self._epoch_set = epoch, True

    def _finish_epoch(self) -> None:
        # Without set_epoch calls, consecutive iterations are consecutive epochs (as FFCV does).
        if not self._epoch_set:
            self._epoch += 1
        self._epoch_set = False

    @property
    def epoch(self) -> int:
        return self._epoch

    def _augment_batch(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        """Random erasing; in deterministic mode from a generator keyed by (seed, epoch, batch, rank)."""
        if self.train and self.cfg.augment.random_erasing > 0:
            generator = None
            if self.deterministic:
                import torch

                generator = torch.Generator().manual_seed(keyed_seed("erase", self.seed, self._epoch, batch, self.rank))
            random_erase_(images, self.cfg.augment.random_erasing, generator)
        return images


# --------------------------------------------------------------------------- FFCV backend


def _cupy_available() -> bool:
    try:
        importlib.import_module("cupy")
        importlib.import_module("pytorch_pfn_extras")
    except ImportError:
        return False
    return True


class FFCVLoader(_Base):
    """An FFCV `Loader` over a `.beton` written by `cmx data convert` (fields image, label)."""

    def __init__(self, path: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import torch

        cfg = self.cfg
        self.path = path
        bf = read_beton(path)  # a truncated or foreign file fails here, before FFCV touches it
        if bf.fields.get("image") != "rgb_image" or bf.fields.get("label") != "int":
            raise DataError(
                f"{path}: expected fields image (RGB) and label (int), found {bf.fields}",
                "write it with `cmx data convert`",
            )
        info = dataset_info(path)
        self.class_names, self.num_classes = info.class_names, info.num_classes
        all_indices = subset_indices(bf.num_samples, cfg.limit)
        self.num_samples = int(all_indices.size)
        order_name = cfg.order if self.train else "sequential"
        if self.distributed and order_name == "quasi_random":
            log.info("quasi_random order is not distributed in FFCV 1.0.2; using random")
            order_name = "random"
        ffcv_distributed = self.distributed and self.train
        indices = all_indices
        if self.distributed and not self.train:
            # Validation shards are disjoint and cover every sample once (FFCV's distributed mode
            # pads like DistributedSampler, counting some samples twice).
            indices = all_indices[self.rank :: self.world_size]
        if indices.size == 0:
            raise DataError(f"{path}: no samples for rank {self.rank}", "use fewer processes or more data")
        res = self.resolution(self._epoch)
        mean = np.array(cfg.mean) * 255
        std = np.array(cfg.std) * 255
        on_gpu = self.device.type == "cuda"
        self._normalize_in_torch = on_gpu and not _cupy_available()
        key = loader_key(
            path, cfg, self.split, indices, res=res, device=self.device, seed=self.seed, rank=self.rank,
            world=self.world_size, order=order_name, distributed=ffcv_distributed, batch=self.batch_size,
            deterministic=self.deterministic,
        )  # fmt: skip
        kept = FFCV_LOADERS.get(key)
        if kept is not None:  # a reused actor's next trial: same file, same pipeline
            self._ffcv, self.decoder, self._iterator_cls = kept
        else:
            self._ffcv, self.decoder, self._iterator_cls = self._build_native(
                path, res, mean, std, on_gpu, order_name, ffcv_distributed, indices
            )
            FFCV_LOADERS.put(key, (self._ffcv, self.decoder, self._iterator_cls))
        if self._normalize_in_torch:
            self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
            self._inv_std = (1.0 / torch.tensor(std, dtype=torch.float32, device=self.device)).view(1, 3, 1, 1)

    def _build_native(
        self,
        path: Path,
        res: int,
        mean: np.ndarray,
        std: np.ndarray,
        on_gpu: bool,
        order_name: str,
        ffcv_distributed: bool,
        indices: np.ndarray,
    ) -> tuple[Any, Any, type]:
        """A new FFCV `Loader`, its crop decoder (resized per epoch) and the guarded iterator class."""
        cfg = self.cfg
        with ffcv_imported():
            from ffcv.fields.basics import IntDecoder
            from ffcv.fields.rgb_image import (
                CenterCropRGBImageDecoder,
                RandomResizedCropRGBImageDecoder,
            )
            from ffcv.loader import Loader as FFCVNative
            from ffcv.loader import OrderOption
            from ffcv.transforms import (
                NormalizeImage,
                RandomBrightness,
                RandomContrast,
                RandomHorizontalFlip,
                RandomSaturation,
                ToDevice,
                ToTensor,
                ToTorchImage,
            )

            if self.train:
                aug = cfg.augment
                image_pipeline: list[Any]
                if self.deterministic:
                    # Crops and flips keyed by (seed, epoch, sample): the same for any thread count.
                    check_deterministic_augment(cfg)
                    decoder = keyed_crop_decoder_class()(
                        (res, res), tuple(aug.scale), tuple(aug.ratio), seed=self.seed, flip_prob=0.5 * aug.hflip
                    )
                    image_pipeline = [decoder]
                else:
                    decoder = RandomResizedCropRGBImageDecoder(
                        (res, res), scale=tuple(aug.scale), ratio=tuple(aug.ratio)
                    )
                    image_pipeline = [decoder]
                    if aug.hflip:
                        image_pipeline.append(RandomHorizontalFlip())
                if aug.color_jitter > 0:  # FFCV's native jitter: no hue, like ours on torchvision
                    c = aug.color_jitter
                    image_pipeline += [
                        RandomBrightness(c, p=1.0),
                        RandomContrast(c, p=1.0),
                        RandomSaturation(c, p=1.0),
                    ]
            else:
                decoder = CenterCropRGBImageDecoder((res, res), ratio=cfg.center_crop_ratio)
                image_pipeline = [decoder]
            if on_gpu:
                # The FFCV ImageNet recipe: uint8 to the GPU, then normalize there.
                image_pipeline += [
                    ToTensor(),
                    ToDevice(self.device, non_blocking=True),
                    ToTorchImage(channels_last=True),
                ]
                if not self._normalize_in_torch:
                    image_pipeline.append(NormalizeImage(mean, std, np.float32))
            else:
                # On CPU NormalizeImage (compiled) must come before ToTensor (plain), or FFCV spins.
                image_pipeline += [
                    NormalizeImage(mean, std, np.float32),
                    ToTensor(),
                    ToTorchImage(channels_last=True),
                ]
            label_pipeline = [IntDecoder(), ToTensor()]
            orders = {
                "random": OrderOption.RANDOM,
                "quasi_random": OrderOption.QUASI_RANDOM,
                "sequential": OrderOption.SEQUENTIAL,
            }
            pipelines = {"image": image_pipeline, "label": label_pipeline}
            check_pipeline_order(path, pipelines)
            native = FFCVNative(
                str(path),
                batch_size=self.batch_size,
                num_workers=max(1, cfg.num_workers),
                os_cache=cfg.os_cache,
                order=orders[order_name],
                distributed=ffcv_distributed,
                seed=seed_for(self.seed),
                indices=indices,
                pipelines=pipelines,
                drop_last=self.drop_last,
                batches_ahead=cfg.batches_ahead,
            )
            return native, decoder, guarded_epoch_iterator_class()

    def __len__(self) -> int:
        return len(self._ffcv)

    def _start_epoch(self) -> Any:
        """FFCV's `Loader.__iter__` with our iterator and without its torch thread change."""
        res = self.resolution(self._epoch)
        self.decoder.output_size = (res, res)  # FFCV ImageNet's progressive resizing
        if getattr(self.decoder, "keyed", False):
            self.decoder.epoch = self._epoch  # written into the keyed decoder's buffers by the epoch thread
        return start_epoch(self._ffcv, self._epoch, self._iterator_cls)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        with keep_torch_threads():
            it = self._start_epoch()
        completed = False
        index = 0
        try:
            while True:
                batch = it.next_batch(str(self.path))
                if batch is None:
                    completed = True
                    break
                images, labels = batch
                # Labels: a fresh contiguous int64 (N,) tensor (FFCV's is a (N, 1) view of a reused buffer).
                labels = labels.reshape(-1).to(torch.int64, copy=True).to(self.device, non_blocking=True)
                if self._normalize_in_torch:
                    images = (images.float() - self._mean) * self._inv_std  # new tensor, channels_last kept
                elif self.clone:
                    images = images.clone(memory_format=torch.channels_last)
                yield self._augment_batch(images, index), labels
                index += 1
        finally:
            it.shutdown()
            if completed:
                self._finish_epoch()


def seed_for(seed: int) -> int:
    """FFCV wants a non-negative int32 seed."""
    return int(seed) % (2**31 - 1)


# --------------------------------------------------------------------------- torchvision backend


def _area_resize(img: Any, box: tuple[int, int, int, int], size: int) -> Any:
    """Crop `box` (top, left, h, w) and resize to size x size like FFCV (cv2 INTER_AREA).

    INTER_AREA averages pixel areas when shrinking (PIL's BOX filter) and is bilinear when
    enlarging; matching it keeps the two backends' pixels within JPEG noise of each other.
    """
    from PIL import Image

    top, left, h, w = box
    resample = Image.Resampling.BOX if (h >= size and w >= size) else Image.Resampling.BILINEAR
    return img.resize((size, size), resample=resample, box=(left, top, left + w, top + h))


class FFCVRandomResizedCrop:
    """torchvision-side RandomResizedCrop with FFCV's crop sampling and resampling."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float]) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, img: Any) -> Any:
        from torchvision.transforms import RandomResizedCrop

        # The same algorithm as ffcv.fields.rgb_image.get_random_crop (both copy torchvision's).
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        return _area_resize(img, (top, left, h, w), self.size)


class FFCVCenterCrop:
    """torchvision-side center crop with FFCV's geometry: a square of ratio * short side, resized."""

    def __init__(self, size: int, ratio: float) -> None:
        self.size, self.ratio = size, ratio

    def __call__(self, img: Any) -> Any:
        width, height = img.size
        c = int(self.ratio * min(height, width))
        return _area_resize(img, ((height - c) // 2, (width - c) // 2, c, c), self.size)


def _folder_dataset_class() -> Callable[[Path, Any], Any]:
    from torchvision.datasets import ImageFolder

    class CmxImageFolder(ImageFolder):
        """`ImageFolder` with cmx's class list, file order and RGB conversion (as the writer)."""

        def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
            classes = find_classes(directory)
            return classes, {c: i for i, c in enumerate(classes)}

        @staticmethod
        def make_dataset(
            directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
        ) -> list[tuple[str, int]]:
            return [(str(p), label) for p, label in scan_image_folder(directory).samples]

    def build(root: Path, transform: Any) -> Any:
        return CmxImageFolder(str(root), transform=transform, loader=load_rgb)

    return build


class _ShardSampler:
    """Sequential, disjoint shards: rank r gets indices r, r+W, ... (every sample exactly once)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TorchvisionLoader(_Base):
    """`ImageFolder` + `DataLoader` with the same crops, flip and normalization as `FFCVLoader`."""

    def __init__(self, path: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import torch
        from torch.utils.data import Subset

        cfg = self.cfg
        if not path.is_dir():
            hint = "torchvision reads ImageFolder directories; use data.backend=ffcv for .beton files"
            raise DataError(f"{path}: not a directory", hint)
        build = _folder_dataset_class()
        self._crop_holder = _CropHolder(self._make_crop(self.resolution(self._epoch)))
        self.dataset = build(path, self._transform())
        self.class_names = list(self.dataset.classes)
        self.num_classes = len(self.class_names)
        self._indices = subset_indices(len(self.dataset), cfg.limit)
        self.subset: Any = Subset(self.dataset, self._indices.tolist())
        if self.deterministic and self.train:
            self.subset = _KeyedSubset(self.subset, self.seed)
        self.num_samples = len(self.subset)
        on_gpu = self.device.type == "cuda"
        self._pin = on_gpu
        self._mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._inv_std = 1.0 / (torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1) * 255)
        self._generator = torch.Generator()
        self._sampler = self._make_sampler()
        self._dataloader = self._make_dataloader()

    def _make_crop(self, res: int) -> Any:
        if self.train:
            return FFCVRandomResizedCrop(res, self.cfg.augment.scale, self.cfg.augment.ratio)
        return FFCVCenterCrop(res, self.cfg.center_crop_ratio)

    def _transform(self) -> Any:
        from torchvision import transforms as T

        steps: list[Any] = [self._crop_holder]
        aug = self.cfg.augment
        if self.train:
            if aug.hflip:
                steps.append(T.RandomHorizontalFlip())
            if aug.color_jitter > 0:
                c = aug.color_jitter
                steps.append(T.ColorJitter(brightness=c, contrast=c, saturation=c))
            if aug.randaugment:
                steps.append(T.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
        steps.append(T.PILToTensor())  # uint8: 4x less to move between processes than float
        return T.Compose(steps)

    def _make_sampler(self) -> Any:
        from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

        n = len(self.subset)
        if self.distributed and self.train:
            return DistributedSampler(
                self.subset,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=self.cfg.order != "sequential",
                seed=self.seed,
                drop_last=False,
            )
        if self.distributed:
            return _ShardSampler(n, self.rank, self.world_size)
        if self.train and self.cfg.order != "sequential":
            return RandomSampler(self.subset, generator=self._generator)
        return SequentialSampler(self.subset)

    def _make_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        return DataLoader(
            self.subset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self._pin,
            drop_last=self.drop_last,
            generator=self._generator,
            prefetch_factor=self.cfg.batches_ahead if self.cfg.num_workers > 0 else None,
            persistent_workers=False,  # workers must see each epoch's crop size
        )

    def __len__(self) -> int:
        return len(self._dataloader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        epoch = self._epoch
        self._crop_holder.crop = self._make_crop(self.resolution(epoch))
        if isinstance(self.subset, _KeyedSubset):
            self.subset.epoch = epoch  # workers get a copy each epoch (persistent_workers=False)
        self._generator.manual_seed(seed_for(self.seed) * 1000 + epoch)
        if hasattr(self._sampler, "set_epoch"):
            self._sampler.set_epoch(epoch)
        for index, (images, labels) in enumerate(self._dataloader):
            images = images.to(self.device, non_blocking=self._pin).contiguous(memory_format=torch.channels_last)
            images = (images.float() - self._mean) * self._inv_std
            labels = labels.to(self.device, dtype=torch.int64, non_blocking=self._pin).contiguous()
            yield self._augment_batch(images, index), labels
        self._finish_epoch()


class _KeyedSubset:
    """Deterministic mode: torch's RNG is seeded from (seed, epoch, sample) before each sample's
    transforms, so crops, flips and jitter do not depend on which worker loads the sample."""

    def __init__(self, subset: Any, seed: int) -> None:
        self.subset, self.seed, self.epoch = subset, seed, 0

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int) -> Any:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(keyed_seed("sample", self.seed, self.epoch, int(i)))
            return self.subset[i]


class _CropHolder:
    """The current epoch's crop; workers start each epoch with a copy (persistent_workers=False)."""

    def __init__(self, crop: Any) -> None:
        self.crop = crop

    def __call__(self, img: Any) -> Any:
        return self.crop(img)


# --------------------------------------------------------------------------- entry point


def build_loader(
    cfg: DataConfig,
    split: Split,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    distributed: bool | None = None,
    clone: bool = False,
    deterministic: bool = False,
) -> Loader:
    """The train or val loader for `cfg.backend`; `distributed=None` shards iff a process group exists.

    FFCV images live in reused buffers: a batch stays valid until the next-but-one batch is
    requested; pass `clone=True` to keep batches longer. `deterministic=True` makes every
    augmentation a function of (seed, epoch, sample or batch, rank): the same batches for any
    worker or thread count and after a resume (README, "Determinism").
    """
    import torch

    if split not in ("train", "val"):
        raise ConfigError(f"split {split!r}: expected 'train' or 'val'")
    raw = cfg.train_path if split == "train" else cfg.val_path
    if not raw:
        raise ConfigError(f"data.{split}_path is not set", f"set data.{split}_path to a .beton or ImageFolder")

    # With data.cache_dir set, shared (NFS / s3://) data is read from a node-local copy.
    path = local_data_path(str(raw), cfg.cache_dir)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dist_on, rank, world = _auto_distributed(distributed)
    args = (cfg, split, dev, seed, dist_on, rank, world, clone, deterministic)
    if deterministic:
        check_deterministic_augment(cfg)
    if cfg.backend == "ffcv":
        if path.is_dir():
            raise DataError(
                f"{path}: is a folder, FFCV reads .beton files",
                f"run `cmx data convert {path} {path.name}.beton`, or set data.backend=torchvision",
            )
        return FFCVLoader(path, *args)
    return TorchvisionLoader(path, *args)
