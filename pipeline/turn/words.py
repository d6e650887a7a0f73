"""Function words that leave a phrase unfinished, per language: a transcript ending in one is mid-sentence.

A speaker who stops after an article, a preposition, a conjunction or an auxiliary ("... the", "... of",
"... and", "... was") has not finished: the word needs what follows it. Lists are keyed by ISO 639-1
code (`Transcript.language`); a language without a list gives no verdict (`None`), and the endpointer
then does without this signal (pipeline/turn/rule.py). Add a language by adding its set here; the
words are compared in lower case, stripped of the punctuation Whisper attaches.

Deliberately left out: words that often end a turn too ("in", "on", "up", "out", "to" in "I want to",
"so", "that", "this", "who", "her" in "a gift to her", the modals and "do" in "yes, I can", "I did"): a
false "unfinished" holds that turn back to the full hangover, so a word that ends many turns costs more
than it saves.
"""

from __future__ import annotations

import regex

_ENGLISH_WORDS = """
a an the
of for from with at by into onto upon about than toward towards between among through during without
within across against along beneath under
and or but nor because although though unless whereas if whose
is am are was were be being has have had
my your his its our their
"""
ENGLISH = frozenset(_ENGLISH_WORDS.split())

FUNCTION_WORDS: dict[str, frozenset[str]] = {"en": ENGLISH}

_EDGE = regex.compile(r"^[\p{P}\p{S}]+|[\p{P}\p{S}]+$")


def last_word(text: str) -> str:
    """The transcript's last word, lower case, without the punctuation around it ('' when none)."""
    for token in reversed(text.split()):
        word = _EDGE.sub("", token).lower()
        if word:
            return word
    return ""


def ends_unfinished(text: str, language: str | None) -> bool | None:
    """True when the transcript ends in a function word of its language, False when it does not, None
    when the language has no list (or the transcript no word): no verdict."""
    words = FUNCTION_WORDS.get((language or "").split("-")[0].lower())
    word = last_word(text)
    if words is None or not word:
        return None
    return word in words
