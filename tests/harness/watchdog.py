"""What a hung test was waiting for, printed before pytest-timeout ends the run.

pytest-timeout (``timeout_method = thread``) prints every thread's stack and
exits.  For a test on the Twisted reactor that stack is the reactor's poll: the
test's own coroutines are suspended, not running, so no thread's stack shows
them.  :func:`describe_waits` finds them (every suspended coroutine and
``inlineCallbacks`` generator of this project's code, with the line it waits at
and what it awaits), and :class:`HangWatchdog` prints that, and the tails of the
test's homeserver logs, shortly before the timeout fires.

pytest-timeout does not cover what comes after the last test: pytest-twisted
stopping the reactor (every shutdown trigger of every in-process HomeServer)
and the interpreter's exit (joining threads and process pools).
:func:`arm_exit_watchdog` covers that: if the process is still alive some time
after the session finished, it prints every thread's stack, the reactor's
pending shutdown triggers and our suspended coroutines, then ends the process
with the session's own exit status.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OURS = (os.path.join(_ROOT, "tests") + os.sep, os.path.join(_ROOT, "synapse_fastjoin") + os.sep)


def _is_ours(filename: str) -> bool:
    return filename.startswith(_OURS)


def _short(obj: object, limit: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception as e:  # a repr that fails must not hide the rest
        text = f"<{type(obj).__name__}: repr failed: {e}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_waits(objects: Iterable[object] | None = None, limit: int = 60) -> list[str]:
    """One line per suspended coroutine or generator of ours:
    ``path:line in function, awaiting <what>``."""
    lines: list[str] = []
    for obj in gc.get_objects() if objects is None else objects:
        if isinstance(obj, types.CoroutineType):
            frame, awaiting = obj.cr_frame, obj.cr_await
        elif isinstance(obj, types.GeneratorType):
            if obj.gi_running:
                continue
            frame, awaiting = obj.gi_frame, obj.gi_yieldfrom
        else:
            continue
        if frame is None or frame.f_lasti < 0 or not _is_ours(frame.f_code.co_filename):
            continue  # finished, never started, or not ours
        if frame.f_code.co_name.startswith("pytest_"):
            continue  # a pytest hook wrapper (this report's own, say)
        where = f"{os.path.relpath(frame.f_code.co_filename, _ROOT)}:{frame.f_lineno} in {frame.f_code.co_name}"
        lines.append(f"{where}, awaiting {_short(awaiting)}" if awaiting is not None else where)
    lines.sort()
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


class HangWatchdog:
    """Calls ``report(lines)`` after ``delay`` seconds unless cancelled first."""

    def __init__(self, delay: float, report: Callable[[list[str]], None],
                 extra: Callable[[], list[str]] = list) -> None:
        self._timer = threading.Timer(delay, self._fire, (report, extra))
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    @staticmethod
    def _fire(report: Callable[[list[str]], None], extra: Callable[[], list[str]]) -> None:
        try:
            lines = ["what the test's own code waits for:"]
            lines += ["  " + line for line in describe_waits()] or ["  (nothing of ours suspended)"]
            lines += extra()
        except Exception as e:  # the report must not be what breaks
            lines = [f"hang report failed: {type(e).__name__}: {e}"]
        report(lines)


def write_to_terminal(config: object, lines: list[str]) -> None:
    """Write past pytest's capture, as pytest-timeout's own dump does: the
    capture is suspended for the write and resumed after it."""
    capman = config.pluginmanager.getplugin("capturemanager")  # type: ignore[attr-defined]
    text = "\n" + "+" * 30 + " hang report " + "+" * 30 + "\n" + "\n".join(lines) + "\n"
    if capman is not None:
        capman.suspend_global_capture(in_=True)
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    finally:
        if capman is not None:
            capman.resume_global_capture()


#: Printed first by the exit watchdog; scripts/test looks for it.
EXIT_HANG_BANNER = "+" * 30 + " exit hang report " + "+" * 30


def reactor_shutdown_state() -> list[str]:
    """The global reactor's shutdown triggers still to run or still running:
    a "before" trigger whose Deferred never fires keeps the reactor (and so
    pytest) from stopping."""
    try:
        from twisted.internet import reactor

        event = getattr(reactor, "_eventTriggers", {}).get("shutdown")
    except Exception as e:
        return [f"reactor: {type(e).__name__}: {e}"]
    if event is None:
        return ["reactor: no shutdown triggers"]
    # While the "before" phase waits, `finishedBefore` holds the triggers it
    # called (one of their Deferreds has not fired); `before` those not called.
    lines = [
        f"reactor running={getattr(reactor, 'running', '?')}, shutdown phase {event.state!r}; "
        f"\"before\" triggers called: {len(event.finishedBefore)}"
    ]
    for call, _args, _kwargs in event.finishedBefore:
        lines.append(f"  before (called, its Deferred may be what waits): {_short(call)}")
    for phase in ("before", "during", "after"):
        for call, _args, _kwargs in getattr(event, phase):
            lines.append(f"  {phase}: {_short(call)}")
    return lines


def arm_exit_watchdog(delay: float, exit_status: int, config: object) -> threading.Timer:
    """After `delay` seconds, if the process is still alive: print the exit
    hang report past pytest's capture, then `os._exit(exit_status)`. A daemon
    timer: it never keeps the process alive itself."""

    def fire() -> None:
        lines = [
            EXIT_HANG_BANNER,
            f"pytest finished its tests (exit status {exit_status}) {delay:.0f} s ago "
            "but the process has not exited; what it waits for:",
        ]
        try:
            lines += reactor_shutdown_state()
            lines.append("non-daemon threads still alive: " + (", ".join(
                t.name for t in threading.enumerate()
                if t.is_alive() and not t.daemon and t is not threading.main_thread()
            ) or "none"))
            lines.append("suspended coroutines of ours:")
            lines += ["  " + line for line in describe_waits()] or ["  none"]
        except Exception as e:  # the report must not be what breaks
            lines.append(f"exit hang report failed: {type(e).__name__}: {e}")
        capman = config.pluginmanager.getplugin("capturemanager")  # type: ignore[attr-defined]
        try:
            if capman is not None:
                capman.suspend_global_capture(in_=True)
            sys.stderr.write("\n" + "\n".join(lines) + "\nevery thread's stack:\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.write(EXIT_HANG_BANNER + "\n")
            sys.stderr.flush()
        finally:
            os._exit(exit_status)

    timer = threading.Timer(delay, fire)
    timer.daemon = True
    timer.name = "exit-watchdog"
    timer.start()
    return timer
