"""VAD stage: audio frames -> speech events and utterances.

- `make_vad_engine(settings.vad)` picks the frame classifier (`webrtc`, `silero`, an entry point in
  `echo_relay.vad`, or `package.module:Factory`).
- `Segmenter` (pure, in `segmenter.py`) turns frame decisions into utterances.
- `VadStage` glues them: it re-frames audio blocks of any size to the engine's frame size and
  returns the segmenter's events. It runs on the event loop; a frame costs microseconds.

User engines: `vad.engine: mypkg.vad:MyVad` names a factory (usually a `VadEngine` subclass). It is
called with the `VadSettings` as its only argument when it accepts one positional argument, else
with no arguments, and must return an object with `frame_samples`, `threshold`, `speech_prob(frame)`
and `reset()` (see `pipeline.vad.base.VadEngine`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.config import ConfigError, Settings, VadSettings
from pipeline.frames import SAMPLE_RATE, AudioFrame, EndReason, Pcm, Utterance
from pipeline.plugins import VAD_GROUP, PluginError, resolve
from pipeline.vad.base import VadEngine
from pipeline.vad.segmenter import (
    Discarded,
    Event,
    Segmenter,
    SegmenterParams,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    State,
    Unheard,
    UtteranceEnded,
)

__all__ = [
    "Discarded",
    "Event",
    "Segmenter",
    "SegmenterParams",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStarted",
    "State",
    "Unheard",
    "UtteranceEnded",
    "VadEngine",
    "VadStage",
    "make_vad_engine",
    "make_vad_stage",
]


def _webrtc(settings: VadSettings) -> VadEngine:
    from pipeline.vad.webrtc import WebRtcVad

    return WebRtcVad(aggressiveness=settings.aggressiveness, frame_ms=settings.frame_ms)


def _silero(settings: VadSettings) -> VadEngine:
    from pipeline.vad.silero import SileroVad

    return SileroVad(threshold=settings.threshold, state_reset_ms=settings.state_reset_ms,
                     state_reset_below=settings.state_reset_below,
                     state_reset_max_dbfs=settings.state_reset_max_dbfs,
                     relisten_drop_db=settings.relisten_drop_db)


BUILTIN_ENGINES: dict[str, Callable[[VadSettings], VadEngine]] = {"webrtc": _webrtc, "silero": _silero}


def _call_factory(factory: Any, settings: VadSettings) -> Any:
    try:
        inspect.signature(factory).bind(settings)
    except TypeError:
        return factory()  # a factory that takes no arguments
    except ValueError:  # no signature available (some builtins): assume it takes the settings
        pass
    return factory(settings)


def make_vad_engine(settings: VadSettings) -> VadEngine:
    """Build the engine named by `settings.engine`; a bad name or factory is a `ConfigError`."""
    try:
        factory = resolve(settings.engine, BUILTIN_ENGINES, VAD_GROUP)
    except PluginError as exc:
        raise ConfigError(str(exc), "vad.engine") from None
    if not callable(factory):
        raise ConfigError(f"{settings.engine!r} is not a class or factory", "vad.engine")
    engine = _call_factory(factory, settings)
    frame_samples = getattr(engine, "frame_samples", None)
    if not callable(getattr(engine, "speech_prob", None)) or not isinstance(frame_samples, int) \
            or frame_samples <= 0:
        raise ConfigError(f"{settings.engine!r} did not produce a VAD engine (needs frame_samples > 0 and "
                          "speech_prob(frame)); see pipeline.vad.base.VadEngine", "vad.engine")
    return engine


def make_vad_stage(settings: Settings) -> VadStage:
    """The VAD stage of a relay: engine from `settings.vad`, SpeechPaused after
    `settings.endpoint.speculative_ms` of pause (none when endpointing is disabled)."""
    engine = make_vad_engine(settings.vad)
    speculative_ms = settings.endpoint.speculative_ms if settings.endpoint.enabled else None
    params = SegmenterParams.from_settings(settings.vad, engine.frame_samples,
                                           threshold=getattr(engine, "threshold", None),
                                           speculative_ms=speculative_ms)
    return VadStage(engine, params)


def _ms(samples: int) -> str:
    return f"{samples * 1000 / SAMPLE_RATE:g}"


class VadStage:
    """Engine + segmenter over audio blocks of any size. Not thread-safe: call from one task.

    Positions come from the frames: blocks must arrive in stream order. A forward jump (audio lost
    upstream) is filled with zeros when shorter than a frame, otherwise the partial frame is padded
    and the segmenter treats the jump as silence (see `Segmenter`).

    The engine is reset after a jump of a frame or more and at `flush()`, not between utterances:
    measured on jfk.wav, a Silero state reset in the pause before "ask not what your country can do
    for you" leaves the model cold for that whole phrase and it is missed. (Silero resets itself after
    long non-speech: `vad.state_reset_ms`, see `pipeline.vad.silero`.)"""

    def __init__(self, engine: VadEngine, params: SegmenterParams) -> None:
        if params.frame_samples != engine.frame_samples:
            raise ValueError(f"segmenter frame ({params.frame_samples}) differs from the engine's "
                             f"({engine.frame_samples})")
        self.engine = engine
        self.params = params
        self.segmenter = Segmenter(params)
        self._rem = np.zeros(0, dtype=np.int16)  # samples waiting for a full frame
        self._rem_start = 0  # stream position of _rem[0]
        self._next: int | None = None  # expected start of the next block
        self.frames = 0  # frames segmented (classified, or digital silence)
        self.gaps = 0  # forward jumps in positions seen
        self.dropped_tail_samples = 0  # partial frames left at flush (less than one frame each)
        self.zero_frames = 0  # frames of digital silence the engine was not asked about
        self._in_zeros = False

    def process(self, frame: AudioFrame) -> list[Event]:
        """Classify and segment one block (any length); returns the events in stream order."""
        F = self.engine.frame_samples
        events: list[Event] = []
        samples = frame.samples
        if self._next is None:
            self._rem_start = frame.start
        elif frame.start != self._next:
            if frame.start < self._next:
                raise ValueError(f"audio block at {frame.start} goes back in the stream "
                                 f"(expected {self._next})")
            self.gaps += 1
            gap = frame.start - self._next
            if len(self._rem) + gap < F:  # still inside one frame: fill the hole with zeros
                samples = np.concatenate([np.zeros(gap, dtype=np.int16), samples])
            else:
                if len(self._rem):
                    padded = np.concatenate([self._rem, np.zeros(F - len(self._rem), dtype=np.int16)])
                    self._classify(padded, self._rem_start, events)
                self._rem = np.zeros(0, dtype=np.int16)
                self._rem_start = frame.start
                self.engine.reset()  # the recurrent state describes audio that is no longer adjacent
        self._next = frame.end
        buf = np.concatenate([self._rem, samples]) if len(self._rem) else samples
        n_full = len(buf) // F
        for i in range(n_full):
            self._classify(buf[i * F:(i + 1) * F], self._rem_start + i * F, events)
        self._rem = buf[n_full * F:].copy()
        self._rem_start += n_full * F
        return events

    def _classify(self, chunk: Pcm, start: int, events: list[Event]) -> None:
        if self.segmenter.utterance_id is None and not chunk.any():
            # Digital silence (a muted Daily participant, a file's gaps) with no utterance open: there is
            # nothing to hear, so the engine is not asked (most of the CPU in silence). Its state is reset
            # once, as `vad.state_reset_ms` would in quiet: what follows starts fresh, which hears a quiet
            # speaker after silence best (BENCHMARKS.md, "VAD state").
            if not self._in_zeros:
                self._in_zeros = True
                self.engine.reset()
            prob = 0.0
            self.zero_frames += 1
        else:
            self._in_zeros = False
            prob = self.engine.speech_prob(chunk)
        self.frames += 1
        events.extend(self.segmenter.push(chunk, start, prob))

    @property
    def utterance_id(self) -> str | None:
        """Id of the open utterance (None when quiet)."""
        return self.segmenter.utterance_id

    @property
    def peak_prob(self) -> float:
        """Highest VAD probability of the utterance in progress (its confidence so far)."""
        return self.segmenter.peak_prob

    def snapshot(self) -> Utterance | None:
        """The open utterance's audio so far (for an interim decode); None when quiet."""
        return self.segmenter.snapshot()

    @property
    def silence_samples(self) -> int:
        """Silence since the open utterance's last speech frame (0 when none is open)."""
        return self.segmenter.silence_samples

    def end_now(self, reason: EndReason = "sentence_end") -> Utterance | None:
        """Close the open utterance now (see `Segmenter.end_now`); None when none is open."""
        return self.segmenter.end_now(reason)

    def flush(self) -> list[Event]:
        """End of stream: close what is open. A trailing partial frame (< one frame) is not classified."""
        self.dropped_tail_samples += len(self._rem)
        self._rem = np.zeros(0, dtype=np.int16)
        self._next = None
        events = self.segmenter.flush()
        self.engine.reset()
        return events

    def segment(self, audio: Pcm, start: int = 0) -> list[Utterance]:
        """Offline: segment a whole recording (then flush) and return its utterances."""
        events = self.process(AudioFrame(audio, start)) + self.flush()
        return [e.utterance for e in events if isinstance(e, UtteranceEnded)]

    def describe(self) -> str:
        """One line for the start-up log: the engine and every threshold, under their config names."""
        p = self.params
        engine_desc = getattr(self.engine, "describe", None)
        engine = engine_desc() if callable(engine_desc) else \
            f"{getattr(self.engine, 'name', type(self.engine).__name__)} ({_ms(p.frame_samples)} ms frames)"
        speculative = "off" if p.speculative_samples is None else f"{_ms(p.speculative_samples)} ms"
        return (f"engine={engine}, threshold={p.threshold:g}, pre_roll={_ms(p.pre_roll_samples)} ms, "
                f"start={_ms(p.start_samples)} ms, hangover={_ms(p.hangover_samples)} ms, "
                f"min_utterance={_ms(p.min_utterance_samples)} ms, "
                f"max_utterance={p.max_utterance_samples / SAMPLE_RATE:g} s, "
                f"split_search={p.split_search_samples / SAMPLE_RATE:g} s, "
                f"speech_pad={_ms(p.speech_pad_samples)} ms, speculative={speculative}, "
                f"unheard>={p.unheard_threshold:g} for {_ms(p.unheard_min_samples)} ms")
