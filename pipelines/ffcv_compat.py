"""FFCV's internals, reached only through this module, for the version range they were read in.

cmx relies on four private parts of FFCV 1.0.2, each for a trap that otherwise hangs forever
(docs/architecture.md, FFCV):
- `DatasetWriter._write_common`: FFCV waits for workers that may have died; `watched_writer_class`
  replaces it with a loop that watches them;
- `EpochIterator`: FFCV's epoch thread dies silently on an exception and leaks when an epoch is
  left early; `guarded_epoch_iterator_class` reports errors and always stops it;
- `PipelineSpec`/`Graph`: a compiled op after a plain one loops forever inside `Loader()`;
  `check_pipeline_order` finds such orders with FFCV's own requirement pass first;
- `Loader.__iter__`'s internals (traversal order, code generation, epoch counter): `start_epoch`
  starts an epoch with the guarded iterator and without FFCV's torch thread change.
`ffcv_imported()` turns on numba's on-disk cache for what FFCV compiles first (`ffcv_jit_cache`).
`ffcv_imported()` checks the installed version against `TESTED` before anything else is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cmx.core.errors import ConfigError, DataError
from cmx.core.versions import checked_version
from cmx.pipelines.ffcv_deterministic import kernels
from cmx.pipelines.ffcv_jit_cache import enable_jit_cache

log = logging.getLogger(__name__)

# The FFCV releases these internals were read in and tested against (pyproject pins the same range).
TESTED = ((1, 0, 2), (1, 1, 0))  # [low, high)


def check_version() -> str:
    """The installed FFCV version; DataError (one line) outside the tested range."""
    # From the package metadata: ffcv.__version__ is wrong in 1.0.2.
    return checked_version(
        "ffcv",
        "FFCV",
        TESTED,
        DataError,
        missing_hint="run `make setup` (or use data.backend=torchvision)",
        install_hint="install a tested release: pip install 'ffcv>=1.0.2,<1.1'",
    )


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Undo any `torch.set_num_threads` done inside (ffcv sets it to its worker count)."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@contextlib.contextmanager
def ffcv_imported() -> Iterator[Any]:
    """`import ffcv` (4.4 s here) without its side effect: it sets torch to 1 thread on import.

    numba's on-disk cache is on first (`enable_jit_cache`): with it, the import takes ~1 s.
    """
    check_version()
    with keep_torch_threads():
        try:
            enable_jit_cache()
            yield importlib.import_module("ffcv")
        except ImportError as e:
            raise DataError(
                f"FFCV is not importable ({e})",
                "run `make setup` (or use data.backend=torchvision)",
            ) from None


def check_pipeline_order(path: str | Path, pipelines: dict[str, list[Any]]) -> None:
    """Reject a compiled FFCV op after a plain one, before FFCV sees the pipeline.

    FFCV 1.0.2's `Graph.group_operations` never empties its `next_front` set, so a pipeline that
    needs a third stage (compiled -> plain -> compiled, e.g. NormalizeImage after ToTorchImage on
    CPU) loops forever inside `Loader()` itself. We compute each op's compiled/plain state with
    FFCV's own `collect_requirements` (which does not loop) and refuse such orders.
    """
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.graph import Graph
    from ffcv.reader import Reader

    reader = Reader(str(path))
    # PipelineSpec pops the decoder off the list it is given: hand it copies.
    specs = {name: PipelineSpec(name, decoder=None, transforms=list(ops)) for name, ops in pipelines.items()}
    f_ix = {name: i for i, name in enumerate(reader.handlers)}
    graph = Graph(specs, reader.handlers, f_ix, reader.metadata, None)
    graph.collect_requirements()  # sets each TransformNode's `jitted` from its declared state
    for output, leaf in graph.leaf_nodes.items():
        chain, node = [], leaf
        while node is not None:
            chain.append(node)
            node = node.parent
        seen_plain = None
        for node in reversed(chain):
            op = getattr(node, "operation", None) or getattr(node, "decoder", None)
            if node.is_jitted is False and seen_plain is None:
                seen_plain = type(op).__name__
            elif node.is_jitted and seen_plain is not None:
                raise ConfigError(
                    f"FFCV pipeline {output!r}: compiled {type(op).__name__} after plain {seen_plain}; "
                    "FFCV 1.0.2 loops forever on this",
                    "on CPU put NormalizeImage before ToTensor (only after ToDevice(cuda) may it follow)",
                )


_FAILED = object()

# The first batch of a new Loader JIT-compiles for 6-12 s on a 2-core CPU; ten times a slow one.
BATCH_TIMEOUT_S = 300.0


def guarded_epoch_iterator_class() -> type:
    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator

    class GuardedEpochIterator(EpochIterator):
        """FFCV's epoch thread with errors reported, no torch thread changes, and a clean stop."""

        error: BaseException | None = None
        current_batch_slot: int  # FFCV's own attributes, declared for the type checker
        closed: bool

        def _put(self, item: Any) -> bool:
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    pass
            return False

        def run(self) -> None:
            import numba

            events: list[Any] = [None] * len(self.cuda_streams)
            slots = self.loader.batches_ahead + 2
            try:
                # FFCV calls Compiler.set_num_threads here, which also sets torch's thread count.
                # numba.config's settings are set at import time: its type stub has no attributes.
                max_threads = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
                numba.set_num_threads(max(1, min(self.loader.num_workers, max_threads)))
                fill_epoch_keys(self)  # this epoch's (seed, epoch) for keyed (deterministic) decoders
                for b_ix, ixes in enumerate(self.iter_ixes):
                    slot = self.current_batch_slot
                    self.current_batch_slot = (slot + 1) % slots
                    result = self.run_pipeline(b_ix, ixes, slot, events[slot])
                    if not self._put((slot, result)):
                        return
                    if IS_CUDA:  # same bookkeeping as FFCV: keep a slot until its batch is consumed
                        import torch

                        event = torch.cuda.Event()
                        event.record(self.current_stream)
                        events[(slot - self.loader.batches_ahead - 1) % slots] = event
                self._put(None)
            except BaseException as e:  # reported to the consumer instead of dying silently
                self.error = e
                self._put(_FAILED)

        def next_batch(self, fname: str) -> tuple[Any, ...] | None:
            waited_since = time.monotonic()
            while True:
                try:
                    item = self.output_queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self.is_alive() and self.output_queue.empty():
                        raise DataError(
                            f"{fname}: FFCV loader thread stopped", "re-run; report if it repeats"
                        ) from None
                    if time.monotonic() - waited_since > BATCH_TIMEOUT_S:
                        # e.g. FFCV's page reader blocks forever on a failed read of the file
                        raise DataError(
                            f"{fname}: no batch from FFCV for {BATCH_TIMEOUT_S:.0f} s",
                            "check the file's storage (`cmx data verify`)",
                        ) from None
            if item is None:
                return None
            if item is _FAILED:
                err = self.error
                raise DataError(
                    f"{fname}: decoding failed ({type(err).__name__}: {err})",
                    "run `cmx data verify` on the file",
                ) from err
            slot, result = item
            if IS_CUDA:
                self.current_stream.wait_stream(self.cuda_streams[slot])
            return result

        def shutdown(self, timeout: float = 30.0) -> None:
            self.terminate_event.set()
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    while True:
                        self.output_queue.get_nowait()
                self.join(0.05)
            if self.is_alive():
                log.warning("FFCV epoch thread did not stop within %.0f s", timeout)
                return  # its buffers stay mapped: freeing them under a running thread would crash
            if not self.closed:
                self.closed = True
                self.memory_context.__exit__(None, None, None)

        def close(self) -> None:  # FFCV's close frees buffers even while the thread runs
            self.shutdown()

    return GuardedEpochIterator


def _guarded_worker(errors: Any, started: Any, slot: int, work_fn: Callable[..., None], *args: Any) -> None:
    """Run one FFCV writer worker; an exception is reported to the parent instead of hanging it.

    `started[slot]` is set first: a fork that never gets this far is replaced by the parent.
    """
    started[slot] = True
    try:
        work_fn(*args)
    except BaseException as e:  # the parent must hear about every way a worker stops
        message = e.one_line() if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
        errors.put(message)
        sys.exit(1)


def start_epoch(loader: Any, epoch: int, iterator_cls: type) -> Any:
    """FFCV's `Loader.__iter__` for `epoch`, with `iterator_cls` (the guarded iterator) as its thread.

    FFCV's own `__iter__` also resets torch's thread count; the traversal order, the compiled
    pipeline and the epoch counter are FFCV internals, hence here.
    """
    loader.next_epoch = epoch
    order = loader.next_traversal_order()
    selected = order[: len(loader) * loader.batch_size]
    loader.next_epoch += 1
    if loader.code is None or loader.recompile:
        loader.generate_code()
    return iterator_cls(loader, selected)


def watched_writer_class() -> type:
    """FFCV's DatasetWriter with `_write_common` replaced by a watched version.

    FFCV's own loop waits `while done != num_samples: sleep(0.1)`: a worker that raises (a non-RGB
    or non-uint8 image, a page overflow) leaves it waiting forever (docs/architecture.md, FFCV).
    """
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class WatchedWriter(DatasetWriter):
        stall_timeout: float = 600.0
        start_timeout: float = 20.0
        on_progress: Callable[[int], None] = staticmethod(lambda n: None)

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            ctx = mp.get_context("fork")  # FFCV passes shared memory and an allocator by inheritance
            self.num_samples = num_samples
            self.prepare()
            procs: list[Any] = []
            try:
                workqueue = ctx.Queue()
                for todo in queue_content:
                    workqueue.put(todo)
                for _ in range(self.num_workers):
                    workqueue.put(None)
                allocations_queue, errors = ctx.Queue(), ctx.Queue()
                done_number = ctx.Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (
                    workqueue,
                    self.metadata_sm,
                    self.metadata_type,
                    self.fields,
                    allocator,
                    done_number,
                    allocations_queue,
                    *extra_worker_args,
                )
                started = ctx.RawArray(ctypes.c_bool, self.num_workers)

                def start(slot: int) -> Any:
                    args = (errors, started, slot, work_fn, *worker_args)
                    proc = ctx.Process(target=_guarded_worker, args=args, daemon=True)
                    proc.start()
                    return proc

                procs = [start(slot) for slot in range(self.num_workers)]
                self._replace_unstarted(procs, started, start)
                self._watch(procs, errors, done_number, num_samples)
                allocations: list[Any] = []
                while len(allocations) < len(procs):
                    try:
                        allocations.append(allocations_queue.get(timeout=0.2))
                    except queue.Empty:
                        self._check_workers(procs, errors, finished=False)
                for p in procs:
                    p.join(timeout=30)
                self.finalize([a for chunk in allocations for a in chunk])
            finally:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                        p.join(timeout=5)
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _replace_unstarted(self, procs: list[Any], started: Any, start: Callable[[int], Any]) -> None:
            """Replace, in place, each worker that has not reached its first line `start_timeout`
            after the fork: a fork of a threaded parent (an in-process Ray, gRPC) can stick on a
            lock it copied before touching any queue, and would otherwise be waited for for ever."""
            for _attempt in range(3):
                deadline = time.monotonic() + self.start_timeout
                while not all(started) and time.monotonic() < deadline:
                    time.sleep(0.02)
                stuck = [slot for slot in range(len(procs)) if not started[slot]]
                if not stuck:
                    return
                for slot in stuck:
                    procs[slot].kill()
                    procs[slot].join(timeout=5)
                    procs[slot] = start(slot)
            raise DataError(
                f"{self.fname}: FFCV writer processes did not start within {self.start_timeout:.0f} s",
                "convert in a fresh process (`cmx data convert`)",
            )

        def _check_workers(self, procs: list[Any], errors: Any, finished: bool) -> None:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if not dead and not (finished and all(p.exitcode == 0 for p in procs)):
                return
            try:
                message = errors.get(timeout=1.0)
            except queue.Empty:
                code = dead[0].exitcode if dead else 0
                message = f"a writer process stopped (exit code {code})"
            raise DataError(f"{self.fname}: FFCV writer failed: {message}", "fix the input and re-run")

        def _watch(self, procs: list[Any], errors: Any, done_number: Any, total: int) -> None:
            previous, last_change = 0, time.monotonic()
            while True:
                done = int(done_number.value)
                if done != previous:
                    self.on_progress(done - previous)
                    previous, last_change = done, time.monotonic()
                if done >= total:
                    return
                self._check_workers(procs, errors, finished=True)
                if time.monotonic() - last_change > self.stall_timeout:
                    raise DataError(
                        f"{self.fname}: FFCV writer made no progress for {self.stall_timeout:.0f} s",
                        "check disk space and memory, then re-run",
                    )
                time.sleep(0.05)

    return WatchedWriter


@functools.cache
def keyed_crop_decoder_class() -> type:
    """FFCV's random-resized-crop decoder with crops and flips keyed by (seed, epoch, sample index).

    Deterministic mode (`ffcv_deterministic`): the decode loop is FFCV 1.0.2's
    `ResizedCropRGBImageDecoder.generate_code` with `get_random_crop` replaced by the keyed crop,
    plus the flip. The epoch reaches the compiled code through a small (seed, epoch) buffer of the
    decoder's own that `fill_epoch_keys` writes at each epoch's start: the code is compiled once,
    and closure values would be frozen into it.
    """
    with ffcv_imported():
        from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, imdecode, resize_crop
        from ffcv.pipeline.allocation_query import AllocationQuery
        from ffcv.pipeline.compiler import Compiler

    k = kernels()

    class KeyedRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
        """Random resized crop + horizontal flip, keyed by (seed, epoch, sample)."""

        keyed = True  # what fill_epoch_keys looks for

        def __init__(self, output_size: tuple[int, int], scale: Any, ratio: Any, seed: int, flip_prob: float) -> None:
            super().__init__(output_size)
            self.scale, self.ratio = tuple(scale), tuple(ratio)
            self.seed, self.epoch, self.flip_prob = int(seed), 0, float(flip_prob)

        @property
        def get_crop_generator(self) -> Any:  # FFCV's abstract hook; decode below calls the keyed crop
            return k.keyed_crop

        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, Any]:
            state, (out, temp) = super().declare_state_and_memory(previous_state)
            return state, (out, temp, AllocationQuery((2,), np.dtype("<u8")))

        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            crop_c, flip_c = k.keyed_crop, k.flip_columns_  # already numba dispatchers
            scale = np.array(self.scale, dtype=np.float64)
            ratio = np.array(self.ratio, dtype=np.float64)
            flip_prob = self.flip_prob

            def decode(batch_indices: Any, my_storage: Any, metadata: Any, storage_state: Any) -> Any:
                destination, temp_storage, keys = my_storage
                seed, epoch = keys[0, 0], keys[0, 1]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j, h, w, flip = crop_c(height, width, scale, ratio, seed, epoch, np.uint64(source_ix), flip_prob)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                    if flip:
                        flip_c(destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True  # type: ignore[attr-defined]
            return decode

    return KeyedRandomResizedCropDecoder


def fill_epoch_keys(iterator: Any) -> None:
    """Write each keyed decoder's (seed, epoch) into its key buffers for this epoch's iterator.

    Called by the epoch thread before its first batch; FFCV allocates an iterator's buffers anew
    every epoch, so no buffer carries an old epoch.
    """
    graph = iterator.loader.graph
    for node, node_id in graph.node_to_id.items():
        decoder: Any = getattr(node, "decoder", None)
        if not getattr(decoder, "keyed", False):
            continue
        for kind in ("operation", "shared"):
            buffers = iterator.memory_allocations.get(kind, {}).get(node_id)
            if isinstance(buffers, tuple) and len(buffers) == 3:
                buffers[2][..., 0] = np.uint64(decoder.seed % 2**64)
                buffers[2][..., 1] = np.uint64(decoder.epoch)
