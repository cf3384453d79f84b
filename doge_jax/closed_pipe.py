"""A trainer's log pipe closing under it (`train ... | head`, a dead `tee` or log collector) stops the run as SIGTERM
does, with a checkpoint, instead of a BrokenPipeError ending it without one. No JAX here: doge_torch.train uses it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

# the exit status a run stopped by a closed pipe reports, as the shell reports a process ended by SIGPIPE
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE
_CLOSED: list[bool] = []  # a guarded stream found its pipe closed (before a trainer's handler was there, maybe)


def output_closed() -> bool:
    """Whether a guarded stdout/stderr found its pipe closed in this process."""
    return bool(_CLOSED)


def discard_output() -> None:
    """Point file descriptors 1 and 2 at /dev/null: every later write (Python's streams, tqdm, warnings, XLA's C++
    logs) succeeds and goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _Guarded:
    """A text stream whose writes to a closed pipe discard the output from then on and raise SIGPIPE in this
    process (a trainer's handler turns it into a stop; where none is installed it is ignored, Python's default)."""

    def __init__(self, stream):
        self._stream = stream

    def _closed(self) -> None:
        _CLOSED.append(True)
        discard_output()
        signal.raise_signal(signal.SIGPIPE)

    def write(self, s: str) -> int:
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

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_output() -> Iterator[None]:
    """While active, sys.stdout and sys.stderr survive their pipe closing (see _Guarded); the streams are put back
    after."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Guarded(sys.stdout), _Guarded(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
