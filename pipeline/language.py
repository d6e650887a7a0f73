"""The conversation's language (`asr.language: auto`): a small state machine over whole utterances.

One tracker per relay (a conversation); `serve`'s relays share one engine, so the language travels with each
request (`UtteranceMeta.language` -> the decoder's `Request.language`), never as engine state::

    FIXED(L)     asr.language is a code: decoded in L, never changes; also entered from any state by `fix(L)`
                 when the loaded model writes only L (an English-only model: AsrEngine.only_language)

    DETECTING ──── one language reaches detect.lock_speech_s of confident speech ───▶ LOCKED(L)   reason "locked"
        (an utterance is confident when its detection is >= detect.lock_probability; short confident
         ones add up; unsure ones are decoded in the detector's best guess and count for nothing)

    LOCKED(L) ──── detect.switch_utterances consecutive evidence utterances in M ───▶ LOCKED(M)   reason "switched"
        evidence: M detected >= detect.switch_probability on >= detect.switch_speech_s of speech (the
        decoder also decodes such an utterance in M: decoder.py); a confident utterance in L ends the run of
        evidence, a short or unsure one leaves it as it is (it says nothing either way)

Why: per-utterance detection turned a 7-word disfluent English clip into Arabic (issue 23); one second of speech
is a poor witness (Whisper base, tests/data/speech/multilingual: a wrong language often gets 0.3-0.6 on the
first second, the right one 0.9-1.0 on whole utterances of 4-14 s). Pure: no model, no clock, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from pipeline.config import LanguageDetectSettings

ChangeReason = Literal["locked", "switched"]


class LanguageState(enum.Enum):
    FIXED = "fixed"  # asr.language is a code
    DETECTING = "detecting"  # auto, nothing locked yet
    LOCKED = "locked"  # auto, the conversation's language is known (it may still switch)


@dataclass(frozen=True, slots=True)
class Heard:
    """What one whole utterance says about its language: the detector's top language and its probability
    (None: no detection ran) and the seconds of speech it was detected on."""

    language: str | None
    probability: float | None
    speech_s: float


@dataclass(frozen=True, slots=True)
class LanguageChanged:
    """The conversation's language locked or switched (the `language` event)."""

    language: str
    probability: float
    previous: str | None
    reason: ChangeReason


class LanguageTracker:
    """The language of one conversation. `language` is what its next utterances are decoded in (None while
    detecting: the decoder detects each one); `observe` takes each final utterance, in the order of speech."""

    def __init__(self, settings: LanguageDetectSettings, fixed: str | None) -> None:
        self.settings = settings
        self.state = LanguageState.FIXED if fixed is not None else LanguageState.DETECTING
        self.language: str | None = fixed
        self.probability: float | None = None  # of the detection that locked or switched it
        self._seconds: dict[str, float] = {}  # DETECTING: confident speech heard per language
        self._best: dict[str, float] = {}  # ... and its highest probability
        self._run: tuple[str, int, float] | None = None  # LOCKED: (other language, evidence count, lowest prob)

    @property
    def locked(self) -> bool:
        return self.state is not LanguageState.DETECTING

    def fix(self, language: str) -> None:
        """The model can write nothing but `language`: asr.language (auto, or another code) cannot apply.
        Without this an English-only model left an auto conversation detecting for ever (its decodes carry
        no detection probability)."""
        self.state, self.language, self.probability = LanguageState.FIXED, language, None
        self._seconds.clear()
        self._best.clear()
        self._run = None

    def observe(self, heard: Heard) -> LanguageChanged | None:
        if self.state is LanguageState.FIXED or heard.language is None or heard.probability is None:
            return None
        if self.state is LanguageState.DETECTING:
            return self._detecting(heard.language, heard.probability, heard.speech_s)
        return self._locked(heard.language, heard.probability, heard.speech_s)

    def _detecting(self, language: str, prob: float, speech_s: float) -> LanguageChanged | None:
        if prob < self.settings.lock_probability:
            return None
        self._seconds[language] = self._seconds.get(language, 0.0) + speech_s
        self._best[language] = max(self._best.get(language, 0.0), prob)
        if self._seconds[language] < self.settings.lock_speech_s:
            return None
        return self._change(language, self._best[language], "locked")

    def _locked(self, language: str, prob: float, speech_s: float) -> LanguageChanged | None:
        s = self.settings
        if language == self.language:
            if prob >= s.lock_probability:
                self._run = None  # a confident utterance in the conversation's language
            return None
        if prob < s.switch_probability or speech_s < s.switch_speech_s:
            return None  # short or unsure: no evidence either way
        run = self._run
        count, lowest = (run[1] + 1, min(run[2], prob)) if run is not None and run[0] == language else (1, prob)
        self._run = (language, count, lowest)
        if count < s.switch_utterances:
            return None
        return self._change(language, lowest, "switched")

    def _change(self, language: str, prob: float, reason: ChangeReason) -> LanguageChanged:
        change = LanguageChanged(language, round(prob, 4), self.language, reason)
        self.state, self.language, self.probability = LanguageState.LOCKED, language, round(prob, 4)
        self._seconds.clear()
        self._best.clear()
        self._run = None
        return change


def restrict(distribution: dict[str, float], allowed: list[str] | None) -> dict[str, float]:
    """The detector's distribution over `allowed` only (`asr.languages`), renormalised to sum to 1; all of it
    when `allowed` is None. Languages of the set the model gave no probability count as 0."""
    if not allowed:
        return distribution
    kept = {code: distribution.get(code, 0.0) for code in allowed}
    total = sum(kept.values())
    if total <= 0:
        return {code: 1.0 / len(kept) for code in kept}
    return {code: p / total for code, p in kept.items()}
