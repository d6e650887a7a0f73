"""Sentence punctuation shared by the whole codebase (ASR, endpointing, transforms, message splitting).

A leaf module (standard library only) so that any layer can import it without import cycles.
"""

from __future__ import annotations

# Latin-script sentence ends. They also occur inside tokens ("3.14", "e.g.", "example.com", "wait...what"),
# so a sentence break after them needs whitespace (or the end of the text) to follow.
LATIN_SENTENCE_END = ".?!…"

# Other scripts' sentence ends: double marks (‼ ⁇ ⁈ ⁉), CJK ideographic and full-width marks (。 ！ ？ ． and
# the half-width ｡), Arabic question mark and Urdu full stop (؟ ۔), Devanagari danda and double danda (। ॥),
# Ethiopic full stop and question mark (። ፧), Armenian full stop (։), Myanmar section mark (။).
# CJK writes no space between sentences, so these end a sentence wherever they stand.
SCRIPT_SENTENCE_END = "‼⁇⁈⁉。！？．｡؟۔।॥።፧։။"

SENTENCE_END: str = LATIN_SENTENCE_END + SCRIPT_SENTENCE_END

# Closing quotes and brackets that may follow a sentence end: `"Stop."`, `(see above.)`, `「はい。」`.
CLOSERS: str = "\"'”’»›)]}）］｝」』】〕〗〙〛〉》"


def ends_sentence(text: str) -> bool:
    """True when `text` ends with sentence punctuation, ignoring trailing whitespace and closing quotes/brackets."""
    i = len(text)
    while i and (text[i - 1].isspace() or text[i - 1] in CLOSERS):
        i -= 1
    return i > 0 and text[i - 1] in SENTENCE_END
