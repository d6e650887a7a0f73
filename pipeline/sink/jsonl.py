"""JSONL sink: one JSON object per outgoing message, written as one complete line (fields: README.md,
"Sinks and the JSONL record").

The file stays valid JSONL whatever the disk does: each record goes to the file in one unbuffered write
(no hidden buffer can hold half a line for later), and a write that fails part-way is cut back to the
last complete line. A failing file (disk full, `jsonl:/dev/full`, a reader gone from a pipe) is logged
once; every message meanwhile raises SinkError, which the relay's delivery accounts as undeliverable
with the message's text (pipeline/delivery.py). The next successful write ends the outage.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pipeline.sink.base import Outgoing, Sink, SinkError, SinkOutputError

log = logging.getLogger(__name__)

NEWLINE = b"\n"
FILE_MODE = 0o666  # before the umask, as open() creates files
NO_READER = "no process is reading this FIFO (start the reader first)"


def open_append(path: Path) -> BinaryIO:
    # O_NONBLOCK for the open only: a FIFO nobody reads fails at once (ENXIO) instead of blocking the event
    # loop, where not even a signal could stop the relay; writes then block as usual.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE)
    try:
        os.set_blocking(fd, True)
        # Unbuffered: each write() is one system call whose outcome is known, so a reader (the benchmark,
        # tail -f) sees each message as it is emitted and a failure never leaves bytes waiting in a buffer.
        return open(fd, "ab", buffering=0)
    except BaseException:
        os.close(fd)
        raise


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str | Path, *, opener: Callable[[Path], BinaryIO] = open_append) -> None:
        super().__init__()
        self.path = Path(path)
        self._opener = opener  # tests inject a file whose writes fail
        self._fh: BinaryIO | None = None
        self._good: int | None = None  # size of the file up to its last complete line; None: not seekable
        self._needs_newline = False  # the file ends in a cut line that could not be removed
        self._failing: str | None = None  # the reason of the current write outage (logged once)

    async def start(self) -> None:
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self._opener(self.path)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENXIO:
                why = NO_READER
            raise SinkOutputError(f"cannot open {self.path} for writing: {why}") from None
        try:
            self._good = self._fh.seek(0, os.SEEK_END)
        except OSError:  # a pipe or FIFO: nothing to cut back
            self._good = None
        self._needs_newline = self._ends_mid_line()
        if self._needs_newline:
            log.warning("%s does not end with a newline (a line cut short by an earlier run?); new records "
                        "start on a line of their own", self.path)

    def _ends_mid_line(self) -> bool:
        if not self._good or not self.path.is_file():
            return False
        try:
            with self.path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                return fh.read(1) != NEWLINE
        except OSError:  # unreadable (write-only permissions): assume it is whole
            return False

    async def send(self, out: Outgoing) -> None:
        if self._fh is None:
            await self.start()
        assert self._fh is not None
        line = json.dumps(out.record(), ensure_ascii=False).encode("utf-8") + NEWLINE
        if self._needs_newline:
            line = NEWLINE + line
        written = 0
        try:
            while written < len(line):
                n = self._fh.write(line[written:])
                if not n:  # a raw write that accepts nothing would loop for ever
                    raise OSError(errno.EIO, "the file accepted no bytes")
                written += n
        except OSError as exc:
            raise SinkError(self._failed(exc, written)) from None
        if self._good is not None:
            self._good += len(line)
        self._needs_newline = False
        if self._failing is not None:
            log.warning("%s is written again (the messages in between are undeliverable, logged above)",
                        self.path)
            self._failing = None

    def _failed(self, exc: OSError, written: int) -> str:
        """Cut the file back to its last complete line, log the OS error once per outage, and return
        the short reason each undeliverable message is logged with."""
        assert self._fh is not None
        good = self._good
        cut = good is not None
        if good is not None:
            try:
                self._fh.truncate(good)
                self._fh.seek(good)  # a file not opened for append would write past a hole
            except OSError:  # /dev/full and other devices cannot be truncated (nothing was written)
                cut = False
        if written and not cut:
            self._needs_newline = True  # the part of the line that got out ends before the next record
        why = exc.strerror or str(exc)
        reason = f"{self.path} not written: {why}"
        if self._failing != reason:
            log.error("cannot write %s: [Errno %s] %s; messages are undeliverable until a write succeeds "
                      "(each is logged with its text)", self.path, exc.errno, why)
            self._failing = reason
        return reason

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.close()
        except OSError as exc:  # nothing is buffered, so nothing is lost; the outage was already reported
            if self._failing is None:
                log.error("closing %s: %s", self.path, exc.strerror or exc)
