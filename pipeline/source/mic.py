"""Microphone source: sounddevice (PortAudio) capture, resampled to 16 kHz mono, that survives device loss.

Threads: PortAudio calls our callback on its own thread. The callback ONLY copies the block and
hands it to the event loop with `loop.call_soon_threadsafe` (it never blocks, never raises, never
touches shared state). Everything else (mix-down, resampling, queueing, counting) runs on the loop.
While the relay is idle (`set_idle`), the callback keeps up to `source.idle_block_ms` of blocks and
hands them over together: one loop wakeup instead of three in silence.

Design choices:
- sounddevice is imported lazily (inside functions), so importing this module, the file source or
  the tests never needs the PortAudio library. A missing library becomes a `SourceError` naming the
  Debian package (libportaudio2).
- Device: `mic:DEVICE` / `source.mic.device` is an index or a case-insensitive name substring
  (an exact name wins; several matches pick the first and log the others). null = system default.
- Rate: `source.mic.sample_rate` null tries 16000 Hz first (no resampling), then the device's
  default rate, then 48000 and 44100 (USB mics that only do 48 kHz are common). Non-16 kHz audio
  goes through `dsp.StreamResampler` (soxr HQ, ~20 ms mean added latency at 48 kHz). Channels are
  mixed down to mono (mean). The device is opened with `latency="low"` and blocks of `block_ms`.
- Queue: a queue bounded at `mic.queue_blocks` device blocks sits between the callback and
  `frames()`. When it is full the OLDEST block is dropped (a live relay should stay current rather
  than fall ever further behind), counted as `dropped{stage="source",reason="queue_full"}` and logged
  (rate-limited).
- Device loss (the stream stops being `active`, no callback for `stall_timeout_s`) is logged,
  the stream closed (aborted) and reopened with exponential backoff from `reopen_backoff_min_s` to
  `reopen_backoff_max_s`, for as long as it takes; each successful reopen counts in
  `audio_reopens`. PortAudio is re-initialised before a reopen so a re-plugged USB device is seen.
  `frames()` does not end meanwhile; it just waits.
- Positions count the samples actually delivered: a gap (device loss, dropped blocks) is NOT filled
  with fake silence, positions simply continue, so `frame.start` stays contiguous but stream time
  no longer equals wall time after a gap. `now_s()` follows positions: the end position of the
  latest captured block plus the wall time since its capture (capped at 1 s, so during a gap
  the clock pauses), never going backwards.
- Only the first open is fatal: an unknown device, no input devices, a missing PortAudio library
  or a device that opens at no rate raise `SourceError` from `frames()`; later failures are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import SourceSettings
from pipeline.dsp import Reblocker, StreamResampler, to_mono
from pipeline.frames import SAMPLE_RATE, AudioFrame
from pipeline.metrics import Metrics
from pipeline.source.base import Source, SourceError, idle_blocks

log = logging.getLogger(__name__)

# A callable with the signature of sounddevice.InputStream(device=, samplerate=, channels=, dtype=,
# blocksize=, callback=) returning an object with start(), stop(), close() and an `active` property.
StreamFactory = Callable[..., Any]
DeviceQuery = Callable[[], list[dict[str, Any]]]

NO_DEVICES = "No audio input devices found"
PORTAUDIO_MISSING = ("the PortAudio library is not installed (sounddevice needs it for microphone input): "
                     "install the Debian/Ubuntu package libportaudio2 (apt-get install libportaudio2)")
FALLBACK_RATES = (48000, 44100)
CLOCK_MAX_LEAD_S = 1.0  # now_s() runs ahead of the last captured sample by at most this much
LOG_EVERY_S = 10.0  # rate limit of the overflow / queue-full warnings
CLOSE_TIMEOUT_S = 3.0  # a stream that does not stop within this is abandoned
_END = object()


# ------------------------------------------------------------------------------------ devices
def import_sounddevice() -> Any:
    """Import sounddevice, turning a missing PortAudio library or package into a clear SourceError."""
    try:
        import sounddevice
    except OSError:  # sounddevice raises OSError('PortAudio library not found')
        raise SourceError(PORTAUDIO_MISSING) from None
    except ImportError:
        raise SourceError("the sounddevice package is not installed: pip install sounddevice") from None
    return sounddevice


def list_input_devices() -> list[dict[str, Any]]:
    """Input-capable devices: dicts with index, name, max_input_channels, default_samplerate,
    hostapi and default (True for the system default input). Raises SourceError (PortAudio missing)."""
    sd = import_sounddevice()
    try:
        devices = list(sd.query_devices())
        hostapis = list(sd.query_hostapis())
    except Exception as e:  # PortAudioError
        raise SourceError(f"cannot list audio devices: {e}") from None
    try:
        default_in = int(sd.query_devices(kind="input")["index"])
    except Exception:  # no default input device
        default_in = -1
    out: list[dict[str, Any]] = []
    for i, d in enumerate(devices):
        if int(d.get("max_input_channels", 0)) <= 0:
            continue
        api = d.get("hostapi")
        out.append({
            "index": int(d.get("index", i)),
            "name": str(d["name"]),
            "max_input_channels": int(d["max_input_channels"]),
            "default_samplerate": float(d.get("default_samplerate") or 0.0),
            "hostapi": str(hostapis[api]["name"]) if isinstance(api, int) and api < len(hostapis) else "",
            "default": int(d.get("index", i)) == default_in,
        })
    return out


def format_input_devices(devices: list[dict[str, Any]]) -> str:
    """Human-readable device table for `echo-relay devices` (says so clearly when there are none)."""
    if not devices:
        return (f"{NO_DEVICES}. (Is a microphone connected, and can this user access it? "
                "Use --source file:PATH to relay an audio file instead.)")
    lines = ["Audio input devices (* = system default):"]
    for d in devices:
        mark = "*" if d.get("default") else " "
        api = f"  [{d['hostapi']}]" if d.get("hostapi") else ""
        lines.append(f" {mark}{d['index']:>3}  {d['name']}  ({d['max_input_channels']} ch, "
                     f"{d['default_samplerate']:.0f} Hz){api}")
    lines.append("Select one with --source mic:INDEX or mic:NAME (case-insensitive substring).")
    return "\n".join(lines)


def describe_input_devices() -> str:
    """`format_input_devices(list_input_devices())`, or the reason devices cannot be listed. Never raises."""
    try:
        return format_input_devices(list_input_devices())
    except SourceError as e:
        return f"Cannot list audio input devices: {e}"


def resolve_device(device: str | int | None, devices: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pick the input device for `device` (index, name substring, or None = system default).

    Returns the device dict, or None for the system default when none is flagged as default.
    Raises SourceError when there are no input devices or nothing matches.
    """
    if not devices:
        raise SourceError(NO_DEVICES)
    names = ", ".join(f"{d['index']}: {d['name']}" for d in devices)
    if device is None or (isinstance(device, str) and not device.strip()):
        return next((d for d in devices if d.get("default")), None)
    if isinstance(device, int) or device.strip().lstrip("-").isdigit():
        idx = int(device)
        for d in devices:
            if d["index"] == idx:
                return d
        raise SourceError(f"no audio input device with index {idx} (input devices: {names})")
    want = device.strip().lower()
    matches = ([d for d in devices if d["name"].lower() == want]
               or [d for d in devices if want in d["name"].lower()])
    if not matches:
        raise SourceError(f"no audio input device matches '{device}' (input devices: {names})")
    if len(matches) > 1:
        log.warning("audio input '%s' matches %d devices (%s); using %d: %s", device, len(matches),
                    ", ".join(f"{d['index']}: {d['name']}" for d in matches), matches[0]["index"],
                    matches[0]["name"])
    return matches[0]


def _one_line(e: BaseException) -> str:
    return " ".join((str(e) or type(e).__name__).split())


# ------------------------------------------------------------------------------------- source
@dataclass(slots=True)
class _Capture:
    """One opened device stream and the loop-side state that belongs to it."""

    gen: int
    rate: int
    channels: int
    resampler: StreamResampler | None
    stream: Any = None
    desc: str = ""
    # Blocks the callback holds while idle (capture thread only, until the stream has stopped).
    held: list[tuple[np.ndarray[Any, Any], float, bool]] = field(default_factory=list)


class MicSource(Source):
    """Live microphone input; see the module docstring for threading, loss and clock semantics."""

    name = "mic"

    def __init__(self, settings: SourceSettings | None = None, metrics: Metrics | None = None,
                 stream_factory: StreamFactory | None = None, *, device: str | int | None = None,
                 query_devices: DeviceQuery | None = None) -> None:
        """`device` overrides `settings.mic.device` (from `mic:DEVICE`). `stream_factory` replaces
        `sounddevice.InputStream` (tests); `query_devices` replaces `list_input_devices` (by default
        it is only consulted when the real sounddevice is used)."""
        self.settings = settings if settings is not None else SourceSettings.model_validate({})
        self.cfg = self.settings.mic
        self.metrics = metrics
        self.device_spec: str | int | None = device if device is not None else self.cfg.device
        self.block = max(1, SAMPLE_RATE * self.settings.block_ms // 1000)
        self._factory = stream_factory
        self._query = query_devices
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._capture: _Capture | None = None
        self._gen = 0
        self._started = False
        self._closing = False
        self._closed_done = False
        self._wake = asyncio.Event()
        self._hold = 1  # blocks the capture callback collects per hand-over (set_idle)
        self._supervisor: asyncio.Task[None] | None = None
        self._last_data_t = 0.0
        # stream clock (see now_s)
        self._clock_samples = 0
        self._clock_t: float | None = None
        self._clock_last = 0.0
        # counters and log rate limits
        self._counts = {"blocks": 0, "overflows": 0, "dropped_queue_full": 0, "device_losses": 0,
                        "reopens": 0, "reopen_failures": 0}
        self._last_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    # ------------------------------------------------------------------------------ public API
    async def frames(self) -> AsyncIterator[AudioFrame]:
        if self._started:
            raise RuntimeError("MicSource.frames() can only be iterated once")
        self._started = True
        if self._closing:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()  # bounded by policy in _enqueue (drop oldest), see module doc
        await self._open(first=True)
        self._supervisor = asyncio.create_task(self._supervise(), name="mic-supervisor")
        reblocker = Reblocker(self.block)
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    break
                self._set_depth()
                for frame in reblocker.push(item):
                    self._counts["blocks"] += 1
                    yield frame
            tail = reblocker.flush()
            if tail is not None:
                self._counts["blocks"] += 1
                yield tail
        finally:
            await self.close()

    def now_s(self) -> float:
        if self._clock_t is None:
            return self._clock_last
        lead = min(max(time.monotonic() - self._clock_t, 0.0), CLOCK_MAX_LEAD_S)
        self._clock_last = max(self._clock_last, self._clock_samples / SAMPLE_RATE + lead)
        return self._clock_last

    async def close(self) -> None:
        """Stop capturing; `frames()` ends after the audio already captured (resampler tail included)."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        sup = self._supervisor
        if sup is not None and sup is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(sup), CLOSE_TIMEOUT_S + 1.0)
            except (TimeoutError, asyncio.CancelledError):
                sup.cancel()
            except Exception:  # the supervisor logs its own errors
                pass
        await self._close_capture()
        if self._queue is not None:
            self._queue.put_nowait(_END)

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def device_rate(self) -> int | None:
        """Sample rate the device is currently open at (None when closed)."""
        return self._capture.rate if self._capture is not None else None

    # ------------------------------------------------------------------------- capture thread
    def _make_callback(self, cap: _Capture, loop: asyncio.AbstractEventLoop) -> Callable[..., None]:
        on_blocks = self._on_blocks
        held = cap.held

        def callback(indata: Any, frames: int, time_info: Any, status: Any) -> None:
            # PortAudio thread: copy (the buffer is reused) and hand over. Never block, never raise
            # (an exception would abort the stream). While the relay is idle, blocks are handed over
            # `_hold` at a time: one loop wakeup instead of several (set_idle).
            try:
                data = np.array(indata, dtype=np.int16, copy=True)
                overflow = bool(getattr(status, "input_overflow", False))
                held.append((data, time.monotonic(), overflow))
                if len(held) < self._hold:
                    return
                batch = held.copy()
                held.clear()
                loop.call_soon_threadsafe(on_blocks, cap, batch)
            except Exception:  # loop closed during shutdown, ...
                pass

        return callback

    def set_idle(self, idle: bool) -> None:
        # Read by the capture thread: a plain int (one atomic attribute read there).
        self._hold = idle_blocks(self.settings) if idle else 1

    # -------------------------------------------------------------------------- loop side
    def _on_blocks(self, cap: _Capture, batch: list[tuple[np.ndarray[Any, Any], float, bool]]) -> None:
        for data, t, overflow in batch:
            self._on_block(cap, data, t, overflow)

    def _on_block(self, cap: _Capture, data: np.ndarray[Any, Any], t: float, overflow: bool) -> None:
        if cap.gen != self._gen:
            return  # late block from a stream we already closed
        self._last_data_t = t
        if overflow:
            self._counts["overflows"] += 1
            if self.metrics is not None:
                self.metrics.audio_overflows.inc()
            self._log_limited("overflow", "audio input overflow: the device produced samples that were "
                              "never read (audio lost); the system may be overloaded")
        mono = to_mono(data) if data.ndim == 2 else data.reshape(-1)
        pcm = cap.resampler.process(mono) if cap.resampler is not None else mono
        if len(pcm):
            self._enqueue(pcm, t)

    def _enqueue(self, pcm: np.ndarray[Any, Any], t: float) -> None:
        q = self._queue
        if q is None:
            return
        if q.qsize() >= self.cfg.queue_blocks:
            dropped = q.get_nowait()  # drop the OLDEST block: stay current
            if dropped is not _END:
                self._clock_samples -= len(dropped)
            self._counts["dropped_queue_full"] += 1
            if self.metrics is not None:
                self.metrics.drop("source", "queue_full")
            self._log_limited("queue_full", f"microphone queue full ({self.cfg.queue_blocks} blocks): "
                              "dropped the oldest audio (the relay is not keeping up)")
        q.put_nowait(pcm)
        self._clock_samples += len(pcm)
        self._clock_t = t
        self._set_depth()

    def _set_depth(self) -> None:
        if self.metrics is not None and self._queue is not None:
            self.metrics.queue_depth.labels(queue="source").set(self._queue.qsize())

    def _log_limited(self, key: str, message: str) -> None:
        now = time.monotonic()
        self._unlogged[key] = self._unlogged.get(key, 0) + 1
        if now - self._last_log.get(key, -1e9) >= LOG_EVERY_S:
            n = self._unlogged.pop(key)
            log.warning("%s (%d time%s since the last report)", message, n, "" if n == 1 else "s")
            self._last_log[key] = now

    # --------------------------------------------------------------------------- open/close
    def _open_sync(self, gen: int, loop: asyncio.AbstractEventLoop, reinit: bool) -> _Capture:
        """Runs in a worker thread: resolve the device, open and start a stream at the first rate
        that works. Raises SourceError with every rate's failure in one line."""
        factory = self._factory
        sd: Any = None
        if factory is None:
            sd = import_sounddevice()
            if reinit:  # PortAudio only sees devices present at initialisation (USB re-plug)
                with contextlib.suppress(Exception):
                    sd._terminate()
                    sd._initialize()

            def real_factory(**kw: Any) -> Any:
                return sd.InputStream(latency="low", **kw)

            factory = real_factory

        query = self._query if self._query is not None else (list_input_devices if sd is not None else None)
        info: dict[str, Any] | None = None
        device: Any = self.device_spec
        if query is not None:
            info = resolve_device(self.device_spec, query())
            device = info["index"] if info is not None else None
        elif isinstance(device, str) and device.strip().isdigit():
            device = int(device)
        desc = f"{info['index']}: {info['name']}" if info else ("system default" if device is None
                                                                else repr(device))
        channels = self.cfg.channels
        if info is not None:
            channels = max(1, min(channels, int(info["max_input_channels"])))
        if self.cfg.sample_rate:
            rates = [int(self.cfg.sample_rate)]
        else:
            rates = [SAMPLE_RATE]
            if info is not None and info.get("default_samplerate"):
                rates.append(int(info["default_samplerate"]))
            rates += FALLBACK_RATES
            rates = list(dict.fromkeys(rates))
        errors: list[str] = []
        for rate in rates:
            if sd is not None:
                try:
                    sd.check_input_settings(device=device, channels=channels, dtype="int16", samplerate=rate)
                except Exception as e:
                    errors.append(f"{rate} Hz: {_one_line(e)}")
                    continue
            resampler = StreamResampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
            cap = _Capture(gen, rate, channels, resampler, desc=desc)
            stream = None
            try:
                stream = factory(device=device, samplerate=rate, channels=channels, dtype="int16",
                                 blocksize=max(1, rate * self.settings.block_ms // 1000),
                                 callback=self._make_callback(cap, loop))
                stream.start()
            except Exception as e:
                errors.append(f"{rate} Hz: {_one_line(e)}")
                if stream is not None:
                    _close_stream(stream, abort=True)
                continue
            cap.stream = stream
            return cap
        raise SourceError(f"cannot open audio input device {desc}: " + "; ".join(errors))

    async def _open(self, *, first: bool = False) -> None:
        assert self._loop is not None
        self._gen += 1
        gen = self._gen
        try:
            cap = await asyncio.to_thread(self._open_sync, gen, self._loop, not first)
        except SourceError:
            raise
        except Exception as e:  # anything unexpected from PortAudio or a factory
            raise SourceError(f"cannot open audio input device: {_one_line(e)}") from None
        if self._closing or gen != self._gen:  # close() happened while we were opening
            await asyncio.to_thread(_close_stream, cap.stream, True)
            return
        self._capture = cap
        self._last_data_t = time.monotonic()
        how = "" if cap.resampler is None else f", resampled {cap.rate} -> {SAMPLE_RATE} Hz"
        log.info("microphone %s open at %d Hz, %d channel%s%s", cap.desc, cap.rate, cap.channels,
                 "" if cap.channels == 1 else "s", how)

    async def _close_capture(self, lost: bool = False) -> None:
        """Stop the current stream (waiting for its last callbacks), then flush the resampler tail."""
        cap = self._capture
        if cap is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(_close_stream, cap.stream, lost), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("microphone stream did not stop within %.0f s; abandoning it", CLOSE_TIMEOUT_S)
        # Blocks the callback handed over before stop() returned are already queued on the loop
        # (FIFO) and were processed above; anything later is ignored from now on. Blocks it still
        # held (idle batching) are the newest: they follow. Not after a timeout: it may still run.
        else:
            held, cap.held[:] = list(cap.held), []
            self._on_blocks(cap, held)
        self._capture = None
        self._gen += 1
        if cap.resampler is not None:
            tail = cap.resampler.flush()
            if len(tail):
                self._enqueue(tail, time.monotonic())

    # ---------------------------------------------------------------------------- supervision
    def _health(self) -> str | None:
        cap = self._capture
        if cap is None:
            return "the input stream is not open"
        try:
            active = bool(getattr(cap.stream, "active", True))
        except Exception as e:
            return f"the input stream failed: {_one_line(e)}"
        if not active:
            return "the input stream stopped (device disconnected?)"
        silent = time.monotonic() - self._last_data_t
        if silent > self.cfg.stall_timeout_s:
            return f"no audio from the device for {silent:.1f} s"
        return None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless close() is called; True when closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        return self._closing

    async def _supervise(self) -> None:
        poll = min(0.25, self.cfg.stall_timeout_s / 4)
        while not self._closing:
            if await self._sleep(poll):
                return
            try:
                reason = self._health()
                if reason is not None:
                    await self._recover(reason)
            except Exception:  # never let supervision die silently; try again next poll
                log.exception("microphone supervision error")

    async def _recover(self, reason: str) -> None:
        self._counts["device_losses"] += 1
        lo = self.cfg.reopen_backoff_min_s
        hi = max(lo, self.cfg.reopen_backoff_max_s)
        log.warning("audio input lost: %s; reopening (backoff %.1f-%.1f s); frames continue at "
                    "position %.2f s with no filler for the gap", reason, lo, hi,
                    self._clock_samples / SAMPLE_RATE)
        await self._close_capture(lost=True)
        delay, attempt = lo, 0
        while not self._closing:
            if await self._sleep(delay):
                return
            attempt += 1
            try:
                await self._open()
            except Exception as e:
                self._counts["reopen_failures"] += 1
                delay = min(delay * 2, hi)
                log.warning("reopening audio input failed (attempt %d): %s; next try in %.1f s",
                            attempt, _one_line(e), delay)
                continue
            if self._capture is None:  # closed while opening
                return
            self._counts["reopens"] += 1
            if self.metrics is not None:
                self.metrics.audio_reopens.inc()
            log.warning("audio input reopened after %d attempt%s", attempt, "" if attempt == 1 else "s")
            return


def _close_stream(stream: Any, abort: bool = False) -> None:
    """Stop (or abort, for a lost device) and close a stream, ignoring errors: it may already be dead."""
    if stream is None:
        return
    stop = getattr(stream, "abort", None) if abort else None
    for fn in (stop or getattr(stream, "stop", None), getattr(stream, "close", None)):
        if fn is None:
            continue
        try:
            fn()
        except Exception as e:
            log.debug("closing microphone stream: %s", _one_line(e))
