"""Sentence punctuation and sentence splitting shared by the whole codebase (ASR, endpointing, transforms,
message splitting), for every script Whisper writes.

A leaf module (the standard library and `regex` only) so that any layer can import it without import cycles.

How scripts end sentences, and what the functions here do with them:

- Latin, Cyrillic, Greek, Korean (spaces between words): `. ? ! …`, followed by whitespace (they also occur
  inside tokens: "3.14", "e.g.", "example.com", "wait...what"). Spanish also *opens* questions and
  exclamations with `¿ ¡` (SENTENCE_OPENERS): they begin a sentence and never end one.
- Chinese and Japanese (no spaces): `。 ！ ？` (and Whisper's ASCII `. ? !` straight before the next ideograph):
  a sentence ends wherever the mark stands.
- Devanagari (Hindi, Marathi, Nepali, Sanskrit): the danda `।` and double danda `॥`; Arabic and Persian `؟`,
  Urdu `۔`; Armenian `։`; Ethiopic `። ፧`; Myanmar `။`: these marks end a sentence wherever they stand.
- Thai, Lao, Khmer write no sentence punctuation at all; a space separates sentences (and clauses). Nothing
  here can tell a sentence end there, so `split_sentences` returns such text whole, `ends_sentence` is false
  (the endpointer then waits for the full silence: never an early cut), and message splitting falls back to
  spaces, then grapheme boundaries.
"""

from __future__ import annotations

import regex

# Latin-script sentence ends. They also occur inside tokens ("3.14", "e.g.", "example.com", "wait...what"),
# so a sentence break after them needs whitespace (or the end of the text, or a spaceless script) to follow.
LATIN_SENTENCE_END = ".?!…"

# Other scripts' sentence ends: double marks (‼ ⁇ ⁈ ⁉), CJK ideographic and full-width marks (。 ！ ？ ． and
# the half-width ｡), Arabic question mark and Urdu full stop (؟ ۔), Devanagari danda and double danda (। ॥),
# Ethiopic full stop and question mark (። ፧), Armenian full stop (։), Myanmar section mark (။).
# CJK writes no space between sentences, so these end a sentence wherever they stand.
SCRIPT_SENTENCE_END = "‼⁇⁈⁉。！？．｡؟۔।॥።፧։။"

SENTENCE_END: str = LATIN_SENTENCE_END + SCRIPT_SENTENCE_END

# Marks that open a sentence (Spanish "¿Qué?", "¡Hola!"): part of the next sentence, never an end.
SENTENCE_OPENERS = "¿¡"

# Closing quotes and brackets that may follow a sentence end: `"Stop."`, `(see above.)`, `「はい。」`.
CLOSERS: str = "\"'”’»›)]}）］｝」』】〕〗〙〛〉》"

# Scripts written without spaces between words: a Latin mark right before one of their letters ends a sentence
# ("你好吗?我很好" as Whisper sometimes writes Chinese).
_SPACELESS = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u3000-\u303f]")

_END_RUN = regex.compile("[" + regex.escape(SENTENCE_END + CLOSERS) + "]+")
_GRAPHEME = regex.compile(r"\X")


def ends_sentence(text: str) -> bool:
    """True when `text` ends with sentence punctuation, ignoring trailing whitespace and closing quotes/brackets."""
    i = len(text)
    while i and (text[i - 1].isspace() or text[i - 1] in CLOSERS):
        i -= 1
    return i > 0 and text[i - 1] in SENTENCE_END


def sentence_end_offsets(text: str) -> list[int]:
    """Offsets e (0 < e <= len(text)) such that a sentence of `text` ends just before text[e].

    A sentence ends after a run of sentence-end marks and closing quotes/brackets that holds a mark (`?!`,
    `."`, `。」`, `?”`). After a run of Latin marks only, the run must be followed by whitespace, the end of the
    text, or a letter of a spaceless script; other scripts' marks end a sentence wherever they stand.
    """
    cuts: list[int] = []
    for m in _END_RUN.finditer(text):
        run = m.group()
        if not any(c in SENTENCE_END for c in run):
            continue
        e = m.end()
        script_mark = any(c in SCRIPT_SENTENCE_END for c in run)
        if script_mark or e == len(text) or text[e].isspace() or _SPACELESS.match(text, e):
            cuts.append(e)
    return cuts


def split_sentences(text: str) -> list[str]:
    """`text` cut into its sentences, each stripped of surrounding whitespace (empty pieces left out).
    Joining them with " " (or "" for spaceless scripts) gives back the text up to whitespace; text without
    sentence punctuation (Thai, an unfinished phrase) is one piece."""
    pieces, start = [], 0
    for e in [*sentence_end_offsets(text), len(text)]:
        piece = text[start:e].strip()
        if piece:
            pieces.append(piece)
        start = e
    return pieces


def grapheme_boundaries(text: str) -> list[int]:
    """Offsets between user-perceived characters (extended grapheme clusters, Unicode's Indic conjunct rule
    included: "क्षि" is one), from 0 to len(text). Cutting text anywhere else splits a character."""
    out = [0]
    for m in _GRAPHEME.finditer(text):
        out.append(m.end())
    return out


def cut_at_grapheme(text: str, limit: int) -> str:
    """The longest prefix of `text` of at most `limit` code points that ends between graphemes."""
    if len(text) <= limit:
        return text
    best = 0
    for b in grapheme_boundaries(text[:limit + 1]):
        if b <= limit:
            best = b
    return text[:best]


# The full stop each language writes where English writes "." (Cleanup's final_punct "."): Chinese and Japanese
# "。", the Devanagari and Bengali danda, Urdu "۔", Armenian, Ethiopic, Myanmar; Thai, Lao and Khmer end a
# sentence with no mark at all ("").
FULL_STOP_BY_LANGUAGE: dict[str, str] = {
    "zh": "。", "ja": "。", "yue": "。", "hi": "।", "mr": "।", "ne": "।", "sa": "।", "bn": "।", "as": "।",
    "ur": "۔", "hy": "։", "am": "።", "my": "။", "th": "", "lo": "", "km": "",
}
_FULL_STOP_BY_SCRIPT = ((regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]"), "。"),
                        (regex.compile(r"[\p{Devanagari}\p{Bengali}]"), "।"),
                        (regex.compile(r"[\p{Thai}\p{Lao}\p{Khmer}]"), ""))
_LAST_LETTER = regex.compile(r"\p{L}(?=[^\p{L}]*$)")


def full_stop(text: str, language: str | None = None) -> str:
    """The full stop for `text`: its language's (FULL_STOP_BY_LANGUAGE; `language` may carry a region, "zh-TW"),
    else by the script of its last letter, else "."."""
    base = language.replace("_", "-").split("-")[0].lower() if language else ""
    if base in FULL_STOP_BY_LANGUAGE:
        return FULL_STOP_BY_LANGUAGE[base]
    m = _LAST_LETTER.search(text)
    if m:
        for rx, mark in _FULL_STOP_BY_SCRIPT:
            if rx.match(m.group()):
                return mark
    return "."


_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\u3000-\u303f\uff00-\uffef]")


def joiner(head: str, tail: str) -> str:
    """What goes between two pieces of one text decoded apart at a pause: nothing when either side of the seam is
    Chinese or Japanese ("今日は" + "晴れです"), else one space (Thai, Lao and Khmer too: they put a space where the
    speaker pauses, between phrases and sentences)."""
    left, right = head.rstrip()[-1:], tail.lstrip()[:1]
    return "" if (left and _CJK.match(left)) or (right and _CJK.match(right)) else " "
