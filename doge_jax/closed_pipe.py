"""A trainer's log pipe closing under it (`train ... | head`, a dead `tee` or log collector) stops the run as SIGTERM
does, with a checkpoint, instead of a BrokenPipeError ending it without one. No JAX here: doge_torch.train uses it.

While `guarded_output()` is active, a write to a closed stdout or stderr discards that stream's output from then on
(its file descriptor points at /dev/null) and is recorded; the trainers check `output_closed()` after each step."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import sys
from collections.abc import Iterator

# the exit status of a run stopped by a closed pipe, as the shell reports a process ended by SIGPIPE
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE
_CLOSED: list[str] = []  # the guarded streams ("stdout", "stderr") found closed


_GUARDED: list = []  # the active _Guarded streams


def output_closed() -> bool:
    """Whether a guarded stdout/stderr found its pipe closed in this process: by a write, or (without one, so a
    reader gone during start-up stops the run after its first step, not after the first line it prints) by
    polling a pipe's write end, which reports an error once its reader has closed (POSIX poll)."""
    for g in _GUARDED:
        if g._name not in _CLOSED and g._reader_gone():
            g._closed()
    return bool(_CLOSED)


class _Guarded:
    """A text stream whose writes to a closed pipe send it to /dev/null from then on, and record that."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name

    def _closed(self) -> None:
        _CLOSED.append(self._name)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:  # (the descriptor, so that tqdm, warnings and C++ logs writing to it are quiet too)
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass  # a stream without a descriptor: its own writes are dropped below
        finally:
            os.close(devnull)

    def _reader_gone(self) -> bool:
        try:
            fd = self._stream.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
            poller = select.poll()
            poller.register(fd, select.POLLOUT)  # (asked for: some kernels report only what is registered)
            return any(ev & select.POLLERR for _, ev in poller.poll(0))  # (POLLHUP: a read end's writers gone)
        except (OSError, ValueError, AttributeError):  # no descriptor, no poll (Windows)
            return False

    def write(self, s: str) -> int:
        if self._name in _CLOSED:
            with contextlib.suppress(OSError, ValueError):
                return self._stream.write(s)
            return len(s)
        try:
            return self._stream.write(s)
        except BrokenPipeError:
            self._closed()
            return len(s)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()
        except (OSError, ValueError):
            if self._name not in _CLOSED:
                raise

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_output() -> Iterator[None]:
    """While active, sys.stdout and sys.stderr survive their pipe closing (see _Guarded); the streams are put back
    after. A stream that is None (its descriptor was closed at start-up) stays None: print() skips it."""
    old = sys.stdout, sys.stderr
    if sys.stdout is not None:
        sys.stdout = _Guarded(sys.stdout, "stdout")
    if sys.stderr is not None:
        sys.stderr = _Guarded(sys.stderr, "stderr")
    guarded = [s for s in (sys.stdout, sys.stderr) if isinstance(s, _Guarded)]
    _GUARDED.extend(guarded)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
        for g in guarded:
            _GUARDED.remove(g)
