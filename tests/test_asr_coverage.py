"""pipeline/asr/coverage.py: the decode's letters against the speech the VAD found, and a timestamped decode's
segments against the speech spans (pure; the engine's second pass on real speech is tests/test_asr_second_pass.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import manifest

from pipeline.asr.coverage import (
    DEFAULT_LETTERS_PER_S,
    LOW_COVERAGE,
    UNCOVERED_MIN_S,
    WORD_SLACK_S,
    assess,
    distinct_letters,
    expected_rate,
    letters,
    longest_word_s,
    repeats,
    subtract,
)
from pipeline.config import Settings
from pipeline.frames import SAMPLE_RATE
from pipeline.source.file import decode_file
from pipeline.vad import make_vad_stage
from tests.conftest import SPEECH

# The FLEURS / LibriVox / repository clips in 11 languages (their README), in the repository or the shared copy.
MULTILINGUAL = (SPEECH / "multilingual", Path("/work/shared/speech/multilingual"))


def test_letters_count_letters_and_digits_in_every_script() -> None:
    assert letters("Ask not, what 1 country!") == 18
    assert letters("我们 今天 去公园。") == 7  # one CJK character, one letter; spaces and punctuation are not
    assert letters("今日は晴れです") == 7
    assert letters("...  ?!") == 0


def test_expected_rate_is_per_language_with_a_default() -> None:
    assert expected_rate("en") == DEFAULT_LETTERS_PER_S == expected_rate(None) == expected_rate("xx")
    assert expected_rate("zh") < expected_rate("ko") < expected_rate("en")
    assert expected_rate("ZH") == expected_rate("zh")


def test_a_decode_with_too_few_letters_for_its_speech_is_short() -> None:
    spans = [(0.3, 4.0), (4.5, 9.0)]  # 8.2 s of speech: ~100 letters expected in English
    assert not assess("He remained upstairs until after the early dawn showed Mary that she need have no fear",
                      "en", spans).short
    cov = assess("And I will see.", "en", spans)
    assert cov.short and cov.ratio < LOW_COVERAGE
    assert cov.uncovered_s == pytest.approx(cov.speech_s * (1 - cov.ratio))
    assert "letters expected" in cov.why()


def test_cjk_is_judged_by_characters() -> None:
    spans = [(0.0, 5.0)]  # five seconds of Mandarin: ~25 characters
    assert not assess("我们今天下午去公园散步然后一起吃晚饭好吗", "zh", spans).short  # 20 characters
    assert assess("我们", "zh", spans).short
    # The same 20 characters read as an English decode would be far too few letters.
    assert assess("我们今天下午去公园散步然后一起吃晚饭好吗", "en", spans).short


def test_too_little_speech_for_the_rate_is_unsure_until_word_times_settle_it() -> None:
    """1.2 s of speech: a shortfall of letters under UNCOVERED_MIN_S of speech is not `short` by the rate, but
    `unsure`; counted (`left_out`) unless aligned words say the speech is covered."""
    slow_yes = assess("Yes.", "en", [(0.2, 0.8)])
    assert not slow_yes.short and slow_yes.unsure and slow_yes.left_out
    assert slow_yes.uncovered_s == pytest.approx(0.6 * (1 - slow_yes.ratio))
    # Its one word, drawn out over the speech: covered, not counted.
    said = assess("Yes.", "en", [(0.2, 0.8)], words=[(0.25, 0.75, "Yes")])
    assert not said.unsure and not said.short and not said.left_out and said.uncovered_s < 0.1
    spans = [(0.2, 1.4)]
    # "Hello" of "Hello, can you hear me": the word covers 0.2-0.6 s, the rest no word reaches.
    lost = assess("Hello.", "en", spans, words=[(0.2, 0.5, "Hello")])
    assert lost.short and lost.left_out and lost.uncovered_s == pytest.approx(1.4 - 0.5 - WORD_SLACK_S)
    assert "of 1.2 s of speech" in lost.why() and "times cover" in lost.why()
    # Enough letters: neither unsure nor short, whatever the length.
    assert not assess("Hello, can you hear me?", "en", spans).left_out
    # A whole second or more left out counts even when that is less than half the speech.
    long_spans = [(0.0, 3.0)]
    assert assess("a", "en", long_spans, words=[(0.0, 0.5, "a"), (1.4, 1.9, "b")]).short


def test_one_aligned_word_covers_at_most_its_letters_said_slowly() -> None:
    """The warping path may stretch a lone word over all of the audio (pipeline/asr/whisper/alignment.py): "I" over
    all of "I picked it up"."""
    assert longest_word_s("I", "en") < longest_word_s("Ask", "en") < longest_word_s("Americans", "en")
    assert longest_word_s("我", "zh") > longest_word_s("a", "en")  # a character takes longer than a letter
    cov = assess("I", "en", [(0.3, 1.04)], words=[(0.0, 1.04, "I")])
    assert cov.uncovered_s == pytest.approx(1.04 - 0.3 - longest_word_s("I", "en") - WORD_SLACK_S)
    assert cov.short
    assert not assess("And.", "en", [(0.0, 0.6)], words=[(0.0, 0.6, "And")]).short


def test_segments_locate_the_speech_a_timestamped_decode_left_out() -> None:
    spans = [(0.2, 3.8), (4.3, 8.0)]
    cov = assess("and I will see that there is no shirking about the boys or about the girls either", "en", spans,
                 segments=[(4.2, 8.0)])
    assert [(round(a, 2), round(b, 2)) for a, b in cov.uncovered] == [(0.2, 3.7)]  # the slack of 0.5 s
    assert cov.short and cov.uncovered_s >= UNCOVERED_MIN_S
    assert "0.2-3.7 s" in cov.why()
    assert not assess("x " * 60, "en", spans, segments=[(0.0, 4.0), (4.0, 8.0)]).short


def test_subtract() -> None:
    assert subtract([(0.0, 10.0)], [(2.0, 3.0), (5.0, 6.0)]) == [(0.0, 2.0), (3.0, 5.0), (6.0, 10.0)]
    assert subtract([(0.0, 1.0)], [(-1.0, 2.0)]) == []


def test_the_vad_speech_spans_give_every_clean_clip_a_plausible_rate() -> None:
    """The expected rates against real read speech in 12 languages: no clean clip's reference falls under
    LOW_COVERAGE of its language's rate (so a correct decode never triggers a second pass), and the spans the
    segmenter gives lie inside the utterance's speech bounds, in order."""
    rows = [(f, "en", r["reference_normalized"]) for f, r in manifest().items()
            if f.startswith(("clapclap/librispeech", "deepspeech", "realtimestt", "whisper.cpp", "mfa/61-"))]
    multilingual = next((d for d in MULTILINGUAL if (d / "manifest.tsv").is_file()), None)
    if multilingual is None:
        pytest.skip("the multilingual clips are not on this machine")
    with (multilingual / "manifest.tsv").open(encoding="utf-8") as fh:
        rows += [(str(multilingual / r["file"]), r["language"], r["reference_transcript"])
                 for r in csv.DictReader(fh, delimiter="\t")]
    assert len({lang for _, lang, _ in rows}) >= 12
    for clip, lang, ref in rows:
        utts = make_vad_stage(Settings()).segment(decode_file(SPEECH / clip))
        spans = [s for u in utts for s in u.spans()]
        for u in utts:
            assert u.speech_start == u.spans()[0][0] and u.spans()[-1][1] == u.speech_end
            assert all(a < b <= c for (a, b), (c, _) in zip(u.spans(), [*u.spans()[1:], (u.speech_end + 1, 0)],
                                                              strict=True))
        cov = assess(ref, lang, [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in spans])
        assert not cov.short, (clip, lang, cov)


def test_a_loop_adds_no_distinct_letters_and_a_repeated_part_is_recognised() -> None:
    assert distinct_letters("illustration buttons illustration buttons illustration buttons") == \
        distinct_letters("Illustration buttons.")
    assert distinct_letters("He remained upstairs. And I will see.") > distinct_letters("And I will see.")
    assert repeats("illustration funds.", "and illustration funds")
    assert not repeats("He remained upstairs until after the early dawn.", "and illustration funds")
    assert not repeats("", "anything")


def test_a_held_word_covers_all_of_its_aligned_time() -> None:
    """ "Um..." drawn out over 0.8 s (the hard stream's spontaneous speech): Whisper's ellipsis says the sound was
    held, so the word is not capped by its letters; the same two letters without it are."""
    spans = [(0.3, 1.1)]
    assert not assess("Um...", "en", spans, words=[(0.0, 1.1, "Um...")]).left_out
    assert assess("Um", "en", spans, words=[(0.0, 1.1, "Um")]).short
