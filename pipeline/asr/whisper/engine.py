"""`asr.engine: faster-whisper`: loads the model once and drives decode plans in its own thread.

The parts: window.py (window sizes, token budget, the request/decode types), prompts.py (per-language prompts),
decoder.py (the CTranslate2 calls), plan.py (one utterance's fallback ladder, second opinion and gate). This
module loads and warms up the model and batches the windows that several plans ask for at the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.asr.base import AsrError, SyncAsrEngine
from pipeline.asr.models import ModelLocation, check_model_dir, load_files, resolve_model
from pipeline.asr.whisper.decoder import WindowDecoder
from pipeline.asr.whisper.plan import Plan, utterance_plan
from pipeline.asr.whisper.prompts import PromptBook
from pipeline.asr.whisper.window import FULL_WINDOW_S, Decode, Request, window_s
from pipeline.config import AsrSettings
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, UtteranceMeta

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

WARMUP_S = 1.0
WARMUP_NOISE_PEAK = 10.0  # int16 units: very low noise, so warm-up exercises the no-speech path quickly


def load_whisper_model(path: Path, settings: AsrSettings, location: ModelLocation | None = None) -> WhisperModel:
    """Load a CTranslate2 Whisper directory, or a packaged model split in `location.parts` (joined in memory);
    any failure becomes a one-line AsrError."""
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:  # pragma: no cover - hard dependency
        raise AsrError(f"faster-whisper is not installed: {exc}") from exc
    files = load_files(location) if location is not None else None
    if files is None:
        check_model_dir(path)
    try:
        return WhisperModel(str(path), device=settings.device, compute_type=settings.compute_type,
                            cpu_threads=settings.cpu_threads, num_workers=settings.batch.workers, files=files)
    except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError for corrupt or unsupported files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AsrError(f"Whisper model at {path} could not be loaded: {detail} (is model.bin complete and a "
                       f"CTranslate2 Whisper conversion for this ctranslate2 version?)") from exc
    finally:
        if files is not None:  # the joined parts' open file: read by now, or never to be
            files["model.bin"].close()


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
        self._decoder: WindowDecoder | None = None
        self._only_language: str | None = None  # "en" once an English-only model is loaded

    # ------------------------------------------------------------------------------- loading
    @property
    def loaded(self) -> bool:
        return self._decoder is not None

    @property
    def only_language(self) -> str | None:
        return self._only_language

    @property
    def decoder(self) -> WindowDecoder:
        if self._decoder is None:
            raise AsrError("the ASR model is not loaded")
        return self._decoder

    def load_sync(self) -> None:
        if self._decoder is not None:
            return
        t0 = time.perf_counter()
        s = self.settings
        self.location = resolve_model(s.model, s.models_dir, download=s.download,
                                      hf_cache_dir=self._hf_cache_dir)
        model = load_whisper_model(self.location.path, s, self.location)
        language = s.language
        if not model.model.is_multilingual and s.task == "translate":
            raise AsrError(f"asr.task translate needs a multilingual model; {s.model} is English-only "
                           f"(asr.model: base is packaged: README \"Languages\")")
        if not model.model.is_multilingual:
            if language not in (None, "en") or (s.languages and s.languages != ["en"]):
                log.warning("model %s is English-only; asr.language=%r, asr.languages=%r ignored, using 'en' "
                            "(asr.model: base is multilingual: README \"Languages\")", s.model, language,
                            s.languages)
            language = "en"
        self._only_language = None if model.model.is_multilingual else language
        prompts = PromptBook(model, s)
        if language is not None:
            prompts.setup(language)  # an unsupported asr.language fails the load, not the first utterance
        self._decoder = WindowDecoder(model, prompts, s, language)
        self._warm_up(self._decoder)
        self.load_s = time.perf_counter() - t0
        log.info("ASR model %s loaded from %s (%s%s, %s, %s, %d threads) and warmed up in %.2f s",
                 s.model, self.location.path, self.location.source,
                 f" {self.location.origin}" if self.location.parts else "", s.device, s.compute_type,
                 s.cpu_threads, self.load_s)
        if self.metrics is not None:
            self.metrics.model_loaded.set(1)

    def _warm_up(self, decoder: WindowDecoder) -> None:
        """Decode ~1 s of very low noise so the first utterance does not pay first-call costs."""
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(int(WARMUP_S * SAMPLE_RATE)) * WARMUP_NOISE_PEAK).astype(np.float32) / 32768.0
        t0 = time.perf_counter()
        windows = [window_s(WARMUP_S)] * 2 if self.settings.short_window else []
        windows.append(FULL_WINDOW_S)  # the fallback (and short_window=false) path
        for w in windows:
            decoder.decode_one(decoder.features(noise), w, decoder.fixed_language, temperature=0.0, budget=8)
        log.debug("ASR warm-up: %d decodes in %.2f s", len(windows), time.perf_counter() - t0)

    # ------------------------------------------------------------------------------ decoding
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
        plans = [self.plan(a, m) for a, m in items]
        results: list[Transcript | Exception | None] = [None] * len(plans)
        waiting: dict[int, Request] = {}

        def advance(i: int, decode: Decode | None) -> None:
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
    def plan(self, audio: Pcm, meta: UtteranceMeta) -> Plan:
        """One utterance from audio to Transcript, yielding each window it needs decoded (a request with
        a batch `key` and a `cost`) and receiving that window's decode."""
        if self._decoder is None:
            self.load_sync()
        return utterance_plan(audio, meta, self.decoder)

    def decode_round(self, requests: list[Request]) -> list[Decode]:
        """Decode requests that share a `key` in one batch."""
        return self.decoder.decode(requests)
