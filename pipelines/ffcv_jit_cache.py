"""numba's on-disk cache for what FFCV compiles, which FFCV never asks for.

Without it every fresh process compiles for ~4 s at `import ffcv` (numba's typed dict) and again
at a loader's first batch (each op of the pipeline). `enable_jit_cache()` turns the cache on for
both, before `import ffcv`. Two things kept FFCV's image decoders out of numba's cache, and both
are handled here:

- FFCV calls its C library (`ffcv._libffcv`: JPEG decode, resize, memcpy) through ctypes function
  pointers; numba embeds such an address in the machine code and refuses to cache it ("dynamic
  globals"). The same C functions get names of ours in LLVM's symbol table (`add_symbol`: this
  process only, nothing made global) and are called as numba external functions, so the code
  refers to a name that each process binds to its own copy of the library before loading anything.
- numba keys a closure's cache entry by pickling the closure's values, and a jitted function
  pickles with a random id: a decoder holding compiled helpers (every FFCV decoder does) got a new
  key, a new entry and a new compile in every process. Such closures are keyed by what the helpers
  are (module, name, bytecode, source file stamp, their own closures, options) instead.

The numba and FFCV internals used are read and tested in the ranges pyproject pins.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmx.core.errors import CmxError
from cmx.core.paths import jit_cache_dir
from cmx.core.versions import checked_version

log = logging.getLogger(__name__)

# The numba releases whose dispatcher cache this module was read in and tested with.
NUMBA_TESTED = ((0, 60), (0, 69))
JIT_CACHE_ENV = "CMX_JIT_CACHE"  # 0/false/off: compile in every process, as FFCV does alone

# ----------------------------------------------------------------------------- libffcv by name

# Our names for libffcv's symbols: unique, so no other library's `resize` can answer for them.
_PREFIX = "cmx_ffcv_"

# libffcv's argtypes as FFCV 1.0.2 declares them, per C symbol: what the signatures below mirror.
_DECLARED = {
    "imdecode": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    + [ctypes.c_uint32] * 6
    + [ctypes.c_bool] * 2,
    "resize": [ctypes.c_int64] * 11,
    "my_memcpy": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64],
}


@functools.cache
def _by_name() -> dict[str, Callable[..., Any]]:
    """FFCV's three ctypes-calling functions, rewritten to call libffcv's C symbols by our names."""
    from numba import types

    ptr = types.uintp  # pointers travel as integers (arr.ctypes.data), as in FFCV's ctypes calls
    u32 = types.uint32
    cbool = types.uint8  # C `bool`: one byte holding 0 or 1
    c_imdecode: Any = types.ExternalFunction(
        _PREFIX + "imdecode",
        types.int32(ptr, types.uint64, u32, u32, ptr, u32, u32, u32, u32, u32, u32, cbool, cbool),
    )
    c_resize: Any = types.ExternalFunction(_PREFIX + "resize", types.void(*(11 * [types.int64])))
    c_memcpy: Any = types.ExternalFunction(_PREFIX + "my_memcpy", types.void(ptr, ptr, types.uint64))

    def imdecode(
        source: Any,
        dst: Any,
        source_height: Any,
        source_width: Any,
        crop_height: Any = None,
        crop_width: Any = None,
        offset_x: Any = 0,
        offset_y: Any = 0,
        scale_factor_num: Any = 1,
        scale_factor_denom: Any = 1,
        enable_crop: Any = False,
        do_flip: Any = False,
    ) -> Any:
        return c_imdecode(
            source.ctypes.data,
            source.size,
            source_height,
            source_width,
            dst.ctypes.data,
            crop_height,
            crop_width,
            offset_x,
            offset_y,
            scale_factor_num,
            scale_factor_denom,
            enable_crop,
            do_flip,
        )

    def resize_crop(source: Any, start_row: Any, end_row: Any, start_col: Any, end_col: Any, destination: Any) -> None:
        c_resize(
            0,
            source.ctypes.data,
            source.shape[0],
            source.shape[1],
            start_row,
            end_row,
            start_col,
            end_col,
            destination.ctypes.data,
            destination.shape[0],
            destination.shape[1],
        )

    def memcpy(source: Any, dest: Any) -> None:
        c_memcpy(source.ctypes.data, dest.ctypes.data, source.size * source.itemsize)

    return {"imdecode": imdecode, "resize_crop": resize_crop, "memcpy": memcpy}


def bind_libffcv() -> dict[Callable[..., Any], Callable[..., Any]]:
    """FFCV's ctypes-calling functions -> ours, once libffcv's symbols are bound under our names.

    Same arguments, same C calls. Empty (FFCV's own functions stay, compiled in every process)
    when the installed FFCV declares other C signatures than ours were written for. Imports ffcv.
    """
    import ffcv.libffcv as libffcv
    import llvmlite.binding as llvm

    for symbol, argtypes in _DECLARED.items():
        if list(getattr(libffcv.lib, symbol).argtypes or []) != argtypes:
            log.info("FFCV's %s takes other C arguments than cmx expects: decoders compile uncached", symbol)
            return {}
    for symbol in _DECLARED:
        llvm.add_symbol(_PREFIX + symbol, ctypes.cast(getattr(libffcv.lib, symbol), ctypes.c_void_p).value)
    return {getattr(libffcv, name): fn for name, fn in _by_name().items()}


# ----------------------------------------------------------------------------- closure keys


def _file_backed(fn: Any) -> bool:
    """Whether numba can key a cache entry on `fn`'s source file (not code made by `exec`)."""
    code = getattr(fn, "__code__", None)
    return code is not None and Path(code.co_filename).is_file()


_UNKNOWN = object()  # what `_stable` gives for a jitted function it cannot describe


def _stable(value: Any, depth: int = 0) -> Any:
    """`value` with each jitted function replaced by what it is; `_UNKNOWN` when that cannot be said."""
    from numba.core.dispatcher import Dispatcher
    from numba.core.types import Type

    if isinstance(value, Type):  # pickles with a per-process id; its name says what it is
        return ("numba.type", type(value).__qualname__, str(value))
    if not isinstance(value, Dispatcher):
        return value
    fn = value.py_func
    if depth > 8 or not _file_backed(fn):
        return _UNKNOWN
    st = os.stat(fn.__code__.co_filename)
    inner = [_stable(c.cell_contents, depth + 1) for c in fn.__closure__ or ()]
    if any(v is _UNKNOWN for v in inner):
        return _UNKNOWN
    return (
        "numba.jit",
        fn.__module__,
        fn.__qualname__,
        hashlib.sha256(fn.__code__.co_code).hexdigest(),
        (st.st_mtime_ns, st.st_size),  # numba's own stamp for a source file
        tuple(inner),
        repr(sorted(value.targetoptions.items())),
    )


def closure_key(dispatcher: Any) -> str | None:
    """A cache key for a numba `dispatcher`'s closure and options, the same in every process;
    None for code made by `exec`, helpers it cannot describe or closure values that do not pickle."""
    from numba.core.serialize import dumps

    described = _stable(dispatcher)
    if described is _UNKNOWN:
        return None
    try:
        return hashlib.sha256(dumps(described)).hexdigest()
    except Exception:  # a closure value that does not pickle: leave it uncached
        return None


@functools.cache
def closure_keyed_cache_class() -> type:
    """numba's cache for one function, with its closure keyed by `closure_key` instead of by pickle."""
    from numba.core.caching import FunctionCache

    class ClosureKeyedCache(FunctionCache):
        def __init__(self, py_func: Any, key: str) -> None:
            super().__init__(py_func)
            self._closure_key = key

        def _index_key(self, sig: Any, codegen: Any) -> Any:
            code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
            return (sig, codegen.magic_tuple(), (code, self._closure_key))

    return ClosureKeyedCache


# ----------------------------------------------------------------------------- turning it on

_jit_cache: Path | None = None


def enable_jit_cache() -> Path | None:
    """Keep what FFCV compiles in numba's on-disk cache (`jit_cache_dir()`); call before `import ffcv`.

    The entries are keyed by source, closure and argument types, so a pipeline with other sizes or
    options compiles its own. Returns the cache folder, or None where it stays off:
    `CMX_JIT_CACHE=0`, a numba outside the tested range, or a folder that cannot be written.
    """
    global _jit_cache
    if _jit_cache is not None:
        return _jit_cache
    if os.environ.get(JIT_CACHE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    try:
        checked_version("numba", "numba", NUMBA_TESTED, CmxError, missing_hint="", install_hint="")
    except CmxError as e:
        log.info("numba's cache stays off: %s", e.message)
        return None
    import numba.typed.typeddict as typeddict
    from numba.core import config as numba_config
    from numba.core.dispatcher import Dispatcher
    from numba.core.errors import NumbaWarning

    folder = jit_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        log.info("numba's cache stays off: %s is not a writable folder", folder)
        return None
    numba_config.CACHE_DIR = str(folder)  # type: ignore[attr-defined]  # read when a cache is made
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)
    for fn in vars(typeddict).values():
        if isinstance(fn, Dispatcher):
            fn.enable_caching()
    from ffcv.pipeline.compiler import Compiler  # imports ffcv: its typed dict now loads from the cache

    compile_uncached = Compiler.compile.__func__
    by_name = bind_libffcv()

    def compile_cached(cls: Any, code: Any, signature: Any = None) -> Any:  # cls: FFCV's Compiler
        # Ours only run compiled; with FFCV's compiler off (its debug mode) its own Python runs.
        compiled = compile_uncached(cls, by_name.get(code, code) if cls.is_enabled else code, signature)
        if isinstance(compiled, Dispatcher) and signature is None:
            key = closure_key(compiled)
            if key is not None:  # compiled lazily, at the first call: from the cache if there
                compiled._cache = closure_keyed_cache_class()(compiled.py_func, key)  # type: ignore[attr-defined]  # as enable_caching does
        return compiled

    Compiler.compile = classmethod(compile_cached)
    _jit_cache = folder
    return folder
