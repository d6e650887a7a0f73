"""Whisper's prompt per language: the tokenizer, the start-of-transcript sequence (the spoken language and
`asr.task`'s token, with `asr.initial_prompt` and `asr.hotwords`),
the suppressed tokens, and an utterance's committed beginning as previous text.

Built once per language, on first use (a detected language is set up when it is first seen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.asr.base import AsrError
from pipeline.config import AsrSettings

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

# Tokens of an utterance's committed beginning given as previous text (read speech: ~3 tokens/s, so the
# last ~10 s). CTranslate2 batches only prompts of one length, so the context length is part of a batch key.
CONTEXT_TOKENS = 32


class PromptBook:
    """The per-language tokenizers and prompts of one loaded model."""

    def __init__(self, model: WhisperModel, settings: AsrSettings) -> None:
        self._model = model
        self._settings = settings
        self._tokenizers: dict[str, Any] = {}
        self._prompts: dict[tuple[str, bool], list[int]] = {}  # by (language, timestamps)
        self._previous: dict[str, list[int]] = {}  # asr.initial_prompt's tokens, by language
        self._suppress: dict[str, list[int]] = {}

    def setup(self, language: str) -> None:
        """Build `language`'s prompt (at once when it is built already); AsrError when the model lacks it."""
        if (language, False) in self._prompts:
            return
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        try:
            tok = Tokenizer(self._model.hf_tokenizer, self._model.model.is_multilingual, task=self._settings.task,
                            language=language)
        except ValueError as exc:
            raise AsrError(f"asr.language {language!r} is not supported by the model: {exc}") from exc
        previous: list[int] = []
        if self._settings.initial_prompt:
            previous = tok.encode(" " + self._settings.initial_prompt.strip())
        self._tokenizers[language] = tok
        self._previous[language] = previous
        for timestamps in (False, True):
            self._prompts[language, timestamps] = self._model.get_prompt(
                tok, previous, without_timestamps=not timestamps, hotwords=self._settings.hotwords or None)
        self._suppress[language] = list(get_suppressed_tokens(tok, [-1]))

    def tokenizer(self, language: str) -> Any:
        self.setup(language)
        return self._tokenizers[language]

    def suppressed(self, language: str) -> list[int]:
        """The tokenizer's special and non-speech tokens (the same for every language of a model)."""
        self.setup(language)
        return self._suppress[language]

    def prompt(self, language: str, context: tuple[int, ...] = (), *, timestamps: bool = False) -> list[int]:
        """The start-of-transcript sequence, with `context` (previous-text tokens) after the initial prompt;
        `timestamps`: without <|notimestamps|>, so Whisper writes segment times."""
        self.setup(language)
        if not context:
            return self._prompts[language, timestamps]
        return self._model.get_prompt(self._tokenizers[language], self._previous[language] + list(context),
                                      without_timestamps=not timestamps, hotwords=self._settings.hotwords or None)

    def context_tokens(self, text: str, language: str) -> tuple[int, ...]:
        """The last CONTEXT_TOKENS tokens of an utterance's committed beginning (text tokens are the same for
        every language of a model)."""
        if not text.strip():
            return ()
        return tuple(self.tokenizer(language).encode(" " + text.strip())[-CONTEXT_TOKENS:])
