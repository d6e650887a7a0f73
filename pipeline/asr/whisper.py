"""faster-whisper (CTranslate2) engine, tuned for per-utterance latency.

One utterance (already segmented by our VAD) is decoded as one Whisper window, calling
CTranslate2 directly instead of `WhisperModel.transcribe`:

- **Short window** (`asr.short_window`, default on). faster-whisper always pads the features to a
  30 s window (`pad_or_trim(segment)` in `generate_segments`; its `chunk_length` argument does not
  change that), so every decode pays a full 30 s encoder pass (~0.2-0.25 s for tiny.en int8 on 2
  cores). CTranslate2's Whisper encoder accepts fewer frames, so we encode
  ``min(30, max(10, ceil(duration + 1)))`` seconds instead (~0.03-0.05 s). Windows under 10 s made
  the decoder loop on 2-6 s clips, hence the 10 s floor; whole seconds keep the number of distinct
  encoder shapes small. Utterances over `SHORT_WINDOW_MAX_S` (15 s) get the full window at once.
- **Token budget.** Generation is capped at ~``8 tokens/s * duration + 16`` (read speech is 2-5
  tokens/s), so a looping short-window decode stops early.
- **Fallback.** When the short-window result looks degenerate (hit the token budget, compression
  ratio above `gate.max_compression_ratio`, or a phrase repeated back to back) it is decoded again
  with the full 30 s window; if that is still degenerate, at sampling temperatures 0.2 and 0.4
  (the result with the best average log-probability among non-repetitive ones wins). Audio longer
  than 30 s goes through `WhisperModel.transcribe` (several windows).
- **Decode options for speed**: beam size from config (1 = greedy), no timestamps, no conditioning
  on earlier utterances (each stands alone), no VAD filter (ours already segmented),
  `initial_prompt`, `hotwords` and `language` from config. The one previous text is the utterance's
  own committed beginning (`UtteranceMeta.context`, pipeline/speculation.py): its last
  `CONTEXT_TOKENS` tokens go in the prompt, so the rest continues the sentence it started.
- **final_punct_prob**: with greedy decoding CTranslate2 returns the logits of every step
  (`return_logits_vocab=True`, no measurable cost); the softmax at the step that produced the
  final ``.``/``?``/``!`` is the model's confidence that the sentence ended. With beam search the
  per-step logits are not returned, so one extra forced-prefix pass computes it.
- **Gate**: `pipeline.asr.gate` drops hallucinations (no speech, low log-probability, loops,
  phantom phrases on near-silence); the verdict is `Transcript.dropped_reason`. Engines do not count
  drops: the relay's delivery counts the ones it accounts (a speculative decode may be thrown away).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ctranslate2
import numpy as np

from pipeline.asr.base import AsrError, SyncAsrEngine
from pipeline.asr.gate import compression_ratio, gate, has_repetition, is_doubled, normalize_phrase, rms_dbfs
from pipeline.asr.models import ModelLocation, check_model_dir, resolve_model
from pipeline.config import AsrSettings
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, UtteranceMeta
from pipeline.text import SENTENCE_END

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

# Gate verdicts that get a second decode with the full 30 s window before the utterance is dropped.
SECOND_OPINION_REASONS = ("no_speech", "low_logprob")
# Short-window decodes this unsure of themselves get a full-window second opinion even when the gate
# keeps them (whispers, hoarse or very short speech, short noise bursts); the full window's reading wins.
DOUBT_NO_SPEECH_PROB = 0.4
DOUBT_AVG_LOGPROB = -1.0
FULL_WINDOW_S = 30  # Whisper's trained window
MIN_WINDOW_S = 10  # shorter windows made the decoder loop on 2-6 s clips
WINDOW_MARGIN_S = 1.0  # window >= utterance + this
# Longer utterances get the full window at once. A short window leaves them little room after the speech,
# and a loop there costs the whole token budget before the fallback: a 19.3 s utterance of the clean bench
# stream looped in its 20-21 s windows (170 tokens, 1.6 s) and decoded in 0.7-1.0 s with 22-30 s ones.
SHORT_WINDOW_MAX_S = 15.0
TOKENS_PER_S = 8.0  # generation budget per second of audio (read speech: 2-5 tokens/s) ...
TOKENS_MARGIN = 16  # ... plus this
TEMPERATURE_FALLBACK = (0.2, 0.4)  # tried only when greedy decoding loops even on the full window
MIN_SAMPLES = SAMPLE_RATE // 10  # shorter audio is zero-padded to 0.1 s (the STFT needs some samples)
WARMUP_S = 1.0
ENCODE_MAX_FRAMES = FULL_WINDOW_S * 100  # feature frames per encoder pass: one full window, or 3 x 10 s
# Tokens of an utterance's committed beginning given as previous text (read speech: ~3 tokens/s, so the
# last ~10 s). CTranslate2 batches only prompts of one length, so the context length is part of a batch key.
CONTEXT_TOKENS = 32


@dataclass(slots=True)
class _Decode:
    """One CTranslate2 decode of one window."""

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    window_s: float
    truncated: bool
    final_punct_prob: float | None = None
    encode_s: float = 0.0
    generate_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def degenerate_reason(self) -> str | None:
        return self.extra.get("degenerate")


@dataclass(frozen=True, slots=True)
class _Request:
    """One window to decode for one utterance (`_decode_windows` batches requests that share a window
    and a temperature)."""

    features: np.ndarray
    window_s: int
    temperature: float
    budget: int | None  # token budget (None: the model's maximum)
    language: str | None = None  # None: asr.language, else detected
    context: tuple[int, ...] = ()  # previous-text tokens (the utterance's committed beginning)

    @property
    def key(self) -> tuple[int, float, int]:
        """Requests with the same key can be decoded in one batch."""
        return self.window_s, self.temperature, len(self.context)

    @property
    def cost(self) -> float:
        """Window seconds to encode (the encoder dominates a decode on CPU)."""
        return float(self.window_s)


def load_whisper_model(path: Path, settings: AsrSettings) -> WhisperModel:
    """Load a CTranslate2 Whisper directory; any failure becomes a one-line AsrError."""
    check_model_dir(path)
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:  # pragma: no cover - hard dependency
        raise AsrError(f"faster-whisper is not installed: {exc}") from exc
    try:
        return WhisperModel(str(path), device=settings.device, compute_type=settings.compute_type,
                            cpu_threads=settings.cpu_threads, num_workers=settings.batch.workers)
    except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError for corrupt or unsupported files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AsrError(f"Whisper model at {path} could not be loaded: {detail} (is model.bin complete and a "
                       f"CTranslate2 Whisper conversion for this ctranslate2 version?)") from exc


class FasterWhisperEngine(SyncAsrEngine):
    """Built-in `asr.engine: faster-whisper`. Loads the model once, decodes in its own thread."""

    name = "faster-whisper"

    def __init__(self, settings: AsrSettings, metrics: Metrics | None = None, *,
                 hf_cache_dir: str | Path | None = None) -> None:
        super().__init__(concurrency=settings.batch.workers)
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.model
        self.location: ModelLocation | None = None
        self.load_s: float | None = None  # resolve + load + warm-up time of the last load
        self._hf_cache_dir = hf_cache_dir
        self._model: WhisperModel | None = None
        self._tokenizers: dict[str, Any] = {}
        self._prompts: dict[str, list[int]] = {}
        self._previous: dict[str, list[int]] = {}  # asr.initial_prompt's tokens, by language
        self._suppress: dict[str, list[int]] = {}
        self._fixed_language: str | None = None

    # ------------------------------------------------------------------------------- loading
    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load_sync(self) -> None:
        if self._model is not None:
            return
        t0 = time.perf_counter()
        s = self.settings
        self.location = resolve_model(s.model, s.models_dir, download=s.download,
                                      hf_cache_dir=self._hf_cache_dir)
        model = load_whisper_model(self.location.path, s)
        multilingual = bool(model.model.is_multilingual)
        language = s.language
        if not multilingual:
            if language not in (None, "en"):
                log.warning("model %s is English-only; asr.language=%r ignored, using 'en'", s.model,
                            language)
            language = "en"
        self._model = model
        self._fixed_language = language
        if language is not None:
            self._setup_language(language)
        self._warm_up()
        self.load_s = time.perf_counter() - t0
        log.info("ASR model %s loaded from %s (%s, %s, %s, %d threads) and warmed up in %.2f s",
                 s.model, self.location.path, self.location.source, s.device, s.compute_type, s.cpu_threads,
                 self.load_s)
        if self.metrics is not None:
            self.metrics.model_loaded.set(1)

    def _setup_language(self, language: str) -> None:
        if language in self._prompts:
            return
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._require_model()
        try:
            tok = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                            language=language)
        except ValueError as exc:
            raise AsrError(f"asr.language {language!r} is not supported by the model: {exc}") from exc
        previous: list[int] = []
        if self.settings.initial_prompt:
            previous = tok.encode(" " + self.settings.initial_prompt.strip())
        self._tokenizers[language] = tok
        self._previous[language] = previous
        self._prompts[language] = model.get_prompt(tok, previous, without_timestamps=True,
                                                   hotwords=self.settings.hotwords or None)
        self._suppress[language] = list(get_suppressed_tokens(tok, [-1]))

    def _warm_up(self) -> None:
        """Decode ~1 s of very low noise so the first utterance does not pay first-call costs."""
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(int(WARMUP_S * SAMPLE_RATE)) * 10.0).astype(np.float32) / 32768.0
        t0 = time.perf_counter()
        windows = [self._window_s(WARMUP_S)] * 2 if self.settings.short_window else []
        windows.append(FULL_WINDOW_S)  # the fallback (and short_window=false) path
        for w in windows:
            self._decode_window(self._features(noise), w, self._fixed_language, temperature=0.0, budget=8)
        log.debug("ASR warm-up: %d decodes in %.2f s", len(windows), time.perf_counter() - t0)

    def _require_model(self) -> WhisperModel:
        if self._model is None:
            raise AsrError("the ASR model is not loaded")
        return self._model

    # ------------------------------------------------------------------------------ decoding
    @staticmethod
    def _window_s(duration_s: float) -> int:
        return int(min(FULL_WINDOW_S, max(MIN_WINDOW_S, math.ceil(duration_s + WINDOW_MARGIN_S))))

    @staticmethod
    def _budget(duration_s: float) -> int:
        return math.ceil(TOKENS_PER_S * duration_s) + TOKENS_MARGIN

    def _features(self, audio: np.ndarray) -> np.ndarray:
        feats: np.ndarray = self._require_model().feature_extractor(audio)
        return feats[:, : feats.shape[-1] - 1]  # as faster-whisper: the last frame is padding

    def _languages(self, encoded: Any, requests: list[_Request]) -> tuple[list[str], list[float | None]]:
        """Each request's language: its own, else asr.language, else what the model detects; and the
        probability of a detected one (None for a fixed language)."""
        fixed = [r.language or self._fixed_language for r in requests]
        probs: list[float | None] = [None] * len(requests)
        if None in fixed:
            for i, candidates in enumerate(self._require_model().model.detect_language(encoded)):
                if fixed[i] is None:
                    token, prob = candidates[0]
                    fixed[i], probs[i] = str(token)[2:-2], float(prob)
        languages = [str(lang) for lang in fixed]
        for lang in set(languages):
            self._setup_language(lang)
        return languages, probs

    def _decode_window(self, features: np.ndarray, window_s: int, language: str | None, *,
                       temperature: float, budget: int | None) -> _Decode:
        """One window of one utterance (a batch of one)."""
        return self._decode_windows([_Request(features, window_s, temperature, budget, language)])[0]

    def _decode_windows(self, requests: list[_Request]) -> list[_Decode]:
        """Decode several utterances' windows in one CTranslate2 call: one encoder pass over the batch,
        one batched generation. All requests share `window_s` and `temperature`; each keeps its own
        token budget (checked on its own output: the batch generates up to the largest budget)."""
        model = self._require_model()
        window_s, temperature = requests[0].window_s, requests[0].temperature
        t0 = time.perf_counter()
        frames = window_s * 100  # 10 ms feature frames
        n_mels = requests[0].features.shape[0]
        padded = np.zeros((len(requests), n_mels, frames), dtype=np.float32)  # zero features, as faster-whisper pads
        for i, r in enumerate(requests):
            n = min(r.features.shape[1], frames)
            padded[i, :, :n] = r.features[:, :n]
        encoded = self._encode(padded)
        t1 = time.perf_counter()
        langs, lang_probs = self._languages(encoded, requests)
        prompts = [self._prompt(lang, r.context) for lang, r in zip(langs, requests, strict=True)]
        greedy = temperature > 0 or self.settings.beam_size == 1
        model_max = int(getattr(model, "max_length", 448))
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
        # The suppressed tokens are the tokenizer's special and non-speech tokens: the same for every language.
        results = model.model.generate(
            encoded, prompts, max_length=max_length, return_scores=True, return_no_speech_prob=True,
            return_logits_vocab=greedy, suppress_blank=True, suppress_tokens=self._suppress[langs[0]],
            length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, **kwargs)
        t2 = time.perf_counter()
        decodes: list[_Decode] = []
        encoder_out: np.ndarray | None = None  # per-item encoder output, only for beam search's punct pass
        for i, (r, result, lang, lang_prob, prompt) in enumerate(
                zip(requests, results, langs, lang_probs, prompts, strict=True)):
            tok = self._tokenizers[lang]
            tokens = list(result.sequences_ids[0])
            n_tok = len(tokens)
            # faster-whisper's average log-probability (the score includes the end-of-text token).
            avg_logprob = float(result.scores[0]) * n_tok / (n_tok + 1) if result.scores else 0.0
            text = tok.decode(tokens).strip()
            cr = compression_ratio(text)
            truncated = (r.budget is not None and n_tok >= r.budget) or n_tok >= max_length - len(prompt) - 1
            d = _Decode(tokens=tokens, text=text, avg_logprob=avg_logprob,
                        no_speech_prob=float(result.no_speech_prob), compression_ratio=cr,
                        temperature=temperature, window_s=float(window_s), truncated=truncated,
                        encode_s=t1 - t0, generate_s=t2 - t1)
            d.extra["language"] = lang
            d.extra["language_probability"] = lang_prob
            d.extra["batch"] = len(requests)
            if truncated:
                d.extra["degenerate"] = "token_budget"
            elif cr > self.settings.gate.max_compression_ratio:
                d.extra["degenerate"] = "compression_ratio"
            elif has_repetition(text.split()):
                d.extra["degenerate"] = "repeated_ngram"
            elif window_s < FULL_WINDOW_S and is_doubled(text.split()):
                d.extra["degenerate"] = "doubled_phrase"
            if text and text[-1] in SENTENCE_END:
                t3 = time.perf_counter()
                item_encoded = encoded
                if not greedy and len(requests) > 1:  # the forced pass decodes this item alone
                    if encoder_out is None:
                        encoder_out = np.array(encoded)
                    item_encoded = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoder_out[i:i + 1]))
                d.final_punct_prob = self._final_punct_prob(result, tokens, tok, item_encoded, prompt, lang, greedy)
                d.extra["punct_s"] = time.perf_counter() - t3
            decodes.append(d)
        return decodes

    def _prompt(self, language: str, context: tuple[int, ...]) -> list[int]:
        if not context:
            return self._prompts[language]
        return self._require_model().get_prompt(
            self._tokenizers[language], self._previous[language] + list(context), without_timestamps=True,
            hotwords=self.settings.hotwords or None)

    def _context_tokens(self, text: str) -> tuple[int, ...]:
        """The last CONTEXT_TOKENS tokens of an utterance's committed beginning (text tokens are the same for
        every language of a model)."""
        if not text.strip():
            return ()
        language = self._fixed_language or "en"
        self._setup_language(language)  # at once when it is set up already
        return tuple(self._tokenizers[language].encode(" " + text.strip())[-CONTEXT_TOKENS:])

    def _encode(self, features: np.ndarray) -> Any:
        """Encoder output of a batch of padded features. Encoded a few windows at a time: on CPU the
        encoder gains nothing from larger batches (8 windows take 8-9 times one), while its attention
        memory grows with batch x window^2 (8 x 30 s windows: ~430 MB of scores)."""
        model = self._require_model()
        per_pass = max(1, ENCODE_MAX_FRAMES // features.shape[-1])
        if len(features) <= per_pass:
            return model.model.encode(ctranslate2.StorageView.from_array(features))
        parts = [np.array(model.model.encode(ctranslate2.StorageView.from_array(features[i:i + per_pass])))
                 for i in range(0, len(features), per_pass)]
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(parts)))

    def _final_punct_prob(self, result: Any, tokens: list[int], tok: Any, encoded: Any, prompt: list[int],
                          lang: str, greedy: bool) -> float | None:
        # The token that produced the final character (normally the last one).
        idx = len(tokens) - 1
        while idx >= 0 and not tok.decode([tokens[idx]]).strip():
            idx -= 1
        if idx < 0 or tok.decode([tokens[idx]]).strip()[-1:] not in tuple(SENTENCE_END):
            return None
        logits = None
        if greedy and result.logits and len(result.logits[0]) > idx:
            logits = result.logits[0][idx]
        else:
            # Beam search returns no per-step logits: one forced-prefix pass gives that step's
            # distribution (suppress_blank off, otherwise the first free step would drop EOT).
            model = self._require_model()
            forced = model.model.generate(
                encoded, [prompt + tokens[:idx]], beam_size=1,
                max_length=min(448, 2 * (len(prompt) + idx + 2)), return_logits_vocab=True,
                suppress_blank=False, suppress_tokens=self._suppress[lang])[0]
            if forced.logits and len(forced.logits[0]) > idx:
                logits = forced.logits[0][idx]
        if logits is None:
            return None
        x = np.asarray(logits, dtype=np.float32).astype(np.float64).ravel()
        x = x - x.max()
        p = np.exp(x)
        prob = float(p[tokens[idx]] / p.sum())
        return min(1.0, max(prob, 1e-9))

    def _decode_plan(self, features: np.ndarray, duration: float, full_window: bool = False,
                     context: tuple[int, ...] = ()) -> Generator[_Request, _Decode, _Decode]:
        """Decode one utterance: yields each window it needs decoded and receives the decode (the
        caller batches the requests of several utterances)."""
        short = self.settings.short_window and not full_window and duration <= SHORT_WINDOW_MAX_S
        first_window = self._window_s(duration) if short else FULL_WINDOW_S
        # Short window (greedy/beam, token budget) -> full window -> full window sampled at T > 0.
        plan: list[tuple[int, float, int | None]] = [(first_window, 0.0, self._budget(duration))]
        if first_window < FULL_WINDOW_S:
            plan.append((FULL_WINDOW_S, 0.0, None))
        plan += [(FULL_WINDOW_S, t, None) for t in TEMPERATURE_FALLBACK]
        tried: list[_Decode] = []
        for window, temperature, budget in plan:
            d = yield _Request(features, window, temperature, budget, context=context)
            tried.append(d)
            if not d.degenerate_reason:
                break
            if self._looks_like_silence(d):
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

    @staticmethod
    def _doubtful(d: _Decode) -> bool:
        """A kept decode that Whisper itself is unsure of: worth a full-window second opinion."""
        return d.no_speech_prob > DOUBT_NO_SPEECH_PROB or d.avg_logprob < DOUBT_AVG_LOGPROB

    def _looks_like_silence(self, d: _Decode) -> bool:
        g = self.settings.gate
        return d.no_speech_prob > g.no_speech_prob and (d.avg_logprob < g.no_speech_logprob
                                                        or not normalize_phrase(d.text))

    def _decode_long(self, audio: np.ndarray) -> _Decode:
        """Audio longer than one window: faster-whisper's own multi-window loop."""
        model = self._require_model()
        s = self.settings
        t0 = time.perf_counter()
        segments, info = model.transcribe(
            audio, language=self._fixed_language, beam_size=s.beam_size, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, initial_prompt=s.initial_prompt,
            hotwords=s.hotwords, temperature=(0.0, *TEMPERATURE_FALLBACK),
            compression_ratio_threshold=s.gate.max_compression_ratio, no_speech_threshold=None)
        segs = list(segments)
        text = " ".join(seg.text.strip() for seg in segs if seg.text.strip())
        avg = float(np.mean([seg.avg_logprob for seg in segs])) if segs else 0.0
        nsp = float(np.mean([seg.no_speech_prob for seg in segs])) if segs else 0.0
        d = _Decode(tokens=[t for seg in segs for t in seg.tokens], text=text, avg_logprob=avg,
                    no_speech_prob=nsp, compression_ratio=compression_ratio(text), temperature=0.0,
                    window_s=float(FULL_WINDOW_S), truncated=False, generate_s=time.perf_counter() - t0)
        d.extra["language"] = info.language
        d.extra["attempts"] = 1
        return d

    @staticmethod
    def _to_float(audio: Pcm) -> np.ndarray:
        """int16 (or float) audio -> float32 in [-1, 1), zero-padded to at least MIN_SAMPLES."""
        a = np.asarray(audio)
        n = len(a)
        buf = np.zeros(max(n, MIN_SAMPLES), dtype=np.float32)
        if np.issubdtype(a.dtype, np.integer):
            np.multiply(a, np.float32(1.0 / 32768.0), out=buf[:n], casting="unsafe")
        else:
            buf[:n] = a
        return buf

    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        result = self.transcribe_batch_sync([(audio, meta)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def transcribe_batch_sync(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | Exception]:
        """Transcribe several utterances together. Each utterance's decode plan (short window, fallbacks,
        second opinion) runs as it would alone, and the windows the plans ask for at the same step are
        decoded in one batch when they share a window length and a temperature (most utterances are
        under 9 s: the 10 s window). A failure is returned in its item's place."""
        if self._model is None:
            self.load_sync()
        plans = [self._utterance_plan(a, m) for a, m in items]
        results: list[Transcript | Exception | None] = [None] * len(plans)
        waiting: dict[int, _Request] = {}

        def advance(i: int, decode: _Decode | None) -> None:
            try:
                waiting[i] = plans[i].send(decode)  # type: ignore[arg-type]  # None starts the generator
            except StopIteration as done:
                results[i] = done.value
            except Exception as exc:  # this utterance fails; the others go on
                results[i] = exc

        for i in range(len(plans)):
            advance(i, None)
        while waiting:
            key = next(iter(waiting.values())).key
            batch = [i for i, r in waiting.items() if r.key == key]
            requests = [waiting.pop(i) for i in batch]
            try:
                decodes = self.decode_round(requests)
            except Exception as exc:  # CTranslate2 failed on the batch: each of its utterances fails
                for i in batch:
                    plans[i].close()
                    results[i] = exc
                continue
            for i, d in zip(batch, decodes, strict=True):
                advance(i, d)
        return [r if r is not None else RuntimeError("the decode plan returned nothing") for r in results]

    # The round API of pipeline/asr/scheduler.py: `plan` and `decode_round` run in the engine's thread.
    def plan(self, audio: Pcm, meta: UtteranceMeta) -> Generator[_Request, _Decode, Transcript]:
        """One utterance from audio to Transcript, yielding each window it needs decoded (a request with
        a batch `key` and a `cost`) and receiving that window's decode."""
        if self._model is None:
            self.load_sync()
        return self._utterance_plan(audio, meta)

    def decode_round(self, requests: list[_Request]) -> list[_Decode]:
        """Decode requests that share a `key` in one batch."""
        return self._decode_windows(requests)

    def _utterance_plan(self, audio: Pcm, meta: UtteranceMeta) -> Generator[_Request, _Decode, Transcript]:
        t0 = time.perf_counter()
        s = self.settings
        dbfs = rms_dbfs(audio)
        samples = self._to_float(audio)
        duration = len(samples) / SAMPLE_RATE
        features: np.ndarray | None = None
        context = self._context_tokens(meta.context)
        if len(samples) > FULL_WINDOW_S * SAMPLE_RATE:
            d = self._decode_long(samples)  # several windows, by faster-whisper itself (not batched)
        else:
            features = self._features(samples)
            d = yield from self._decode_plan(features, duration, context=context)

        def verdict(d: _Decode) -> str | None:
            return gate(d.text, no_speech_prob=d.no_speech_prob, avg_logprob=d.avg_logprob, audio_dbfs=dbfs,
                        settings=s.gate, compression_ratio_value=d.compression_ratio)

        reason = verdict(d)
        if features is not None and d.window_s < FULL_WINDOW_S and (reason in SECOND_OPINION_REASONS
                                                                     or self._doubtful(d)):
            # A short window padded with many seconds of zero features makes Whisper doubt very short
            # and weak utterances (jfk's 1.4 s "ask not": "S not", no_speech 0.57-0.61, avg_logprob -1.16
            # with 10 s; "Ask not!", avg_logprob -0.67 with 30 s). Before dropping or mangling speech the
            # VAD found, ask the full window once: Whisper's trained window decides, both ways (0.3 s of
            # crowd noise: "Oh, my God." doubtful in 10 s, no_speech 0.74 with 30 s).
            full = yield from self._decode_plan(features, duration, full_window=True, context=context)
            full.encode_s += d.encode_s
            full.generate_s += d.generate_s
            full.extra["attempts"] = d.extra.get("attempts", 1) + full.extra.get("attempts", 1)
            d = full
            reason = verdict(d)
        decode_s = time.perf_counter() - t0
        extra: dict[str, Any] = {
            "window_s": d.window_s, "attempts": d.extra.get("attempts", 1), "encode_s": d.encode_s,
            "generate_s": d.generate_s, "tokens": len(d.tokens), "compression_ratio": d.compression_ratio,
            "temperature": d.temperature, "audio_dbfs": dbfs,
        }
        if d.degenerate_reason:
            extra["degenerate"] = d.degenerate_reason
        if "punct_s" in d.extra:
            extra["punct_s"] = d.extra["punct_s"]
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
            no_speech_prob=d.no_speech_prob,
            avg_logprob=d.avg_logprob,
            final_punct_prob=None if reason else d.final_punct_prob,
            decode_s=decode_s,
            dropped_reason=reason,
            extra=extra,
        )
