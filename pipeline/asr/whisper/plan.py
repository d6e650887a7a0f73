"""One utterance's decode plan: the windows it needs, in order, and its Transcript.

A plan is a generator: it yields each window `Request` it needs decoded and receives that window's `Decode`, so
the engine (engine.py) or the shared scheduler (pipeline/asr/scheduler.py) can batch the requests of several
utterances. The ladder:

    short window (greedy/beam, token budget) ──degenerate──▶ full 30 s window ──degenerate──▶ 30 s at T=0.2, 0.4
        │                                                                       (best non-repetitive one wins)
        ├─ gate says no_speech / low_logprob, or Whisper doubts it ──▶ the same ladder from the full window
        ├─ too few letters, too little speech to tell ──▶ its words aligned to the audio ──half or less──┐
        └─ too few words for the VAD's speech ──▶ the same ladder with timestamps ◀──────────────────────┘
                                                     └──▶ uncovered stretches alone

- **Fallback.** A short-window result that looks degenerate (hit the token budget, compression ratio above
  `gate.max_compression_ratio`, or a phrase repeated back to back) is decoded again with the full 30 s window; if
  that is still degenerate, at sampling temperatures 0.2 and 0.4.
- **Second opinion.** A short window padded with many seconds of zero features makes Whisper doubt very short and
  weak utterances; before dropping or mangling speech the VAD found, the full window is asked once.
- **Second pass** (`asr.second_pass`). Every decode is compared with the VAD's speech in its audio
  (pipeline/asr/coverage.py: letters per second of speech against the language's rate; segment times when it has
  them). One that leaves speech out (without timestamps Whisper may skip a whole first sentence in noise) is
  decoded again with timestamps, the same ladder; the decode that has more distinct letters stands. A stretch of
  a second or more that the timestamped decode's segments do not reach is then decoded alone and its words put in
  by time. Each is a further request of the plan (a later scheduler round: other utterances' first windows go
  first), started only while the plan has used less than SECOND_PASS_BUDGET of `asr.deadline_s`, and not for
  interim decodes. What is still left out is reported in `Transcript.extra` (`uncovered_s`, `uncovered_why`): the
  relay counts it (pipeline/delivery.py).
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

from pipeline.asr.coverage import UNCOVERED_MIN_S, Coverage, Word, assess, distinct_letters, letters, repeats
from pipeline.asr.gate import gate, normalize_phrase, rms_dbfs
from pipeline.asr.whisper.decoder import TEMPERATURE_FALLBACK, WindowDecoder
from pipeline.asr.whisper.window import (
    FRAMES_PER_S,
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
# The second pass (pipeline/asr/coverage.py) starts only while the plan has used less than this share of asr.deadline_s.
SECOND_PASS_BUDGET = 0.5
PART_PAD_S = 0.3  # an uncovered stretch decoded alone gets this much audio either side (the VAD's pre-roll)

Plan = Generator[Request, Decode, Transcript]


def doubtful(d: Decode) -> bool:
    """A kept decode that Whisper itself is unsure of: worth a full-window second opinion."""
    return d.no_speech_prob > DOUBT_NO_SPEECH_PROB or d.avg_logprob < DOUBT_AVG_LOGPROB


def looks_like_silence(d: Decode, g: GateSettings) -> bool:
    return d.no_speech_prob > g.no_speech_prob and (d.avg_logprob < g.no_speech_logprob
                                                    or not normalize_phrase(d.text))


def window_plan(features: np.ndarray, duration: float, settings: AsrSettings, *, full_window: bool = False,
                context: tuple[int, ...] = (), language: str | None = None,
                timestamps: bool = False) -> Generator[Request, Decode, Decode]:
    """The fallback ladder for one utterance's features: yields each window, returns the decode that stands."""
    short = settings.short_window and not full_window and duration <= SHORT_WINDOW_MAX_S
    first_window = window_s(duration) if short else FULL_WINDOW_S
    steps: list[tuple[int, float, int | None]] = [(first_window, 0.0, token_budget(duration))]
    if first_window < FULL_WINDOW_S:
        steps.append((FULL_WINDOW_S, 0.0, None))
    steps += [(FULL_WINDOW_S, t, None) for t in TEMPERATURE_FALLBACK]
    tried: list[Decode] = []
    for window, temperature, budget in steps:
        d = yield Request(features, window, temperature, budget, language=language, context=context,
                          timestamps=timestamps, audio_s=duration)
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
    cov = _coverage(d, meta, duration)
    if meta.decode != "interim" and features is not None and reason is None:
        if cov.unsure:
            cov = yield from word_coverage(d, features, meta, decoder)
        if s.second_pass and cov.short and time.perf_counter() - t0 < s.deadline_s * SECOND_PASS_BUDGET:
            first = d
            d, cov = yield from second_pass(d, cov, samples, features, meta, decoder, dbfs, context)
            if d is not first and cov.unsure:
                cov = yield from word_coverage(d, features, meta, decoder)
    return _transcript(d, reason, meta, dbfs, time.perf_counter() - t0, cov)


def _coverage(d: Decode, meta: UtteranceMeta, duration: float,
              segments: list[tuple[float, float]] | None = None,
              words: list[Word] | None = None) -> Coverage:
    """How much of the VAD's speech `d` covers; `segments`: its times (default: the decode's own, if any);
    `words`: its aligned words' times."""
    spans = meta.speech_spans or ((0.0, duration),)
    if segments is None and d.segments is not None:
        segments = [(g.start, g.end) for g in d.segments]
    return assess(d.text, d.extra.get("language") or meta.language, spans, segments, words)


def attach_punctuation(words: list[Word]) -> list[Word]:
    """Aligned words with each punctuation mark's time and text given to the word before it (the warping path
    gives "Um..." a short "Um" and a long "...": the held sound is the word's); marks before any word are dropped."""
    out: list[Word] = []
    for a, b, text in words:
        if letters(text):
            out.append((a, b, text))
        elif out:
            start, _, word = out[-1]
            out[-1] = (start, b, word + text.strip())
    return out


def word_coverage(d: Decode, features: np.ndarray, meta: UtteranceMeta,
                  decoder: WindowDecoder) -> Generator[Request, Decode, Coverage]:
    """The coverage of a decode too short for the letter rate to judge (`Coverage.unsure`), by its words' times:
    its text aligned to the audio (one more request: an encoder pass of its window and one alignment, ~0.02-0.05 s
    for tiny.en on 2 cores, no generation)."""
    duration = features.shape[-1] / FRAMES_PER_S
    language = d.extra.get("source_language") or d.extra.get("language") or meta.language
    tokens = tuple(decoder.prompts.tokenizer(language or "en").encode(" " + d.text.strip()))
    words: list[Word] = []
    if tokens:
        # The short window whatever `d` was decoded with: the same word times (the path ends at the audio's last
        # frame) for a sixth of a full window's encoder pass.
        aligned = yield Request(features, window_s(duration), 0.0, None, language=language, audio_s=duration,
                                align=tokens)
        words = attach_punctuation([(w.start, w.end, w.text) for w in aligned.words or ()])
        d.encode_s += aligned.encode_s
        d.generate_s += aligned.generate_s
    cov = _coverage(d, meta, duration, words=words)
    log.debug("%s: %.1f s of speech, %d letters: aligned words cover %.1f s", meta.utterance_id, cov.speech_s,
              letters(d.text), cov.speech_s - cov.uncovered_s)
    return cov


def second_pass(d: Decode, cov: Coverage, samples: np.ndarray, features: np.ndarray, meta: UtteranceMeta,
                decoder: WindowDecoder, dbfs: float, context: tuple[int, ...]) -> Generator[Request, Decode,
                                                                                         tuple[Decode, Coverage]]:
    """A decode that leaves speech out (pipeline/asr/coverage.py) is decoded again with timestamps (the same
    ladder); the one covering more stands. Speech the timestamped decode still leaves out (a stretch of
    UNCOVERED_MIN_S or more that no segment reaches) is then decoded alone, and its words go in where its time
    says. Each decode is one more request of the plan: the scheduler decodes it in a later round."""
    s = decoder.settings
    duration = len(samples) / SAMPLE_RATE

    def kept(x: Decode) -> bool:
        return gate(x.text, no_speech_prob=x.no_speech_prob, avg_logprob=x.avg_logprob, audio_dbfs=dbfs,
                    settings=s.gate, compression_ratio_value=x.compression_ratio) is None

    spoken = d.extra.get("source_language") or meta.language  # the first pass's language, for both passes
    ts = yield from window_plan(features, duration, s, full_window=d.window_s >= FULL_WINDOW_S, context=context,
                                language=spoken, timestamps=True)
    ts_cov = _coverage(ts, meta, duration)
    passes = ["timestamps"]
    spent = [d, ts]  # every decode this took, for the time figures of the one that stands
    # A tie goes to the timestamped decode: its segment times say where the speech it left out is.
    if kept(ts) and not ts.degenerate_reason and distinct_letters(ts.text) >= distinct_letters(d.text):
        best, best_cov = ts, ts_cov
    else:
        best, best_cov = d, cov
    stretches = [x for x in ts_cov.uncovered if x[1] - x[0] >= UNCOVERED_MIN_S] if best is ts else []
    if stretches and ts.segments is not None:
        pieces = [(g.start, g.text) for g in ts.segments if g.text]
        covered = [(g.start, g.end) for g in ts.segments]
        for a, b in stretches:
            lo, hi = max(0.0, a - PART_PAD_S), min(duration, b + PART_PAD_S)
            part = yield from window_plan(decoder.features(samples[int(lo * SAMPLE_RATE):int(hi * SAMPLE_RATE)]),
                                          hi - lo, s, language=spoken)
            passes.append(f"part {lo:.1f}-{hi:.1f} s")
            spent.append(part)
            if kept(part) and not part.degenerate_reason and part.text and not repeats(part.text, best.text):
                pieces.append((a, part.text))
                covered.append((a, b))
                if a >= max(g.end for g in ts.segments):
                    best.final_punct_prob = part.final_punct_prob  # it ends the utterance now
        best.text = " ".join(t for _, t in sorted(pieces, key=lambda p: p[0]))
        best_cov = _coverage(best, meta, duration, covered)
    best.extra["second_pass"] = passes
    best.encode_s = sum(x.encode_s for x in spent)
    best.generate_s = sum(x.generate_s for x in spent)
    log.debug("%s: decode covered %.0f%% of %.1f s of speech; after the second pass (%s) %.0f%%: %r",
              meta.utterance_id, 100 * cov.ratio, cov.speech_s, ", ".join(passes), 100 * best_cov.ratio,
              best.text[:80])
    return best, best_cov


def _transcript(d: Decode, reason: str | None, meta: UtteranceMeta, dbfs: float, decode_s: float,
                cov: Coverage) -> Transcript:
    extra: dict[str, Any] = {
        "window_s": d.window_s, "attempts": d.extra.get("attempts", 1), "encode_s": d.encode_s,
        "generate_s": d.generate_s, "tokens": len(d.tokens), "compression_ratio": d.compression_ratio,
        "temperature": d.temperature, "audio_dbfs": dbfs, "coverage": round(cov.ratio, 3),
    }
    if reason is None:  # a dropped decode is counted as dropped; what a kept one leaves out is counted here
        extra["uncovered_s"] = round(cov.uncovered_s, 3) if cov.left_out else 0.0
        if cov.left_out:
            extra["uncovered_why"] = cov.why()
        if cov.timing == "words":
            extra["coverage_by"] = "words"
    if "second_pass" in d.extra:
        extra["second_pass"] = d.extra["second_pass"]
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
