"""SIGTERM for every cmx command: unwind like Ctrl-C, and never hang on the way out.

A SIGTERM raises `Terminated` in the main thread, so every `finally` and context manager runs
(temp files removed, writer processes and servers stopped). A command whose cleanup is short
sets a grace period (`set_cleanup_grace`): if the process is still alive that long after the
signal (a lock left held by an interrupted `with`, a thread joined at exit), a watchdog prints
every thread's stack, kills the process's multiprocessing children and exits with 143.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the cmx process: it unwinds like Ctrl-C."""


_main_pid = 0
_cleanup_grace_s: float | None = None


def set_cleanup_grace(seconds: float | None) -> None:
    """After a SIGTERM, allow the cleanup `seconds` before the watchdog ends the process (None: no limit)."""
    global _cleanup_grace_s
    _cleanup_grace_s = seconds


def _watchdog(seconds: float) -> None:
    """End the process `seconds` from now unless it has exited by then."""

    def expire() -> None:
        sys.stderr.write(f"cmx: cleanup after SIGTERM took over {seconds:.0f} s; stacks follow, exiting\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(EXIT_CODE)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _main_pid:  # a forked worker inherited the handler: die as a worker does
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    if _cleanup_grace_s is not None:
        _watchdog(_cleanup_grace_s)
    raise Terminated


def _unraisable(hook: Any) -> Any:
    """Where Python swallows exceptions (at-fork callbacks, `__del__`), a swallowed `Terminated`
    is raised again: the signal is re-sent to this process, to arrive in ordinary code."""

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, Terminated) or os.getpid() != _main_pid:
            hook(info)
            return
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:
            return  # not the main thread: the handler stays ignored, the cleanup already runs
        # From another thread, a moment later: sent from here it would be swallowed again.
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()

    unraisable.cmx_terminated = True  # type: ignore[attr-defined]
    return unraisable


def install_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in this (the main) process."""
    global _main_pid
    _main_pid = os.getpid()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a test's thread): keep the default
        return
    if not getattr(sys.unraisablehook, "cmx_terminated", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def was_terminated(e: BaseException) -> bool:
    """Whether `e` is, or was raised while handling, a SIGTERM."""
    return any(isinstance(x, Terminated) for x in (e, e.__cause__, e.__context__))
