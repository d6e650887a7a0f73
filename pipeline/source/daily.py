"""Daily source: one remote participant's microphone from the Daily room, as 16 kHz mono int16 frames.

- The room: the `room` given to the constructor, else the one `room_from()` returns when the source
  starts (the wiring in `pipeline.wiring.build_relay` points it at the Daily sink's `connection`), else
  our own join of `tavus.conversation_url` (+ `tavus.meeting_token`). A shared room is reference-
  counted: closing the source does not leave it while the sink still uses it.
- The participant: `source.daily.participant` (a user name or a participant id), else the first remote
  participant that is neither the replica (`info.userName` == persona name) nor another echo-relay
  client (`sink.daily.user_name`). We subscribe to its
  microphone and register `set_audio_renderer(pid, cb, sample_rate=16000, callback_interval_ms=block)`.
  The renderer callback runs on the SDK thread and only hands the bytes to the loop.
- Positions are contiguous sample counts. The stream clock (`now_s()`) is wall time since the first
  captured sample. To keep the two on the same scale while nobody speaks into the room (participant
  gone, muted, network gap), silence is filled in once the audio falls more than `GAP_FILL_S` behind
  the wall clock, so the VAD also closes an utterance left open by a participant who left.
- The participant leaving does not end `frames()`: we wait for them (matched by id or user name) or,
  without a configured participant, for any other non-replica participant, and resume.
- `frames()` ends after `close()`, or when the conversation ends (the room is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.daily_room import (
    RoomConnection,
    RoomError,
    RoomEvent,
    participant_name,
    redact_url,
    resolve_daily_module,
)
from pipeline.frames import SAMPLE_RATE, AudioFrame
from pipeline.source.base import Source, SourceError

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

QUEUE_BLOCKS = 500  # frames buffered for the consumer (~10 s at 20 ms); beyond that blocks are dropped
GAP_FILL_S = 0.5  # fill silence once the audio is this far behind the wall clock
GAP_CHECK_S = 0.1


class DailySource(Source):
    name = "daily"
    has_video = True

    def __init__(self, settings: Settings, metrics: Metrics | None = None, room: RoomConnection | None = None,
                 daily_module: ModuleType | str | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._shared = room
        # Set by the wiring: the room of a Daily sink started before this source (None: join our own).
        self.room_from: Callable[[], RoomConnection | None] = lambda: None
        self._daily_module_spec = daily_module
        self._conn: RoomConnection | None = None
        self._selector = settings.source.daily.participant
        self._remembered_name: str | None = None
        self._pid: str | None = None
        self._captured: set[str] = set()
        self._video: tuple[Callable[[str, Any, str], None], str] | None = None  # watch_video's callback, format
        self._video_captured: set[str] = set()
        self._queue: asyncio.Queue[AudioFrame | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0: float | None = None
        self._pos = 0
        self._block = max(1, SAMPLE_RATE * max(10, round(settings.source.block_ms / 10) * 10) // 1000)
        self._started = False
        self._closed = False
        self._ended = False
        self._resampler: Any = None
        self._resampler_rate = 0
        self._unsubscribe: Any = None
        self._gap_task: asyncio.Task[None] | None = None
        self._gap_logged = False
        self._stats = {"blocks": 0, "dropped_blocks": 0, "silence_samples": 0, "foreign_blocks": 0,
                       "converted_blocks": 0, "participant_switches": 0}

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def participant_id(self) -> str | None:
        return self._pid

    async def start(self) -> None:
        """Join (or attach to) the room and pick the participant. Idempotent; SourceError on failure."""
        if self._started or self._closed:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        shared = self._shared if self._shared is not None else self.room_from()
        if shared is not None:
            self._conn = shared.retain()
            log.info("Daily source: listening in the sink's room %s", redact_url(shared.url))
        else:
            t = self.settings.tavus
            if not t.conversation_url:
                raise SourceError("source 'daily' needs tavus.conversation_url (or a daily sink whose "
                                  "room it shares)")
            sd = self.settings.sink.daily
            try:
                module = resolve_daily_module(self._daily_module_spec, self.settings)
            except RoomError as exc:
                raise SourceError(str(exc)) from None
            replica_name = getattr(sd, "replica_name", None) or t.persona_name
            conn = RoomConnection(module, user_name=sd.user_name, replica_name=replica_name,
                                  metrics=self.metrics, unsubscribe_media=True)
            token = t.meeting_token.get_secret_value() if t.meeting_token is not None else None
            try:
                await conn.join(t.conversation_url, token, timeout_s=sd.join_timeout_s)
            except RoomError as exc:
                await conn.close()
                raise SourceError(str(exc)) from None
            self._conn = conn
        self._unsubscribe = self._conn.tracker.subscribe(self._on_room_event)
        self._gap_task = asyncio.create_task(self._fill_gaps(), name="daily-source-gaps")
        self._select()
        if self._pid is None:
            who = f"participant {self._selector!r}" if self._selector else \
                "a participant (other than the replica)"
            log.info("waiting for %s to join the room", who)

    async def frames(self) -> AsyncIterator[AudioFrame]:
        await self.start()
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            yield frame

    def now_s(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._gap_task is not None:
            self._gap_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._gap_task
        self._queue.put_nowait(None)
        if self._conn is not None:
            await self._conn.close()

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    # ------------------------------------------------------------------------------ participants
    def _matches(self, p: dict[str, Any]) -> bool:
        conn = self._conn
        if conn is None or conn.tracker.is_replica(p):
            return False
        pid, name = p.get("id"), participant_name(p)
        if self._selector:
            return self._selector in (pid, name) or (self._remembered_name is not None and
                                                    name == self._remembered_name)
        return name != conn.user_name  # never another echo-relay client (e.g. a separate sink client)

    def _select(self) -> None:
        conn = self._conn
        if conn is None or self._closed or (self._pid is not None and self._pid in conn.tracker.participants):
            return
        for p in conn.tracker.remote_participants():
            if self._matches(p):
                self._attach(p)
                return

    def _attach(self, p: dict[str, Any]) -> None:
        conn = self._conn
        assert conn is not None
        pid = str(p.get("id"))
        self._pid = pid
        self._remembered_name = participant_name(p) or self._remembered_name
        self._stats["participant_switches"] += 1
        if pid not in self._captured:
            self._captured.add(pid)
            interval = max(10, round(self.settings.source.block_ms / 10) * 10)
            try:
                conn.capture_audio(pid, self._on_audio, sample_rate=SAMPLE_RATE,
                                   callback_interval_ms=interval)
            except (RoomError, RuntimeError) as exc:
                log.error("cannot receive audio from %r: %s", participant_name(p), exc)
                self._pid = None
                return
        self._capture_video(p)
        log.info("transcribing participant %r (%s)", participant_name(p), pid)

    def watch_video(self, callback: Callable[[str, Any, str], None], color_format: str) -> None:
        """The transcribed participant's camera goes to `callback` (SDK thread; frames of anyone else, e.g.
        a participant transcribed before a switch, are not passed on)."""
        self._video = callback, color_format
        conn = self._conn
        if conn is not None and self._pid is not None:
            current = conn.tracker.participants.get(self._pid)
            if current is not None:
                self._capture_video(current)

    def _capture_video(self, p: dict[str, Any]) -> None:
        conn, pid = self._conn, str(p.get("id"))
        if self._video is None or conn is None or pid in self._video_captured:
            return
        callback, color_format = self._video
        self._video_captured.add(pid)

        def only_current(participant_id: str, frame: Any, video_source: str) -> None:
            if participant_id == self._pid:
                callback(participant_id, frame, video_source)

        try:
            conn.capture_video(pid, only_current, color_format=color_format)
        except (RoomError, RuntimeError) as exc:
            log.error("cannot receive video from %r: %s", participant_name(p), exc)

    def _on_room_event(self, event: RoomEvent) -> None:
        if event.kind in ("participant_joined", "participant_updated", "replica_joined", "joined"):
            self._select()
        elif event.kind == "participant_left" and event.participant is not None:
            if event.participant.get("id") == self._pid:
                log.warning("participant %r left (%s); waiting for them%s to come back",
                            self._remembered_name, event.detail,
                            "" if self._selector else " (or another participant)")
                self._pid = None
                self._select()
        elif event.kind == "ended" and not self._ended:
            log.warning("the conversation ended: the Daily source stops")
            self._ended = True
            self._queue.put_nowait(None)

    # ------------------------------------------------------------------------------ audio
    def _on_audio(self, participant_id: str, audio: Any, audio_source: str) -> None:
        """SDK thread: copy the fields and hand them to the loop; nothing else."""
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            data = bytes(audio.audio_frames)
            rate = int(audio.sample_rate)
            channels = int(audio.num_channels)
            loop.call_soon_threadsafe(self._on_audio_loop, participant_id, data, rate, channels)
        except RuntimeError:  # loop closed
            pass
        except Exception:  # never raise into the SDK
            pass

    def _on_audio_loop(self, participant_id: str, data: bytes, rate: int, channels: int) -> None:
        if self._closed or self._ended:
            return
        if participant_id != self._pid:
            self._stats["foreign_blocks"] += 1
            return
        pcm = np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2")
        if channels > 1 or rate != SAMPLE_RATE:
            pcm = self._to_mono_16k(pcm, rate, channels)
            self._stats["converted_blocks"] += 1
        if len(pcm) == 0:
            return
        now = time.monotonic()
        self._gap_logged = False
        if self._t0 is None:
            self._t0 = now - len(pcm) / SAMPLE_RATE  # the first sample was captured one block ago
        else:
            self._fill_to(now - len(pcm) / SAMPLE_RATE)
        self._emit(pcm.astype(np.int16, copy=False))

    def _fill_to(self, wall_s: float) -> None:
        """Insert silence when the stream is more than GAP_FILL_S behind the wall clock `wall_s`."""
        if self._t0 is None:
            return
        lag = int((wall_s - self._t0) * SAMPLE_RATE) - self._pos
        if lag <= GAP_FILL_S * SAMPLE_RATE:
            return
        if not self._gap_logged:
            log.info("no audio for %.1f s: feeding silence so the stream clock keeps running",
                     lag / SAMPLE_RATE)
            self._gap_logged = True
        lag -= lag % self._block
        self._stats["silence_samples"] += lag
        zeros = np.zeros(self._block, dtype=np.int16)
        for _ in range(lag // self._block):
            self._emit(zeros)

    async def _fill_gaps(self) -> None:
        while not self._closed and not self._ended:
            await asyncio.sleep(GAP_CHECK_S)
            self._fill_to(time.monotonic())

    def _emit(self, pcm: np.ndarray) -> None:
        if self._queue.qsize() >= QUEUE_BLOCKS:
            self._stats["dropped_blocks"] += 1
            if self.metrics is not None:
                self.metrics.drop("source", "queue_full")
            if self._stats["dropped_blocks"] in (1, 10, 100) or self._stats["dropped_blocks"] % 1000 == 0:
                log.warning("Daily source: the consumer is behind; %d block(s) dropped so far",
                            self._stats["dropped_blocks"])
            return
        frame = AudioFrame(samples=pcm, start=self._pos)
        self._pos += len(pcm)
        self._stats["blocks"] += 1
        self._queue.put_nowait(frame)


    def _to_mono_16k(self, pcm: np.ndarray, rate: int, channels: int) -> np.ndarray:
        """Daily resamples to the renderer's rate already; this is a safety net (streaming, no seams)."""
        out = np.asarray(pcm, dtype=np.float32)
        if channels > 1:
            usable = len(out) - len(out) % channels
            out = out[:usable].reshape(-1, channels).mean(axis=1)
        if rate != SAMPLE_RATE and rate > 0:
            import soxr
            if self._resampler is None or self._resampler_rate != rate:
                self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
                self._resampler_rate = rate
            out = self._resampler.resample_chunk(out)
        return np.asarray(np.clip(np.round(out), -32768, 32767), dtype=np.int16)
