"""The CTranslate2 calls: encode a batch of windows, detect languages, generate, and Whisper's sentence-end
probability. Calls CTranslate2 directly instead of `WhisperModel.transcribe` (whose 30 s padding the short
window avoids, window.py); audio longer than one window goes through `WhisperModel.transcribe` (`decode_long`).

- **Decode options for speed**: beam size from config (1 = greedy), no timestamps (unless a request asks:
  plan.py's second pass, for pipeline/asr/coverage.py), no conditioning on earlier
  utterances (each stands alone, except its own committed beginning: prompts.py), no VAD filter (ours already
  segmented).
- **Alignment requests** (`Request.align`): no generation, the given text's word times (alignment.py).
- **final_punct_prob**: with greedy decoding CTranslate2 returns the logits of every step
  (`return_logits_vocab=True`, no measurable cost); the softmax at the step that produced the final sentence end
  is the model's confidence that the sentence ended. With beam search the per-step logits are not returned, so
  one extra forced-prefix pass computes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ctranslate2
import numpy as np

from pipeline.asr.gate import compression_ratio, has_repetition, is_doubled
from pipeline.asr.whisper.alignment import align_words
from pipeline.asr.whisper.prompts import PromptBook
from pipeline.asr.whisper.sentence_ends import sentence_end_tokens
from pipeline.asr.whisper.window import (
    ENCODE_MAX_FRAMES,
    FRAMES_PER_S,
    FULL_WINDOW_S,
    Decode,
    Request,
    Segment,
    pad_features,
)
from pipeline.config import AsrSettings
from pipeline.frames import SAMPLE_RATE
from pipeline.language import restrict
from pipeline.text import SENTENCE_END

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

TEMPERATURE_FALLBACK = (0.2, 0.4)  # tried only when greedy decoding loops even on the full window
FORCED_PASS_MAX_LENGTH = 448  # Whisper's decoder context (the forced-prefix pass stays inside it)
TIME_PRECISION_S = 0.02  # one Whisper timestamp token step
# A timestamped decode's first segment starts within this of the window start (faster-whisper's
# max_initial_timestamp default): Whisper may not skip the first words of the window.
MAX_INITIAL_TIMESTAMP_S = 1.0


def timestamp_segments(tokens: list[int], timestamp_begin: int, open_end_s: float,
                       decode: Callable[[list[int]], str]) -> tuple[Segment, ...]:
    """The segments of a timestamped decode: the text between two timestamp tokens, with their times (seconds
    from the window's start). A segment left open at the end (Whisper stopped after its text: a token budget,
    or no closing time) is given `open_end_s`, the end of the audio: where its text ends is not known."""
    segments: list[Segment] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            t = (token - timestamp_begin) * TIME_PRECISION_S
            if start is None or not text:
                start = t  # an opening timestamp (or a repeated one before any text)
            else:
                segments.append(Segment(start, max(start, t), decode(text).strip()))
                start, text = None, []
        elif start is not None:
            text.append(token)
    if start is not None and text:
        segments.append(Segment(start, max(start, open_end_s), decode(text).strip()))
    return tuple(segments)


def degenerate_reason(text: str, *, truncated: bool, compression: float, window_s: int,
                      max_compression_ratio: float) -> str | None:
    """Why a decode looks like a loop (None: it does not): worth another window or temperature."""
    if truncated:
        return "token_budget"
    if compression > max_compression_ratio:
        return "compression_ratio"
    words = text.split()
    if has_repetition(words):
        return "repeated_ngram"
    if window_s < FULL_WINDOW_S and is_doubled(words):
        return "doubled_phrase"
    return None


ENGLISH = "en"  # what asr.task translate writes
EOT_TOKEN = "<|endoftext|>"  # Whisper's end of text: the special tokens start here


@dataclass(frozen=True, slots=True)
class LanguageChoice:
    """The language one window is decoded in, the detector's probability of it, and the detector's own top
    language (restricted to asr.languages) with its probability: the tracker's evidence (pipeline/language.py)."""

    language: str
    probability: float | None = None
    detected: tuple[str, float] | None = None


class WindowDecoder:
    """Decodes batches of windows with one loaded model. `fixed_language` is asr.language (or "en" for an
    English-only model); None (auto) detects every window's language: a request without a language is decoded
    in the detected one, a request with one (the conversation's lock) in it unless the detector is sure of
    another on enough speech (asr.detect.switch_*: that utterance is in its own language)."""

    def __init__(self, model: WhisperModel, prompts: PromptBook, settings: AsrSettings,
                 fixed_language: str | None) -> None:
        self.model = model
        self.prompts = prompts
        self.settings = settings
        self.fixed_language = fixed_language
        # The sentence-end tables, built at load instead of in the first decode that ends a sentence (~0.1-0.3 s).
        hf = model.hf_tokenizer
        self.sentence_ends = sentence_end_tokens(hf, int(hf.token_to_id(EOT_TOKEN)))

    def features(self, audio: np.ndarray) -> np.ndarray:
        feats: np.ndarray = self.model.feature_extractor(audio)
        return feats[:, : feats.shape[-1] - 1]  # as faster-whisper: the last frame is padding

    def decode_one(self, features: np.ndarray, window_s: int, language: str | None, *, temperature: float,
                   budget: int | None) -> Decode:
        """One window of one utterance (a batch of one)."""
        return self.decode([Request(features, window_s, temperature, budget, language)])[0]

    def decode(self, requests: list[Request]) -> list[Decode]:
        """Decode several utterances' windows in one CTranslate2 call: one encoder pass over the batch, one
        batched generation. All requests share a `key`; each keeps its own token budget (checked on its own
        output: the batch generates up to the largest budget)."""
        window_s, temperature = requests[0].window_s, requests[0].temperature
        t0 = time.perf_counter()
        encoded = self._encode(pad_features([r.features for r in requests], window_s))
        t1 = time.perf_counter()
        if requests[0].align is not None:
            return self._align(encoded, requests, t1 - t0)
        choices = self._languages(encoded, requests)
        langs = [c.language for c in choices]
        timestamps = requests[0].timestamps  # part of the batch key
        prompts = [self.prompts.prompt(lang, r.context, timestamps=timestamps)
                   for lang, r in zip(langs, requests, strict=True)]
        greedy = temperature > 0 or self.settings.beam_size == 1
        model_max = int(getattr(self.model, "max_length", FORCED_PASS_MAX_LENGTH))
        # CTranslate2 counts the prompt (and, in 4.8, more) against max_length: give it room and
        # enforce the budget ourselves by checking the generated length.
        budgets = [r.budget for r in requests]
        longest = max(len(p) for p in prompts)
        max_length = model_max if None in budgets else min(model_max, 2 * (max(b or 0 for b in budgets) + longest))
        kwargs: dict[str, Any]
        if temperature > 0:
            kwargs = {"beam_size": 1, "num_hypotheses": 1, "sampling_topk": 0,
                      "sampling_temperature": temperature}
        else:
            kwargs = {"beam_size": self.settings.beam_size, "patience": 1.0}
        if timestamps:
            kwargs["max_initial_timestamp_index"] = round(MAX_INITIAL_TIMESTAMP_S / TIME_PRECISION_S)
        results = self.model.model.generate(
            encoded, prompts, max_length=max_length, return_scores=True, return_no_speech_prob=True,
            return_logits_vocab=greedy, suppress_blank=True, suppress_tokens=self.prompts.suppressed(langs[0]),
            length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, **kwargs)
        t2 = time.perf_counter()
        decodes: list[Decode] = []
        encoder_out: np.ndarray | None = None  # per-item encoder output, only for beam search's punct pass
        for i, (r, result, lang, choice, prompt) in enumerate(
                zip(requests, results, langs, choices, prompts, strict=True)):
            tok = self.prompts.tokenizer(lang)
            tokens = list(result.sequences_ids[0])
            n_tok = len(tokens)
            # faster-whisper's average log-probability (the score includes the end-of-text token).
            avg_logprob = float(result.scores[0]) * n_tok / (n_tok + 1) if result.scores else 0.0
            text = tok.decode(tokens).strip()
            cr = compression_ratio(text)
            truncated = (r.budget is not None and n_tok >= r.budget) or n_tok >= max_length - len(prompt) - 1
            d = Decode(tokens=tokens, text=text, avg_logprob=avg_logprob,
                       no_speech_prob=float(result.no_speech_prob), compression_ratio=cr,
                       temperature=temperature, window_s=float(window_s), truncated=truncated,
                       encode_s=t1 - t0, generate_s=t2 - t1)
            if timestamps:
                d.segments = timestamp_segments(tokens, tok.timestamp_begin, r.features.shape[-1] / FRAMES_PER_S,
                                                tok.decode)
            self._describe_language(d, choice)
            d.extra["batch"] = len(requests)
            reason = degenerate_reason(text, truncated=truncated, compression=cr, window_s=window_s,
                                       max_compression_ratio=self.settings.gate.max_compression_ratio)
            if reason:
                d.extra["degenerate"] = reason
            if text and text[-1] in SENTENCE_END:
                t3 = time.perf_counter()
                item_encoded = encoded
                if not greedy and len(requests) > 1:  # the forced pass decodes this item alone
                    if encoder_out is None:
                        encoder_out = np.array(encoded)
                    item_encoded = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoder_out[i:i + 1]))
                d.final_punct_prob = self._final_punct_prob(result, tokens, item_encoded, prompt, lang, greedy)
                d.extra["punct_s"] = time.perf_counter() - t3
            decodes.append(d)
        return decodes

    def _align(self, encoded: Any, requests: list[Request], encode_s: float) -> list[Decode]:
        """Alignment requests (one language: their key): each text's word times, no generation."""
        t0 = time.perf_counter()
        tok = self.prompts.tokenizer(requests[0].language or self.fixed_language or ENGLISH)
        spans = align_words(self.model.model, tok, encoded, [r.align or () for r in requests],
                            [r.features.shape[-1] for r in requests])
        align_s = time.perf_counter() - t0
        return [Decode(tokens=[], text="", avg_logprob=0.0, no_speech_prob=0.0, compression_ratio=0.0,
                       temperature=0.0, window_s=float(r.window_s), truncated=False, encode_s=encode_s,
                       generate_s=align_s, words=w) for r, w in zip(requests, spans, strict=True)]

    def _describe_language(self, d: Decode, choice: LanguageChoice) -> None:
        """The text's language (English under asr.task translate), the spoken one, the detection."""
        translate = self.settings.task == "translate"
        d.extra["language"] = ENGLISH if translate else choice.language
        d.extra["language_probability"] = None if translate else choice.probability
        d.extra["source_language"] = choice.language
        if choice.detected is not None:
            d.extra["detected"] = choice.detected

    def choose(self, distribution: dict[str, float], forced: str | None, audio_s: float) -> LanguageChoice:
        """One window's language from the detector's distribution (code -> probability), see the class."""
        dist = restrict(distribution, self.settings.languages)
        top = max(dist, key=lambda code: dist[code])
        d = self.settings.detect
        override = top != forced and dist[top] >= d.switch_probability and audio_s >= d.switch_speech_s
        language = top if forced is None or override else forced
        return LanguageChoice(language, round(dist.get(language, 0.0), 4), (top, round(dist[top], 4)))

    def _languages(self, encoded: Any, requests: list[Request]) -> list[LanguageChoice]:
        """Each request's language: asr.language when it is a code, else (auto) chosen from the detection that
        runs on every window (one decoder step on the encoder output already computed)."""
        if self.fixed_language is not None:
            return [LanguageChoice(self.fixed_language) for _ in requests]
        return [self.choose({str(token)[2:-2]: float(p) for token, p in candidates}, r.language, r.audio_s)
                for r, candidates in zip(requests, self.model.model.detect_language(encoded), strict=True)]

    def _encode(self, features: np.ndarray) -> Any:
        """Encoder output of a batch of padded features. Encoded a few windows at a time: on CPU the
        encoder gains nothing from larger batches (8 windows take 8-9 times one), while its attention
        memory grows with batch x window^2 (8 x 30 s windows: ~430 MB of scores)."""
        per_pass = max(1, ENCODE_MAX_FRAMES // features.shape[-1])
        if len(features) <= per_pass:
            return self.model.model.encode(ctranslate2.StorageView.from_array(features))
        parts = [np.array(self.model.model.encode(ctranslate2.StorageView.from_array(features[i:i + per_pass])))
                 for i in range(0, len(features), per_pass)]
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(parts)))

    def _final_punct_prob(self, result: Any, tokens: list[int], encoded: Any, prompt: list[int], lang: str,
                          greedy: bool) -> float | None:
        # The steps that wrote the final mark (one token, or several byte tokens: "！", "।"; sentence_ends.py).
        ends = self.sentence_ends
        steps = ends.final_mark_steps(tokens)
        if steps is None:
            return None
        first, last = steps
        logits: Any = None
        if greedy and result.logits and len(result.logits[0]) > last:
            logits = result.logits[0]
        else:
            # Beam search returns no per-step logits: one forced-prefix pass gives those steps'
            # distributions (suppress_blank off, otherwise the first free step would drop EOT).
            forced = self.model.model.generate(
                encoded, [prompt + tokens[:last]], beam_size=1,
                max_length=min(FORCED_PASS_MAX_LENGTH, 2 * (len(prompt) + last + 2)), return_logits_vocab=True,
                suppress_blank=False, suppress_tokens=self.prompts.suppressed(lang))[0]
            if forced.logits and len(forced.logits[0]) > last:
                logits = forced.logits[0]
        if logits is None:
            return None
        # The written mark's own probability (its tokens' product): the mass over every sentence-end token
        # separated clip ends from mid-clip cuts no better on base's multilingual clips and raised more cuts
        # over endpoint.likely_prob (scripts/sentence_end_probs.py); for a one-token mark it is that token's
        # softmax, as the English endpointing thresholds were measured with.
        return ends.final_mark_prob(tokens, logits, first, last, "token")

    def decode_long(self, audio: np.ndarray, language: str | None = None) -> Decode:
        """Audio longer than one window: faster-whisper's own multi-window loop, in `language` (the
        conversation's) or asr.language, else detected on the first window."""
        s = self.settings
        t0 = time.perf_counter()
        given = language or self.fixed_language
        choice = LanguageChoice(given) if given else None
        if self.fixed_language is None:  # auto: the same choice as a window's, on the first 30 s
            _, _, probs = self.model.detect_language(audio)
            choice = self.choose(dict(probs), language, len(audio) / SAMPLE_RATE)
        segments, info = self.model.transcribe(
            audio, language=choice.language if choice else None, task=s.task, beam_size=s.beam_size,
            without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, initial_prompt=s.initial_prompt,
            hotwords=s.hotwords, temperature=(0.0, *TEMPERATURE_FALLBACK),
            compression_ratio_threshold=s.gate.max_compression_ratio, no_speech_threshold=None)
        segs = list(segments)
        text = " ".join(seg.text.strip() for seg in segs if seg.text.strip())
        avg = float(np.mean([seg.avg_logprob for seg in segs])) if segs else 0.0
        nsp = float(np.mean([seg.no_speech_prob for seg in segs])) if segs else 0.0
        d = Decode(tokens=[t for seg in segs for t in seg.tokens], text=text, avg_logprob=avg,
                   no_speech_prob=nsp, compression_ratio=compression_ratio(text), temperature=0.0,
                   window_s=float(FULL_WINDOW_S), truncated=False, generate_s=time.perf_counter() - t0)
        self._describe_language(d, choice or LanguageChoice(str(info.language), info.language_probability))
        d.extra["attempts"] = 1
        return d
