"""Hostile and unlucky output (issue 11): a full disk under the JSONL sink, an output path that cannot be
written, standard output closed or a pipe whose reader has gone (docs/reliability.md, "Hostile and
unlucky input").

The rules: a message that cannot be written is counted undeliverable with its text and the reason
(pipeline/delivery.py); the OS error is logged once per outage, not per message; no traceback; the JSONL
file stays valid line by line (a write that fails part-way is cut back to the last complete line);
an output that cannot be opened at start exits 7 (pipeline.app.EXIT_OUTPUT) with one line on stderr.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
from faults import ReferenceAsr, Track, check_invariants, make_track, relay_settings, run_relay, words

from pipeline.app import EXIT_OK, EXIT_OUTPUT, EXIT_REMOTE, EXIT_RUNTIME, StartupError, run_daemon
from pipeline.metrics import Metrics
from pipeline.sink.base import Outgoing, Sink, SinkError, SinkOutputError
from pipeline.sink.jsonl import JsonlSink, open_append
from pipeline.wiring import build_relay

REPO = Path(__file__).resolve().parent.parent
CLIPS = ("deepspeech-examples/2830-3980-0043.wav", "deepspeech-examples/4507-16021-0012.wav",
         "realtimestt_ljspeech/LJ001-0002.wav")  # three short sentences: three utterances
UTTERANCES = len(CLIPS)
CLI_TIMEOUT_S = 120
OS_ERROR_LOG = "cannot write"  # the jsonl sink's one OS-level line per outage (pipeline/sink/jsonl.py)
CONSOLE_ERROR_LOG = "the console sink cannot print"  # pipeline/sink/console.py
UNDELIVERABLE = re.compile(r"undeliverable echo (u\d+): (.+) \(text: (.+)\)$")
DONE = re.compile(r"done: (\d+) utterance\(s\), (\d+) delivered, (\d+) dropped\s*(\{.*\})?, (\d+) undeliverable")


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("hostile") / "three.wav", CLIPS, gap_s=1.5)


# ------------------------------------------------------------------------------------ helpers
class FullDisk(io.RawIOBase):
    """A real file opened as the JSONL sink opens it, on a disk that fills up.

    After `budget` bytes (or, with `full_after_writes`, after that many complete writes and then
    `left` more bytes) every write fails with ENOSPC. The write that crosses the limit writes what fits
    first, returning a short count as a raw file does, or (`hide_partial`) raising after writing it, as a
    buffered writer can. After `refill_after` failed writes the space is back (someone freed it).
    `seekable=False` behaves like a pipe: no seek, no truncate."""

    def __init__(self, path: Path, *, budget: int | None = None, full_after_writes: int | None = None,
                 left: int = 0, hide_partial: bool = False, refill_after: int | None = None,
                 seekable: bool = True) -> None:
        super().__init__()
        self.real = open_append(path)
        self.budget = budget
        self.full_after_writes, self.left = full_after_writes, left
        self.hide_partial, self.refill_after, self._seekable = hide_partial, refill_after, seekable
        self.writes = 0
        self.failures = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def write(self, data: Any) -> int:
        data = bytes(data)
        if self.full_after_writes is not None and self.writes == self.full_after_writes:
            self.budget, self.full_after_writes = self.left, None
        if self.budget is None or self.budget >= len(data):
            self._spend(len(data))
            self.writes += 1
            return self.real.write(data)
        fits = data[:self.budget]
        if fits:
            self.real.write(fits)
            self._spend(len(fits))
            if not self.hide_partial:
                return len(fits)
        self.failures += 1
        if self.refill_after is not None and self.failures >= self.refill_after:
            self.budget, self.full_after_writes = None, None
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _spend(self, n: int) -> None:
        if self.budget is not None:
            self.budget -= n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if not self._seekable:
            raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
        return self.real.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        if not self._seekable:
            raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
        return self.real.truncate(size)

    def close(self) -> None:
        self.real.close()
        super().close()


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as JSON: fails on a torn or glued line."""
    raw = path.read_bytes()
    assert not raw or raw.endswith(b"\n"), f"the file ends in a cut line: {raw[-80:]!r}"
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def undeliverable_lines(log_lines: list[str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for line in log_lines:
        m = UNDELIVERABLE.search(line)
        if m:
            assert m.group(1) not in found, f"{m.group(1)} logged undeliverable twice"
            found[m.group(1)] = (m.group(2), m.group(3))
    return found


def run_cli(tmp_path: Path, *args: str, stdout: Any = subprocess.DEVNULL,
            shell_prefix: list[str] | None = None) -> tuple[int, str]:
    """`python -m pipeline run --no-control ARGS` in a subprocess; (exit status, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("ECHO_RELAY_CONFIG", None)
    cmd = [*(shell_prefix or []), sys.executable, "-m", "pipeline", "run", "--no-control", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=subprocess.PIPE,
                          timeout=CLI_TIMEOUT_S, check=False)
    return proc.returncode, proc.stderr.decode("utf-8", errors="replace")


def assert_clean(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    assert "unexpected error" not in stderr, stderr


def done_line(stderr: str) -> tuple[int, int, int]:
    m = DONE.search(stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(5))


# ------------------------------------------------------------------------------ disk full: jsonl
def test_jsonl_dev_full_through_the_cli(tmp_path: Path, track: Track) -> None:
    status, err = run_cli(tmp_path, "--source", f"file:{track.path}", "--sink", "jsonl:/dev/full", "--speed", "0")
    assert_clean(err)
    assert status == EXIT_RUNTIME, err
    lines = err.splitlines()
    os_lines = [line for line in lines if OS_ERROR_LOG in line]
    assert len(os_lines) == 1, err  # once, not per message
    assert "/dev/full" in os_lines[0] and "No space left on device" in os_lines[0]
    closed, delivered, undeliverable = done_line(err)
    assert (closed, delivered, undeliverable) == (UTTERANCES, 0, UTTERANCES), err
    lost = undeliverable_lines(lines)
    assert sorted(lost) == [f"u{i}" for i in range(1, UTTERANCES + 1)], err
    for reason, text in lost.values():
        assert reason == "/dev/full not written: No space left on device"
        assert text.strip("'\" ")  # each message's words are in the log
    assert f"{UTTERANCES} message(s) could not be delivered" in err


@pytest.mark.parametrize("hide_partial", [False, True], ids=["short-write", "write-raises-after-part"])
@pytest.mark.parametrize("budget", [0, 1, 300, 700, 1000, 1500, None])
async def test_disk_filling_up_under_the_jsonl_sink(tmp_path: Path, track: Track, caplog: pytest.LogCaptureFixture,
                                                    budget: int | None, hide_partial: bool) -> None:
    """Whatever byte the disk fills at, each message is delivered (a complete line) or undeliverable with
    the reason and its text; the OS error is logged once; the file parses line by line."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "out.jsonl"
    files: list[FullDisk] = []

    def opener(p: Path) -> BinaryIO:
        files.append(FullDisk(p, budget=budget, hide_partial=hide_partial))
        return cast(BinaryIO, files[-1])

    metrics = Metrics()
    sink = JsonlSink(path, opener=opener)
    relay = await run_relay(relay_settings(f"file:{track.path}"), sink=sink, asr=ReferenceAsr(track), metrics=metrics)
    records = jsonl_lines(path)
    ledger = relay.ledger
    assert ledger.closed == UTTERANCES and not ledger.dropped, ledger.as_dict()
    assert ledger.delivered == len(records) and ledger.undeliverable == UTTERANCES - len(records)
    assert [r["utterance_id"] for r in records] == [f"u{i}" for i in range(1, len(records) + 1)]
    assert [r["text"] for r in records] == [seg.reference for seg in track.segments[:len(records)]]
    os_lines = [r for r in caplog.records if r.name == "pipeline.sink.jsonl" and OS_ERROR_LOG in r.getMessage()]
    assert len(os_lines) == (1 if ledger.undeliverable else 0), caplog.text
    lost = undeliverable_lines(caplog.text.splitlines())
    assert sorted(lost) == [f"u{i}" for i in range(len(records) + 1, UTTERANCES + 1)]
    for uid, (reason, text) in lost.items():
        assert reason == f"{path} not written: No space left on device"
        assert text.strip("'\"") == track.segments[int(uid[1:]) - 1].reference
    assert "Traceback" not in caplog.text
    assert files and files[0].closed  # closed without raising
    check_invariants(relay, [])


async def test_disk_space_freed_mid_run_writes_again(tmp_path: Path, track: Track,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """u1 written; the disk fills 25 bytes into u2 (cut back); space is freed; u3 is written."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "out.jsonl"
    disk: list[FullDisk] = []

    def opener(p: Path) -> BinaryIO:
        disk.append(FullDisk(p, full_after_writes=1, left=25, refill_after=1))
        return cast(BinaryIO, disk[-1])

    relay = await run_relay(relay_settings(f"file:{track.path}"), sink=JsonlSink(path, opener=opener),
                            asr=ReferenceAsr(track), metrics=Metrics())
    assert [r["utterance_id"] for r in jsonl_lines(path)] == ["u1", "u3"]
    assert relay.ledger.delivered == 2 and relay.ledger.undeliverable == 1
    assert sorted(undeliverable_lines(caplog.text.splitlines())) == ["u2"]
    assert caplog.text.count(OS_ERROR_LOG) == 1
    assert f"{path} is written again" in caplog.text


async def test_a_cut_line_that_cannot_be_removed_never_glues_to_the_next_record(
        tmp_path: Path, track: Track, caplog: pytest.LogCaptureFixture) -> None:
    """A pipe cannot be truncated: the part of u2 that got out stays, but u3 starts on a line of its own."""
    path = tmp_path / "out.jsonl"

    def opener(p: Path) -> BinaryIO:
        return cast(BinaryIO, FullDisk(p, full_after_writes=1, left=25, refill_after=1, seekable=False))

    relay = await run_relay(relay_settings(f"file:{track.path}"), sink=JsonlSink(path, opener=opener),
                            asr=ReferenceAsr(track), metrics=Metrics())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and len(lines[1]) == 25
    assert [json.loads(lines[0])["utterance_id"], json.loads(lines[2])["utterance_id"]] == ["u1", "u3"]
    assert relay.ledger.delivered == 2 and relay.ledger.undeliverable == 1


async def test_fifo_whose_reader_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sink = JsonlSink(fifo)
    try:
        await sink.start()
    finally:
        os.close(reader)  # gone before the first message: every write is EPIPE
    for seq in (1, 2, 3):
        out = Outgoing("echo", {"properties": {"text": f"t{seq}"}}, utterance_id=f"u{seq}", seq=seq)
        with pytest.raises(SinkError, match=f"^{re.escape(str(fifo))} not written: Broken pipe$"):
            await sink.send(out)
    await sink.close()
    assert caplog.text.count(OS_ERROR_LOG) == 1 and "Traceback" not in caplog.text


# ------------------------------------------------------------------------ output unwritable at start
def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "plain").write_text("x")
    return str(tmp_path / "plain" / "x.jsonl")


def _deeper_under_a_file(tmp_path: Path) -> str:
    (tmp_path / "plain").write_text("x")
    return str(tmp_path / "plain" / "sub" / "x.jsonl")


def _a_directory(tmp_path: Path) -> str:
    (tmp_path / "dir.jsonl").mkdir()
    return str(tmp_path / "dir.jsonl")


def _read_only_directory(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro / "x.jsonl")


def _sysfs(tmp_path: Path) -> str:
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs")
    return "/sys/kernel/echo-relay.jsonl"  # refused even to root


def _etc_passwd(tmp_path: Path) -> str:
    return "/etc/passwd/x.jsonl"


def _fifo_without_reader(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")  # opening it for writing would block for ever


@pytest.mark.parametrize("where", [_under_a_file, _deeper_under_a_file, _a_directory, _read_only_directory, _sysfs,
                                   _etc_passwd, _fifo_without_reader], ids=lambda f: f.__name__.strip("_"))
def test_unwritable_jsonl_path_exits_7_with_one_line(tmp_path: Path, track: Track, where: Any) -> None:
    target = where(tmp_path)
    status, err = run_cli(tmp_path, "--source", f"file:{track.path}", "--sink", f"jsonl:{target}",
                          "--speed", "0", "--log-level", "warning")
    assert status == EXIT_OUTPUT, err
    assert_clean(err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"echo-relay: cannot open {target} for writing: ")


class _RefusingSink(Sink):
    name = "refusing"

    def __init__(self, error: SinkError) -> None:
        super().__init__()
        self.error = error

    async def start(self) -> None:
        raise self.error

    async def send(self, out: Outgoing) -> None:
        raise AssertionError("never started")


@pytest.mark.parametrize(("error", "status"), [(SinkOutputError("cannot open x for writing: Read-only file system"),
                                                 EXIT_OUTPUT),
                                                (SinkError("join failed: invalid room URL"), EXIT_REMOTE)],
                         ids=["output", "remote"])
async def test_sink_start_failures_map_to_output_or_remote(track: Track, error: SinkError, status: int) -> None:
    settings = relay_settings(f"file:{track.path}")
    relay = build_relay(settings, sink=_RefusingSink(error), asr=ReferenceAsr(track))
    with pytest.raises(StartupError) as raised:
        await run_daemon(settings, relay)
    assert raised.value.status == status and str(raised.value) == str(error)


# ------------------------------------------------------------------------------ console: stdout
def _stdout_pipe_reader_gone(tmp_path: Path, track: Track) -> tuple[int, str]:
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: every write is EPIPE
    try:
        return run_cli(tmp_path, "--source", f"file:{track.path}", "--speed", "0", stdout=w)
    finally:
        os.close(w)


def _stdout_closed(tmp_path: Path, track: Track) -> tuple[int, str]:
    return run_cli(tmp_path, "--source", f"file:{track.path}", "--speed", "0",
                   shell_prefix=["sh", "-c", 'exec "$@" >&-', "sh"])


def _stdout_full_disk(tmp_path: Path, track: Track) -> tuple[int, str]:
    with open("/dev/full", "wb") as full:
        return run_cli(tmp_path, "--source", f"file:{track.path}", "--speed", "0", stdout=full)


@pytest.mark.parametrize("stdout", [_stdout_pipe_reader_gone, _stdout_closed, _stdout_full_disk],
                         ids=lambda f: f.__name__.removeprefix("_stdout_"))
def test_console_that_cannot_print_counts_every_message_and_reports_once(tmp_path: Path, track: Track,
                                                                          stdout: Any) -> None:
    status, err = stdout(tmp_path, track)
    assert_clean(err)
    assert status == EXIT_RUNTIME, err
    lines = err.splitlines()
    assert len([line for line in lines if CONSOLE_ERROR_LOG in line]) == 1, err
    assert done_line(err) == (UTTERANCES, 0, UTTERANCES), err
    lost = undeliverable_lines(lines)
    assert sorted(lost) == [f"u{i}" for i in range(1, UTTERANCES + 1)], err
    assert all(text.strip("'\" ") for _, text in lost.values())


def test_console_piped_to_head_1(tmp_path: Path, track: Track) -> None:
    """`echo-relay run | head -1`: head prints the first message and exits; whatever is written after that
    is undeliverable (counted, reported once); what went into the pipe before it exited is delivered."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("ECHO_RELAY_CONFIG", None)
    relay = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--no-control", "--source",
                              f"file:{track.path}", "--speed", "0"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert relay.stdout is not None and relay.stderr is not None
    head = subprocess.Popen(["head", "-1"], stdin=relay.stdout, stdout=subprocess.PIPE)
    relay.stdout.close()  # only head reads the pipe: once it exits, writes fail with EPIPE
    first, _ = head.communicate(timeout=CLI_TIMEOUT_S)
    err = relay.stderr.read().decode("utf-8", errors="replace")
    status = relay.wait(timeout=CLI_TIMEOUT_S)
    assert_clean(err)
    assert words(track.segments[0].reference) == words(first.decode().split("]", 1)[1]), first
    closed, delivered, undeliverable = done_line(err)
    assert closed == UTTERANCES and delivered >= 1 and delivered + undeliverable == closed, err
    assert len([line for line in err.splitlines() if CONSOLE_ERROR_LOG in line]) == (1 if undeliverable else 0)
    assert len(undeliverable_lines(err.splitlines())) == undeliverable
    assert status == (EXIT_RUNTIME if undeliverable else EXIT_OK), err
