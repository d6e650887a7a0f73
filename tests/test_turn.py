"""The turn-end rule (pipeline/turn/): on pauses recorded from shared clips with the relay's own VAD and
tiny.en, and its fallbacks when a signal is missing."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
from faults import real_engine

from pipeline.config import EndpointSettings, load_settings
from pipeline.endpoint import required_silence_ms
from pipeline.frames import SAMPLE_RATE, AudioFrame, Transcript, UtteranceMeta, ms_to_samples
from pipeline.source.file import decode_file
from pipeline.turn.prosody import NO_PROSODY, Prosody, prosody
from pipeline.turn.rule import decide, turn_probability
from pipeline.turn.words import FUNCTION_WORDS, ends_unfinished, last_word
from pipeline.vad import SpeechPaused, SpeechResumed, UtteranceEnded, make_vad_stage
from tests.conftest import clip

EP = EndpointSettings()
HANG = 700
# One sentence of 12 s read with pauses of 0.22, 0.35 and 0.48 s between its clauses ("... very extensive |
# but was now contracted within small compass | and hemmed about partly by high wooden fences | and partly
# by the outbuildings ..."); Whisper ends the 0.35 s one with a period at p 0.93.
ONE_SENTENCE = "clapclap/librispeech_dev_clean/2086-149220-0000.flac"
CLAUSES = "clapclap/librispeech_dev_clean/2902-9006-0017.flac"  # "... slaveholders, | ... Belisarius, | ..."


@dataclass
class RecordedPause:
    start_s: float
    length_s: float  # until speech resumed, or the hangover closed the utterance
    transcript: Transcript
    prosody: Prosody


async def recorded_pauses(name: str) -> list[RecordedPause]:
    """The clip (plus 2.5 s of silence) through the relay's VAD; at each 150 ms pause, what the endpointer
    has there: the speculative decode of the snapshot and its prosody."""
    settings = load_settings(None, overrides={"endpoint.enabled": True})
    engine = real_engine()
    audio = np.concatenate([decode_file(clip(name)), np.zeros(int(2.5 * SAMPLE_RATE), np.int16)])
    vad = make_vad_stage(settings)
    block = ms_to_samples(settings.source.block_ms)
    found: list[RecordedPause] = []
    for i in range(0, len(audio), block):
        for ev in vad.process(AudioFrame(audio[i:i + block], i)):
            if isinstance(ev, SpeechPaused):
                snap = ev.snapshot
                tr = await engine.transcribe(snap.audio, UtteranceMeta(snap.id, 0.0, 0.0))
                found.append(RecordedPause(snap.speech_end / SAMPLE_RATE, 0.0, tr,
                                           prosody(snap.audio, snap.speech_end - snap.start)))
            elif isinstance(ev, SpeechResumed) and found:
                found[-1].length_s = ev.pos / SAMPLE_RATE - found[-1].start_s
            elif isinstance(ev, UtteranceEnded) and found and not found[-1].length_s:
                found[-1].length_s = HANG / 1000
    return found


def finished_early(p: RecordedPause) -> bool:
    """The rule ends the utterance at this pause before the hangover would."""
    need = decide(p.transcript.text, p.transcript.final_punct_prob, p.transcript.language, p.prosody, EP,
                  HANG).silence_ms
    return need < HANG and p.length_s * 1000 >= need


@pytest.mark.parametrize("name", [ONE_SENTENCE, CLAUSES])
async def test_clause_pauses_are_not_finished_and_the_turn_end_is(name: str) -> None:
    pauses = await recorded_pauses(name)
    *inside, last = pauses
    assert len(inside) >= 2, [(p.start_s, p.transcript.text) for p in pauses]
    assert [p for p in inside if finished_early(p)] == []
    # the pauses inside include ones Whisper ends with a period, and ones as long as the turn-end wait
    assert any(p.transcript.text.rstrip().endswith(".") and p.length_s * 1000 >= EP.turn_pause_ms for p in inside)
    decision = decide(last.transcript.text, last.transcript.final_punct_prob, last.transcript.language,
                      last.prosody, EP, HANG)
    assert decision.rule == "turn", decision
    assert decision.silence_ms == EP.turn_pause_ms
    # the graded policy alone waits 600 ms for this turn end
    graded = required_silence_ms(last.transcript.text, last.transcript.final_punct_prob, EP, HANG)
    assert graded > EP.turn_pause_ms


async def test_without_the_rule_the_graded_policy_decides_the_same_pauses() -> None:
    pauses = await recorded_pauses(ONE_SENTENCE)
    off = EP.model_copy(update={"turn_rule": False})
    for p in pauses:
        tr = p.transcript
        assert decide(tr.text, tr.final_punct_prob, tr.language, p.prosody, off, HANG).silence_ms == \
            required_silence_ms(tr.text, tr.final_punct_prob, off, HANG)


# ------------------------------------------------------------------------------------ fallbacks
TURN_END = Prosody(final_slope_st_per_s=-20.0, final_pitch_st=-6.0, lengthening=0.8, final_level_db=-15.0,
                   decay_db_per_s=-150.0)  # what 2086's turn end measures, near enough


def test_the_combination_finishes_a_likely_turn_end_early() -> None:
    prob = turn_probability("I handed it to him.", 0.85, TURN_END, EP)
    assert prob is not None and prob >= EP.turn_prob
    assert decide("I handed it to him.", 0.85, "en", TURN_END, EP, HANG).silence_ms == EP.turn_pause_ms


@pytest.mark.parametrize(("p", "language", "cues", "why"), [
    (None, "en", TURN_END, "no punctuation probability"),  # openai-http: no token probabilities
    (0.85, "xx", TURN_END, "no function-word list for 'xx'"),
    (0.85, None, TURN_END, "no function-word list for None"),
    (0.85, "en", None, "no prosody"),
    (0.85, "en", NO_PROSODY, "no prosody"),  # too little voicing (a whisper)
])
def test_a_missing_signal_falls_back_to_the_graded_policy(p: float | None, language: str | None,
                                                          cues: Prosody | None, why: str) -> None:
    d = decide("I handed it to him.", p, language, cues, EP, HANG)
    assert (d.rule, d.why) == ("graded", why)
    assert d.silence_ms == required_silence_ms("I handed it to him.", p, EP, HANG)


def test_a_language_with_a_list_uses_the_rule_and_its_regional_tag_too() -> None:
    assert decide("I handed it to him.", 0.85, "en-GB", TURN_END, EP, HANG).rule == "turn"


def test_a_trailing_function_word_waits_the_hangover_even_when_whisper_is_sure() -> None:
    d = decide("and partly by the.", 0.99, "en", TURN_END, EP, HANG)
    assert (d.rule, d.silence_ms) == ("unfinished", HANG)
    assert required_silence_ms("and partly by the.", 0.99, EP, HANG) < HANG  # the graded policy alone would not


def test_a_weak_combination_leaves_the_graded_wait() -> None:
    drawn_out = replace(TURN_END, lengthening=3.0, decay_db_per_s=-10.0)  # a held syllable, level not falling
    d = decide("within small compass.", 0.93, "en", drawn_out, EP, HANG)
    assert d.turn_prob is not None and d.turn_prob < EP.turn_prob
    assert (d.rule, d.silence_ms) == ("graded", EP.likely_pause_ms)


@pytest.mark.parametrize(("text", "language", "expected"), [
    ("Ask not what your country can do for", "en", True),
    ("and hemmed about partly by the", "en", True),
    ("The ENCLOSURE had formerly been very extensive, but", "en", True),
    ("...what you can do for your country.", "en", False),
    ("«Et puis le»", "fr", None),  # no list: no verdict, never a wrong one
    ("", "en", None),
    ("  ...  ", "en", None),
])
def test_ends_unfinished(text: str, language: str | None, expected: bool | None) -> None:
    assert ends_unfinished(text, language) is expected


def test_function_words_are_lower_case_single_words() -> None:
    for words in FUNCTION_WORDS.values():
        assert all(w == w.lower() and w == last_word(w) for w in words)


def test_prosody_of_too_little_audio_is_missing_not_made_up() -> None:
    assert prosody(np.zeros(1000, np.int16), 1000) == NO_PROSODY
    silence = prosody(np.zeros(2 * SAMPLE_RATE, np.int16), 2 * SAMPLE_RATE)
    assert silence.lengthening is None and silence.final_slope_st_per_s is None
