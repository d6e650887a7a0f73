"""One utterance's decode plan: the windows it needs, in order, and its Transcript.

A plan is a generator: it yields each window `Request` it needs decoded and receives that window's `Decode`, so
the engine (engine.py) or the shared scheduler (pipeline/asr/scheduler.py) can batch the requests of several
utterances. The ladder:

    short window (greedy/beam, token budget) ──degenerate──▶ full 30 s window ──degenerate──▶ 30 s at T=0.2, 0.4
        │                                                                       (best non-repetitive one wins)
        └─ gate says no_speech / low_logprob, or Whisper doubts it ──▶ the same ladder from the full window

- **Fallback.** A short-window result that looks degenerate (hit the token budget, compression ratio above
  `gate.max_compression_ratio`, or a phrase repeated back to back) is decoded again with the full 30 s window; if
  that is still degenerate, at sampling temperatures 0.2 and 0.4.
- **Second opinion.** A short window padded with many seconds of zero features makes Whisper doubt very short and
  weak utterances; before dropping or mangling speech the VAD found, the full window is asked once.
- **Gate**: `pipeline.asr.gate` drops hallucinations (no speech, low log-probability, loops, phantom phrases on
  near-silence); the verdict is `Transcript.dropped_reason`. Plans do not count drops: the relay's delivery counts
  the ones it accounts (a speculative decode may be thrown away).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator
from typing import Any

import numpy as np

from pipeline.asr.gate import gate, normalize_phrase, rms_dbfs
from pipeline.asr.whisper.decoder import TEMPERATURE_FALLBACK, WindowDecoder
from pipeline.asr.whisper.window import (
    FULL_WINDOW_S,
    SHORT_WINDOW_MAX_S,
    Decode,
    Request,
    to_float,
    token_budget,
    window_s,
)
from pipeline.config import AsrSettings, GateSettings
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, UtteranceMeta

log = logging.getLogger(__name__)

# Gate verdicts that get a second decode with the full 30 s window before the utterance is dropped.
SECOND_OPINION_REASONS = ("no_speech", "low_logprob")
# Short-window decodes this unsure of themselves get a full-window second opinion even when the gate
# keeps them (whispers, hoarse or very short speech, short noise bursts); the full window's reading wins.
DOUBT_NO_SPEECH_PROB = 0.4
DOUBT_AVG_LOGPROB = -1.0

Plan = Generator[Request, Decode, Transcript]


def doubtful(d: Decode) -> bool:
    """A kept decode that Whisper itself is unsure of: worth a full-window second opinion."""
    return d.no_speech_prob > DOUBT_NO_SPEECH_PROB or d.avg_logprob < DOUBT_AVG_LOGPROB


def looks_like_silence(d: Decode, g: GateSettings) -> bool:
    return d.no_speech_prob > g.no_speech_prob and (d.avg_logprob < g.no_speech_logprob
                                                    or not normalize_phrase(d.text))


def window_plan(features: np.ndarray, duration: float, settings: AsrSettings, *, full_window: bool = False,
                context: tuple[int, ...] = (), language: str | None = None) -> Generator[Request, Decode, Decode]:
    """The fallback ladder for one utterance's features: yields each window, returns the decode that stands."""
    short = settings.short_window and not full_window and duration <= SHORT_WINDOW_MAX_S
    first_window = window_s(duration) if short else FULL_WINDOW_S
    steps: list[tuple[int, float, int | None]] = [(first_window, 0.0, token_budget(duration))]
    if first_window < FULL_WINDOW_S:
        steps.append((FULL_WINDOW_S, 0.0, None))
    steps += [(FULL_WINDOW_S, t, None) for t in TEMPERATURE_FALLBACK]
    tried: list[Decode] = []
    for window, temperature, budget in steps:
        d = yield Request(features, window, temperature, budget, language=language, context=context, audio_s=duration)
        tried.append(d)
        if not d.degenerate_reason:
            break
        if looks_like_silence(d, settings.gate):
            # Whisper's own rule: no fallback for silence (". . . ." loops on noise); the gate drops it.
            break
        log.debug("degenerate decode (%s) with a %d s window at T=%.1f: %r", d.degenerate_reason, window,
                  temperature, d.text[:80])
    else:
        ok = [x for x in tried if x.degenerate_reason != "compression_ratio"] or tried
        d = max(ok, key=lambda x: x.avg_logprob)
    d.extra["attempts"] = len(tried)
    d.encode_s = sum(x.encode_s for x in tried)
    d.generate_s = sum(x.generate_s for x in tried)
    return d


def utterance_plan(audio: Pcm, meta: UtteranceMeta, decoder: WindowDecoder) -> Plan:
    """One utterance from audio to Transcript."""
    t0 = time.perf_counter()
    s = decoder.settings
    dbfs = rms_dbfs(audio)
    samples = to_float(audio)
    duration = len(samples) / SAMPLE_RATE
    features: np.ndarray | None = None
    context = decoder.prompts.context_tokens(meta.context, decoder.fixed_language or "en")
    if len(samples) > FULL_WINDOW_S * SAMPLE_RATE:
        d = decoder.decode_long(samples, meta.language)  # several windows, by faster-whisper itself (not batched)
    else:
        features = decoder.features(samples)
        d = yield from window_plan(features, duration, s, context=context, language=meta.language)

    def verdict(d: Decode) -> str | None:
        return gate(d.text, no_speech_prob=d.no_speech_prob, avg_logprob=d.avg_logprob, audio_dbfs=dbfs,
                    settings=s.gate, compression_ratio_value=d.compression_ratio)

    reason = verdict(d)
    if features is not None and d.window_s < FULL_WINDOW_S and (reason in SECOND_OPINION_REASONS or doubtful(d)):
        # A short window padded with many seconds of zero features makes Whisper doubt very short
        # and weak utterances (jfk's 1.4 s "ask not": "S not", no_speech 0.57-0.61, avg_logprob -1.16
        # with 10 s; "Ask not!", avg_logprob -0.67 with 30 s). Before dropping or mangling speech the
        # VAD found, ask the full window once: Whisper's trained window decides, both ways (0.3 s of
        # crowd noise: "Oh, my God." doubtful in 10 s, no_speech 0.74 with 30 s).
        full = yield from window_plan(features, duration, s, full_window=True, context=context,
                                      language=meta.language)
        full.encode_s += d.encode_s
        full.generate_s += d.generate_s
        full.extra["attempts"] = d.extra.get("attempts", 1) + full.extra.get("attempts", 1)
        d = full
        reason = verdict(d)
    return _transcript(d, reason, meta, dbfs, time.perf_counter() - t0)


def _transcript(d: Decode, reason: str | None, meta: UtteranceMeta, dbfs: float, decode_s: float) -> Transcript:
    extra: dict[str, Any] = {
        "window_s": d.window_s, "attempts": d.extra.get("attempts", 1), "encode_s": d.encode_s,
        "generate_s": d.generate_s, "tokens": len(d.tokens), "compression_ratio": d.compression_ratio,
        "temperature": d.temperature, "audio_dbfs": dbfs,
    }
    if d.degenerate_reason:
        extra["degenerate"] = d.degenerate_reason
    if "punct_s" in d.extra:
        extra["punct_s"] = d.extra["punct_s"]
    if d.extra.get("source_language") not in (None, d.extra.get("language")):  # asr.task translate
        extra["source_language"] = d.extra["source_language"]
    if reason is not None:
        extra["dropped_text"] = d.text
        log.debug("ASR dropped utterance %s (%s): %r no_speech_prob=%.2f avg_logprob=%.2f cr=%.2f "
                  "%.1f dBFS", meta.utterance_id, reason, d.text, d.no_speech_prob, d.avg_logprob,
                  d.compression_ratio, dbfs)
    return Transcript(
        text="" if reason else d.text,
        confidence=float(min(1.0, math.exp(d.avg_logprob))),
        language=d.extra.get("language"),
        language_probability=d.extra.get("language_probability"),
        detected=d.extra.get("detected"),
        no_speech_prob=d.no_speech_prob,
        avg_logprob=d.avg_logprob,
        final_punct_prob=None if reason else d.final_punct_prob,
        decode_s=decode_s,
        dropped_reason=reason,
        extra=extra,
    )
