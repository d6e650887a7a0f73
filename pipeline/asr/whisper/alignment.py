"""Word times of a decode: its text tokens aligned to the audio by Whisper's cross-attention (CTranslate2's
`align`, the dynamic time warping faster-whisper's `word_timestamps` use), for the coverage check of an utterance
too short for the letter rate to judge (pipeline/asr/coverage.py). Pure here except `align_words`.

What the alignment does at its edges (tiny.en on jfk.wav, scripts-free: tests/test_asr_word_coverage.py): the
warping path runs from the first audio frame to the last, so the first word starts at 0 (it takes in any lead-in)
and the end-of-text token takes in what no word was written for ("And so" decoded from "And so my fellow
Americans": "so" ends at 1.04 s of 3.2 s). A lone word may be stretched over all of the audio ("I" over all of
"I picked it up"); coverage.py caps what one word can cover by its letters (`longest_word_s`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.asr.whisper.window import Segment

ALIGN_FRAMES_PER_S = 50  # the encoder's output positions per second (two 10 ms feature frames each)
MEDIAN_FILTER_WIDTH = 7  # faster-whisper's default for word timestamps


def word_spans(words: Sequence[str], word_tokens: Sequence[Sequence[int]],
               alignments: Sequence[tuple[int, int]]) -> tuple[Segment, ...]:
    """Each word's (start, end) in seconds from the window start, from the warping path `alignments` ((text token
    index, encoder frame) pairs) over the text's tokens followed by end-of-text; `words`/`word_tokens` as the
    tokenizer's `split_to_word_tokens` gives them (the last one is end-of-text). faster-whisper's own arithmetic
    (`WhisperModel.find_alignment`): a word starts where the path first reaches its first token."""
    if len(words) < 2 or not alignments:
        return ()
    text_indices = np.array([p[0] for p in alignments])
    time_indices = np.array([p[1] for p in alignments])
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / ALIGN_FRAMES_PER_S
    if len(jump_times) <= int(boundaries[-1]):  # the path skipped tokens: no word times to trust
        return ()
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    return tuple(Segment(float(a), float(max(a, b)), w) for w, a, b in zip(words[:-1], starts, ends, strict=True))


def align_words(model: Any, tokenizer: Any, encoded: Any, texts: Sequence[Sequence[int]],
                frames: Sequence[int]) -> list[tuple[Segment, ...]]:
    """Word times of each text (its tokens, no special ones, at least one) in the audio of one batch of encoder
    outputs (`frames`: each item's feature frames, 10 ms each); one language, hence one start sequence, per call."""
    results = model.align(encoded, tokenizer.sot_sequence, [list(t) for t in texts], [int(n) for n in frames],
                          median_filter_width=MEDIAN_FILTER_WIDTH)
    out: list[tuple[Segment, ...]] = []
    for text, result in zip(texts, results, strict=True):
        words, word_tokens = tokenizer.split_to_word_tokens([*text, tokenizer.eot])
        out.append(word_spans(words, word_tokens, result.alignments))
    return out
