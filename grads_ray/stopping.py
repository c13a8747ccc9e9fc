"""A clean stop on SIGTERM and SIGINT (``kill``, Ctrl-C, ``ray job stop``, Kubernetes, a scheduler).

The first signal raises :class:`Stopped` in the driver's main thread wherever it is waiting: no new
work is handed out, the stage unwinds (every part and marker is written atomically, temp file then
rename, so nothing half-written is left; a unit a scorer was writing is either there whole or not at
all), the local Ray the job started is shut down, and the CLI's last line says where it stopped and
that the same command resumes; exit 128 + the signal (143, 130). A second signal ends the process at
once. Ray installs its own SIGTERM handler when it starts (it prints a C++ stack dump), so the
handlers are installed again after Ray starts (:func:`install`); a signal while Ray starts is held
until it has (:func:`deferred`), so that nothing Ray began is left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):  # noqa: N818 - not an error: nothing that catches Exception may swallow it
    """The job was asked to stop by a signal. A KeyboardInterrupt, because that is what Ray's blocking
    calls (``ray.get`` inside Ray Train's ``fit``) check for while they wait and end on at once; any
    other exception raised by a signal handler there is only seen when the call returns. Ray may raise
    a plain KeyboardInterrupt in its place: :func:`as_stopped` recovers the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict = {"stopping": False, "signum": None}


def _handler(signum, frame) -> None:
    if _state["stopping"]:  # a second signal: now
        os._exit(128 + signum)
    _state["stopping"], _state["signum"] = True, signum
    raise Stopped(signum)


def as_stopped(exc: KeyboardInterrupt) -> Stopped:
    """The stop a KeyboardInterrupt stands for: ours, or Ray's in its place (the signal we saw, else SIGINT)."""
    if isinstance(exc, Stopped):
        return exc
    return Stopped(_state["signum"] or signal.SIGINT)


@contextlib.contextmanager
def deferred():
    """A signal that comes while Ray starts is held until it has started, then stops the job.

    Stopped half-way, ``ray.init`` leaves the processes it had begun (the node is not yet known to
    ``ray.shutdown``), and a half-done first ``import ray`` leaves a module nothing can use. Ray's
    own SIGTERM handler, which ``ray.init`` puts in place first thing and which exits mid-start, is
    kept out meanwhile (a Ray without that hook: its exit is taken for the signal). Our handlers
    are back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hold(signum, frame) -> None:
        if _state["signum"] is not None:  # a second signal: now
            os._exit(128 + signum)
        _state["signum"] = signum

    for sig in SIGNALS:
        signal.signal(sig, hold)
    ray_utils = _ray_utils()
    ray_sets = getattr(ray_utils, "set_sigterm_handler", None)
    if ray_sets is not None:  # ray.init puts in its own first thing, which exits mid-start: not now
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    except SystemExit as exc:  # another Ray, whose handler was put in place after all
        if exc.code != signal.SIGTERM:
            raise
        _state["signum"] = signal.SIGTERM
    finally:
        if ray_sets is not None:
            ray_utils.set_sigterm_handler = ray_sets
        install()
    if _state["signum"] is not None:
        _state["stopping"] = True
        raise Stopped(_state["signum"])


def _ray_utils():
    try:
        import ray._private.utils as ray_utils
    except ImportError:
        return None
    return ray_utils


def install() -> None:
    """Our handlers for SIGTERM and SIGINT (from the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def reset() -> None:
    """For an in-process caller that runs the job again (the tests)."""
    _state["stopping"], _state["signum"] = False, None
