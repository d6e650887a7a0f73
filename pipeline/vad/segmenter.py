"""Frame decisions -> utterances: a pure state machine (no I/O, no clock, no asyncio).

Feed it one fixed-size frame at a time with its stream position and the engine's speech
probability; it returns events. Everything is measured in samples (16 kHz), so a run over the same
frames always gives the same utterances, positions and ids.

States::

              active             start_samples of speech
    QUIET ────────────▶ STARTING ────────────────────────▶ SPEAKING ◀───┐
      ▲                    │ two non-speech frames in a row    │          │ speech
      ├────────────────────┘                        non-speech │          │
      │                                                        ▼          │
      └──────── silence reaches hangover_samples ─────────── PAUSING ─────┘

Hysteresis: a frame is *speech* when its probability reaches `threshold` and *active* when it reaches
`neg_threshold` (lower), or `weak_prob` (lower still) while it is at least `weak_snr_db` above the
running noise floor (`pipeline.dsp.NoiseFloor`): a whisper scores 0.1-0.5 but stands 15-45 dB above
the room, steady noise does not stand above its own floor. That weak path only serves speech that never
scored `weak_max_peak`: clear speech ends where Silero says (jfk's applause is loud and scores 0.1-0.3,
and must not prolong "... for your country"). Only speech starts a start run; active
frames continue a start run and an open utterance ("speech" below means active once a run started).

Falling tails: after clear speech (peak `weak_max_peak` or more) Silero's probability decays over a
few frames once the last word ends (0.53, 0.47, 0.45, 0.45, 0.32 at the end of 2902-9006-0017). There a
frame under `threshold` is active only when it rises `TAIL_RISE` over the lowest probability since
the last speech frame: speech coming back. So the hysteresis bridges dips inside a sentence without
moving the end of the last one (which would delay every echo by the length of the tail).
A start run opens after `start_samples` when it holds a speech frame, else after `weak_start_samples`
of active frames (a whisper may never reach the threshold); the ASR's gate then judges it.

- QUIET keeps a ring buffer of the last `pre_roll_samples` of audio, so an utterance's audio starts
  that long before the first speech frame and first words are never clipped.
- STARTING counts active frames of one start run; a single inactive frame inside the run is
  tolerated (it counts as neither), two in a row abandon it. Since every tolerated gap must be
  followed by speech, a run that opens spans at most 2 * start_frames - 1 frames.
- SPEAKING/PAUSING: `speech_end` follows the end of the last speech frame. When the silence after
  it reaches `speculative_samples`, `SpeechPaused` is emitted once (with a snapshot of the utterance
  as it would be if it ended there) and `SpeechResumed` if speech comes back. When it reaches
  `hangover_samples` the utterance ends. Its audio stops `min(speech_pad, silence)` after
  `speech_end`: the rest of the hangover is not sent to the ASR.
- Utterances whose speech (`speech_end - speech_start`) is shorter than `min_utterance_samples`
  become `Discarded(reason="too_short")` instead of `UtteranceEnded`.
- Speech reaching `max_utterance_samples` (from `speech_start`) is split at the quietest frame of
  the last `split_search_samples` (non-speech frames preferred, lowest RMS first, cut in the middle
  of that frame). The first part ends with reason "max_length"; the rest continues as a new
  utterance (new id, `SpeechStarted.continues` set) that stays open, unless the cut fell in a pause
  with no speech after it, in which case nothing continues.
- A jump forward in positions (audio lost upstream) counts as that much silence; a jump longer than
  the pre-roll and hangover closes what is open and starts afresh. Positions going back are an error.
- Unheard speech: while no utterance is open, frames whose probability is at least
  `unheard_threshold` (below the speech threshold, or a start run that was abandoned) form runs
  (gaps of up to `UNHEARD_GAP_FRAMES` non-speech-like frames bridged). A run that ends without an
  utterance opening and holds at least `unheard_min_samples` of such frames becomes `Unheard`: audio
  that sounded like speech and was not relayed, which the relay counts. A run that an utterance
  opens on is part of that utterance (its pre-roll), not unheard.

Memory is bounded: at most `pre_roll + max_utterance + 2 frames` of audio are held (frames are
copied on push, so callers may reuse their buffers).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from pipeline.config import VadSettings
from pipeline.dsp import NoiseFloor, dbfs, rms
from pipeline.frames import SAMPLE_RATE, SPAN_GAP_MS, EndReason, Pcm, Utterance, ms_to_samples

DEFAULT_SPECULATIVE_MS = 150  # matches EndpointSettings.speculative_ms
# Silero's own hysteresis (faster-whisper's VadOptions.neg_threshold): speech starts at `threshold` and
# continues down to threshold - 0.15, so quiet word ends and weak syllables do not cut an utterance.
NEG_THRESHOLD_OFFSET = 0.15
MIN_NEG_THRESHOLD = 0.01
# After clear speech, a frame between neg_threshold and threshold continues the utterance only if its
# probability rose this much over the lowest since the last speech frame: a decaying tail is silence.
TAIL_RISE = 0.05


# ------------------------------------------------------------------------------------------ events
@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """An utterance opened. `pos` is its `speech_start` (the onset, not the detection time).

    `continues` is the id of the utterance this one continues after a max-length split (the
    speaker did not stop, so e.g. barge-in may want to ignore it); None for a fresh start."""

    utterance_id: str
    pos: int
    continues: str | None = None


@dataclass(frozen=True, slots=True)
class SpeechPaused:
    """The silence inside an open utterance reached `speculative_samples` (emitted once per pause).

    `pos` is the utterance's current `speech_end`; `snapshot` is the utterance as it would be if it
    ended now (same id, audio up to `speech_end + min(speech_pad, silence)`, reason "silence")."""

    utterance_id: str
    pos: int
    snapshot: Utterance


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """Speech came back after a `SpeechPaused`; `pos` is the start of the first new speech frame."""

    utterance_id: str
    pos: int


@dataclass(frozen=True, slots=True)
class UtteranceEnded:
    utterance: Utterance


@dataclass(frozen=True, slots=True)
class Discarded:
    """An opened utterance that was thrown away (its id is not reused); counted by the relay."""

    utterance_id: str
    reason: str = "too_short"
    speech_start: int = 0
    speech_end: int = 0


@dataclass(frozen=True, slots=True)
class Unheard:
    """Speech-like audio that never became part of an utterance: `start`..`end` in the stream, of which
    `speech_samples` scored at least `unheard_threshold`; `peak_prob` is the highest probability seen."""

    start: int
    end: int
    speech_samples: int
    peak_prob: float


Event = SpeechStarted | SpeechPaused | SpeechResumed | UtteranceEnded | Discarded | Unheard

UNHEARD_GAP_FRAMES = 3  # non-speech-like frames bridged inside one unheard run (~100 ms of Silero frames)


# ------------------------------------------------------------------------------------------ params
@dataclass(frozen=True, slots=True)
class SegmenterParams:
    """Segmenter thresholds, all in samples at 16 kHz (see `VadSettings` for their meaning)."""

    frame_samples: int
    threshold: float = 0.5  # prob >= threshold is speech: it starts a start run
    neg_threshold: float = 0.35  # prob >= this continues a start run or an open utterance (hysteresis)
    weak_prob: float | None = 0.1  # prob >= this also continues them (None = never) when the frame is ...
    weak_snr_db: float = 15.0  # ... this far above the running noise floor (whispers), while the run or
    weak_max_peak: float = 0.7  # utterance never scored this high (clear speech ends where Silero says)
    weak_start_samples: int = ms_to_samples(250)  # a start run with no speech frame opens after this
    pre_roll_samples: int = ms_to_samples(300)
    start_samples: int = ms_to_samples(90)
    hangover_samples: int = ms_to_samples(1000)
    min_utterance_samples: int = ms_to_samples(200)
    max_utterance_samples: int = 20 * SAMPLE_RATE
    split_search_samples: int = 3 * SAMPLE_RATE
    speech_pad_samples: int = ms_to_samples(150)
    speculative_samples: int | None = ms_to_samples(DEFAULT_SPECULATIVE_MS)  # None: no SpeechPaused
    unheard_threshold: float = 0.35  # prob >= this outside utterances is counted as unheard speech
    unheard_min_samples: int = ms_to_samples(150)

    def __post_init__(self) -> None:
        if self.frame_samples <= 0:
            raise ValueError(f"frame_samples must be positive (got {self.frame_samples})")
        for name in ("pre_roll_samples", "start_samples", "min_utterance_samples", "speech_pad_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative (got {getattr(self, name)})")
        for name in ("hangover_samples", "split_search_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.max_utterance_samples < 2 * self.frame_samples:
            raise ValueError("max_utterance_samples must be at least two frames "
                             f"(got {self.max_utterance_samples})")
        if self.speculative_samples is not None and self.speculative_samples <= 0:
            raise ValueError(f"speculative_samples must be positive or None (got {self.speculative_samples})")

    @classmethod
    def from_settings(cls, settings: VadSettings, frame_samples: int, *, threshold: float | None = None,
                      speculative_ms: int | None = DEFAULT_SPECULATIVE_MS) -> SegmenterParams:
        """`threshold` defaults to `settings.threshold` (pass the engine's own); `speculative_ms`
        None disables `SpeechPaused` (endpointing off). The continue threshold is
        `settings.neg_threshold`, or `threshold - NEG_THRESHOLD_OFFSET` when that is null."""
        threshold = settings.threshold if threshold is None else threshold
        neg_threshold = settings.neg_threshold
        if neg_threshold is None:
            neg_threshold = max(threshold - NEG_THRESHOLD_OFFSET, MIN_NEG_THRESHOLD)
        return cls(
            frame_samples=frame_samples,
            threshold=threshold,
            neg_threshold=neg_threshold,
            weak_prob=settings.weak_prob,
            weak_snr_db=settings.weak_snr_db,
            weak_max_peak=settings.weak_max_peak,
            weak_start_samples=ms_to_samples(settings.weak_start_ms),
            pre_roll_samples=ms_to_samples(settings.pre_roll_ms),
            start_samples=ms_to_samples(settings.start_ms),
            hangover_samples=ms_to_samples(settings.hangover_ms),
            min_utterance_samples=ms_to_samples(settings.min_utterance_ms),
            max_utterance_samples=round(settings.max_utterance_s * SAMPLE_RATE),
            split_search_samples=round(settings.split_search_s * SAMPLE_RATE),
            speech_pad_samples=ms_to_samples(settings.speech_pad_ms),
            speculative_samples=None if speculative_ms is None else ms_to_samples(speculative_ms),
            unheard_threshold=settings.unheard_threshold,
            unheard_min_samples=ms_to_samples(settings.unheard_min_ms),
        )

    @property
    def weak_start_frames(self) -> int:
        """Active frames a start run with no speech frame needs."""
        return max(1, math.ceil(self.weak_start_samples / self.frame_samples))

    @property
    def start_frames(self) -> int:
        """Speech frames a start run needs (at least one)."""
        return max(1, math.ceil(self.start_samples / self.frame_samples))


class State(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    PAUSING = "pausing"


@dataclass(slots=True)
class _Frame:
    start: int
    samples: Pcm
    speech: bool
    energy: float  # RMS, fraction of full scale
    prob: float = 0.0
    active: bool = False  # neg_threshold reached, or weak speech: keeps a start run or an utterance going

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


@dataclass(slots=True)
class _UnheardRun:
    start: int
    end: int
    speech_samples: int
    peak_prob: float
    gap_frames: int = 0  # non-speech-like frames since the last speech-like one


# --------------------------------------------------------------------------------------- segmenter
class Segmenter:
    """Pure utterance segmenter. Not thread-safe; one instance per stream."""

    def __init__(self, params: SegmenterParams) -> None:
        self.params = params
        self.state = State.QUIET
        self._frames: deque[_Frame] = deque()  # contiguous audio: pre-roll history or the open utterance
        self._buffered = 0  # samples in _frames
        self._pos: int | None = None  # expected start of the next frame
        self._floor: int | None = None  # the next utterance's audio may not start before this
        self._count = 0  # utterance ids handed out
        self._noise = NoiseFloor()  # of frame levels, for weak (quiet but clearly present) speech
        self._peak = 0.0  # highest probability of the start run or utterance in progress
        self._tail_min = 1.0  # lowest probability since the last speech frame of the open utterance
        # STARTING
        self._onset = 0
        self._run_speech = 0  # active frames in the start run
        self._run_strong = 0  # of which speech frames
        self._run_gap = 0
        self._unheard: _UnheardRun | None = None  # speech-like frames while no utterance is open
        # SPEAKING / PAUSING
        self._uid: str | None = None
        self._audio_start = 0
        self._speech_start = 0
        self._speech_end = 0
        self._paused_sent = False

    # ------------------------------------------------------------------------------ inspection
    @property
    def utterance_id(self) -> str | None:
        """Id of the open utterance (SPEAKING or PAUSING), else None."""
        return self._uid

    @property
    def position(self) -> int | None:
        """End of the last frame pushed (None before the first)."""
        return self._pos

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    @property
    def peak_prob(self) -> float:
        """Highest speech probability of the start run or utterance in progress (0 when quiet)."""
        return self._peak

    def snapshot(self) -> Utterance | None:
        """The open utterance as it would be if it ended now (None when none is open); nothing changes."""
        return None if self._uid is None else self._build(self._uid, "silence")

    @property
    def silence_samples(self) -> int:
        """Silence since the last speech frame of the open utterance (0 when none is open)."""
        return 0 if self._uid is None or self._pos is None else self._pos - self._speech_end

    # ------------------------------------------------------------------------------------ input
    def push(self, samples: Pcm, start: int, prob: float) -> list[Event]:
        """One frame of exactly `frame_samples` samples at stream position `start`."""
        p = self.params
        if len(samples) != p.frame_samples or samples.dtype != np.int16:
            raise ValueError(f"expected a frame of {p.frame_samples} int16 samples, "
                             f"got {len(samples)} {samples.dtype}")
        events: list[Event] = []
        if self._pos is not None and start != self._pos:
            if start < self._pos:
                raise ValueError(f"frame at {start} goes back in the stream (expected {self._pos})")
            self._gap(start - self._pos, events)
        energy = rms(samples)
        level = dbfs(energy)
        floor = self._noise.update(level, len(samples) / SAMPLE_RATE)
        if self.state is State.QUIET:
            self._peak = 0.0
        speech = prob >= p.threshold
        active = prob >= p.neg_threshold or (
            p.weak_prob is not None and prob >= p.weak_prob and self._peak < p.weak_max_peak
            and level >= floor + p.weak_snr_db)
        if speech or self._uid is None:
            self._tail_min = 1.0
        elif self._peak >= p.weak_max_peak:
            self._tail_min = min(self._tail_min, prob)
            active = active and prob >= self._tail_min + TAIL_RISE  # see "Falling tails"
        frame = _Frame(start, samples.copy(), speech, energy, prob, active)
        self._step(frame, events)
        self._peak = max(self._peak, prob)
        if self._uid is None:
            self._track_unheard(frame, events)
        else:
            self._unheard = None  # the run became (the pre-roll of) an utterance
        return events

    def end_now(self, reason: EndReason = "sentence_end") -> Utterance | None:
        """Close the open utterance at its last speech frame (+ the pad of silence seen so far).

        Returns None when no utterance is open. `min_utterance_samples` is not applied: the caller
        has decided (SpeechPaused, which precedes a speculative decode, is only emitted for
        utterances that are long enough). Speech after this point starts a new utterance."""
        if self._uid is None:
            return None
        utterance = self._build(self._uid, reason)
        self._to_quiet(utterance.end)
        return utterance

    def flush(self) -> list[Event]:
        """End of stream: close what is open (reason "end_of_stream"), then start afresh.

        An unfinished start run is dropped silently (it never became an utterance). Ids keep
        counting, so a later stream on the same instance gets fresh ids."""
        events: list[Event] = []
        if self._uid is not None:
            events.append(self._close("end_of_stream"))
        self._end_unheard(events)
        self._reset()
        return events

    # ----------------------------------------------------------------------------- internals
    def _track_unheard(self, frame: _Frame, events: list[Event]) -> None:
        run = self._unheard
        if frame.prob >= self.params.unheard_threshold:
            if run is None:
                self._unheard = _UnheardRun(frame.start, frame.end, len(frame.samples), frame.prob)
            else:
                run.end, run.gap_frames = frame.end, 0
                run.speech_samples += len(frame.samples)
                run.peak_prob = max(run.peak_prob, frame.prob)
        elif run is not None:
            run.gap_frames += 1
            if run.gap_frames > UNHEARD_GAP_FRAMES:
                self._end_unheard(events)

    def _end_unheard(self, events: list[Event]) -> None:
        run = self._unheard
        if run is not None and self._uid is None and run.speech_samples >= max(1, self.params.unheard_min_samples):
            events.append(Unheard(run.start, run.end, run.speech_samples, run.peak_prob))
        self._unheard = None

    def _reset(self) -> None:
        self.state = State.QUIET
        self._frames.clear()
        self._buffered = 0
        self._pos = None
        self._floor = None
        self._uid = None
        self._unheard = None

    def _append(self, frame: _Frame) -> None:
        self._frames.append(frame)
        self._buffered += len(frame.samples)
        self._pos = frame.end

    def _drop_before(self, pos: int) -> None:
        """Forget frames that end at or before `pos`."""
        while self._frames and self._frames[0].end <= pos:
            self._buffered -= len(self._frames.popleft().samples)

    def _trim_pre_roll(self) -> None:
        if self._floor is not None:
            self._drop_before(self._floor)
        keep = self.params.pre_roll_samples
        while self._frames and self._buffered - len(self._frames[0].samples) >= keep:
            self._buffered -= len(self._frames.popleft().samples)

    def _gap(self, gap: int, events: list[Event]) -> None:
        """Audio missing upstream: treat it as silence (zeros), or start afresh if it is long."""
        p = self.params
        assert self._pos is not None
        if gap <= max(p.pre_roll_samples, p.hangover_samples) + p.frame_samples:
            end = self._pos + gap
            for at in range(self._pos, end, p.frame_samples):
                self._step(_Frame(at, np.zeros(min(p.frame_samples, end - at), dtype=np.int16), False, 0.0),
                           events)
            return
        if self._uid is not None:
            events.append(self._close("silence"))
        self._end_unheard(events)
        self._reset()

    def _step(self, frame: _Frame, events: list[Event]) -> None:
        p = self.params
        self._append(frame)
        if self.state is State.QUIET:
            if frame.active:
                self.state = State.STARTING
                self._onset, self._run_speech, self._run_gap = frame.start, 1, 0
                self._run_strong = int(frame.speech)
                self._maybe_open(events)
            else:
                self._trim_pre_roll()
        elif self.state is State.STARTING:
            if frame.active:
                self._run_speech += 1
                self._run_strong += int(frame.speech)
                self._run_gap = 0
                self._maybe_open(events)
            else:
                self._run_gap += 1
                if self._run_gap > 1:
                    self.state = State.QUIET
                    self._trim_pre_roll()
        else:
            assert self._uid is not None
            if frame.active:
                if self._paused_sent:
                    events.append(SpeechResumed(self._uid, frame.start))
                self._paused_sent = False
                self._speech_end = frame.end
                self.state = State.SPEAKING
            else:
                self.state = State.PAUSING
                silence = frame.end - self._speech_end
                if silence >= p.hangover_samples:
                    events.append(self._close("silence"))
                    return
                if (p.speculative_samples is not None and not self._paused_sent
                        and silence >= p.speculative_samples
                        and self._speech_end - self._speech_start >= p.min_utterance_samples):
                    self._paused_sent = True
                    snapshot = self._build(self._uid, "silence")
                    events.append(SpeechPaused(self._uid, self._speech_end, snapshot))
            if frame.end - self._speech_start >= p.max_utterance_samples:
                self._split(events)

    def _maybe_open(self, events: list[Event]) -> None:
        p = self.params
        if self._run_speech < p.start_frames:
            return
        if not self._run_strong and self._run_speech < max(p.start_frames, p.weak_start_frames):
            return  # no frame reached the threshold: weak evidence must last weak_start_samples
        assert self._pos is not None
        self._count += 1
        self._open(f"u{self._count}", self._onset, self._pos, continues=None, events=events)

    def _open(self, uid: str, speech_start: int, speech_end: int, *, continues: str | None,
              events: list[Event]) -> None:
        audio_start = speech_start - self.params.pre_roll_samples
        if self._floor is not None:
            audio_start = max(audio_start, self._floor)
        if self._frames:
            audio_start = max(audio_start, self._frames[0].start)
        self._drop_before(audio_start)
        self._uid = uid
        self._audio_start, self._speech_start, self._speech_end = audio_start, speech_start, speech_end
        self._paused_sent = False
        assert self._pos is not None
        self.state = State.SPEAKING if speech_end == self._pos else State.PAUSING
        events.append(SpeechStarted(uid, speech_start, continues))

    def _audio(self, start: int, end: int) -> Pcm:
        parts = [f.samples[max(start - f.start, 0):min(end, f.end) - f.start]
                 for f in self._frames if f.end > start and f.start < end]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def _spans(self, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """Runs of active frames between `start` and `end` (the utterance's speech bounds), pauses shorter than
        SPAN_GAP_MS bridged; the first starts at `start` and the last ends at `end`."""
        gap = ms_to_samples(SPAN_GAP_MS)
        spans: list[list[int]] = []
        for f in self._frames:
            if not f.active or f.end <= start or f.start >= end:
                continue
            lo, hi = max(f.start, start), min(f.end, end)
            if spans and lo - spans[-1][1] < gap:
                spans[-1][1] = hi
            else:
                spans.append([lo, hi])
        if not spans:
            return ((start, end),)
        spans[0][0], spans[-1][1] = start, end
        return tuple((a, b) for a, b in spans)

    def _build(self, uid: str, reason: EndReason) -> Utterance:
        assert self._pos is not None
        end = self._speech_end + min(self.params.speech_pad_samples, self._pos - self._speech_end)
        return Utterance(id=uid, audio=self._audio(self._audio_start, end), start=self._audio_start,
                         speech_start=self._speech_start, speech_end=self._speech_end, reason=reason,
                         speech_spans=self._spans(self._speech_start, self._speech_end))

    def _judge(self, utterance: Utterance) -> UtteranceEnded | Discarded:
        if utterance.speech_end - utterance.speech_start < self.params.min_utterance_samples:
            return Discarded(utterance.id, "too_short", utterance.speech_start, utterance.speech_end)
        return UtteranceEnded(utterance)

    def _close(self, reason: EndReason) -> UtteranceEnded | Discarded:
        assert self._uid is not None
        utterance = self._build(self._uid, reason)
        self._to_quiet(utterance.end)
        return self._judge(utterance)

    def _to_quiet(self, floor: int) -> None:
        self.state = State.QUIET
        self._uid = None
        self._paused_sent = False
        self._floor = floor
        self._trim_pre_roll()

    def _split(self, events: list[Event]) -> None:
        """Max length reached: end the first part at the quietest recent frame, continue with the rest."""
        p = self.params
        assert self._uid is not None and self._pos is not None
        first_cut = self._speech_start + p.frame_samples  # the first part keeps at least its onset frame
        lo = max(self._pos - p.split_search_samples, first_cut)
        candidates = [f for f in self._frames if f.start >= lo and len(f.samples) > 1]
        preferred = [f for f in candidates if f.start >= self._speech_start + p.min_utterance_samples]
        pool = preferred or candidates
        pool = [f for f in pool if not f.active] or pool
        if pool:
            quietest = min(f.energy for f in pool)
            tied = [f for f in pool if f.energy <= quietest]
            cut_frame = tied[len(tied) // 2]  # middle of a run of equally quiet frames (e.g. zeros)
            cut = cut_frame.start + len(cut_frame.samples) // 2
        else:  # pragma: no cover - max_utterance >= 2 frames always leaves a candidate
            cut = self._pos

        # Split the frame containing the cut, so both parts keep exact audio.
        for i, f in enumerate(self._frames):
            if f.start < cut < f.end:
                k = cut - f.start
                self._frames[i] = replace(f, samples=f.samples[:k])
                self._frames.insert(i + 1, replace(f, start=cut, samples=f.samples[k:]))
                break

        before = [f for f in self._frames if f.end <= cut and f.active]
        after = [f for f in self._frames if f.start >= cut and f.active]
        first_end = before[-1].end if before else self._speech_start
        end1 = min(cut, first_end + p.speech_pad_samples)
        first = Utterance(id=self._uid, audio=self._audio(self._audio_start, end1), start=self._audio_start,
                          speech_start=self._speech_start, speech_end=first_end, reason="max_length",
                          speech_spans=self._spans(self._speech_start, first_end))
        events.append(self._judge(first))
        uid1 = self._uid
        self._floor = end1
        if not after:  # the rest is silence: nothing continues
            self._uid = None
            self._paused_sent = False
            self.state = State.QUIET
            self._trim_pre_roll()
            return
        self._count += 1
        self._drop_before(cut)
        self._floor = cut
        self._open(f"u{self._count}", after[0].start, after[-1].end, continues=uid1, events=events)
