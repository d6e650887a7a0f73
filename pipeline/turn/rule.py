"""The turn-end rule: at a pause, how much silence finishes the utterance, from every signal there is.

Runs once per pause (when the speculative decode and the prosody of the pause's snapshot are both in:
pipeline/speculation.py), never per frame. The combination is a logistic regression fitted offline on
the pauses of the shared clips (scripts/pause_dataset.py, scripts/turn_fit.py; the separation tables
and the chosen operating point are in docs/turn-end.md):

    logit = turn_bias + turn_w_punct * punct + turn_w_lengthening * lengthening + turn_w_energy_decay * decay

`punct` is Whisper's probability of the final . ? ! (0 when the text ends without one), `lengthening` and
`decay` come from pipeline/turn/prosody.py. At or over `endpoint.turn_prob` the utterance finishes after
`endpoint.turn_pause_ms` of silence (or sooner, if the graded policy says so).

Vetoes and fallbacks:
- a transcript ending in a function word of its language ("... of the") never finishes early: it waits
  `vad.hangover_ms`;
- the graded policy (pipeline/endpoint.py) decides alone when a signal is missing: the engine gives no
  punctuation probability (openai-http), the language has no function-word list (pipeline/turn/words.py;
  the weights were fitted on English speech, so they are not trusted elsewhere either), or the prosody
  could not be measured (too little voicing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.config import EndpointSettings
from pipeline.endpoint import required_silence_ms
from pipeline.text import ends_sentence
from pipeline.turn.prosody import Prosody
from pipeline.turn.words import ends_unfinished

Rule = Literal["turn", "unfinished", "graded"]  # what decided (echo_relay_turn_decisions_total{rule})


@dataclass(frozen=True, slots=True)
class Decision:
    silence_ms: int  # silence after the speech end that finishes the utterance
    rule: Rule
    why: str = ""  # for the log: which signal was missing when the graded policy decided
    turn_prob: float | None = None  # the combination's probability, when it was computed


def turn_probability(text: str, final_punct_prob: float, prosody: Prosody, settings: EndpointSettings
                     ) -> float | None:
    """The combination's probability that the turn ended at this pause; None when a prosody cue is missing."""
    if prosody.lengthening is None or prosody.decay_db_per_s is None:
        return None
    punct = final_punct_prob if ends_sentence(text) else 0.0
    logit = (settings.turn_bias + settings.turn_w_punct * punct + settings.turn_w_lengthening * prosody.lengthening
             + settings.turn_w_energy_decay * prosody.decay_db_per_s)
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))


def decide(text: str, final_punct_prob: float | None, language: str | None, prosody: Prosody | None,
           settings: EndpointSettings, hangover_ms: int) -> Decision:
    """Silence (ms after the speech end) after which an utterance with this transcript and prosody is finished."""
    graded = required_silence_ms(text, final_punct_prob, settings, hangover_ms)
    if not settings.turn_rule:
        return Decision(graded, "graded", "turn rule off")
    unfinished = ends_unfinished(text, language)
    if unfinished:
        return Decision(hangover_ms, "unfinished", "ends in a function word")
    if unfinished is None:
        return Decision(graded, "graded", f"no function-word list for {language!r}")
    if final_punct_prob is None:
        return Decision(graded, "graded", "no punctuation probability")
    prob = None if prosody is None else turn_probability(text, final_punct_prob, prosody, settings)
    if prob is None:
        return Decision(graded, "graded", "no prosody")
    if prob >= settings.turn_prob:
        return Decision(min(graded, settings.turn_pause_ms, hangover_ms), "turn", "", prob)
    return Decision(graded, "graded", "", prob)
