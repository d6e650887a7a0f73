"""Built-in transform steps, registered by name in `BUILTINS`.

Each entry is a factory (a class): the step's extra config keys are its keyword arguments, and the
instance is the step `(text, meta) -> str | None`. They are pure, fast string functions, so they
carry `inline = True` and run directly on the event loop (see `pipeline.transform.chain`).

| name                   | what it does                                                              |
|------------------------|---------------------------------------------------------------------------|
| `filler_words`         | removes um, uh, erm, er, ah, hmm, mm (configurable) and tidies commas      |
| `regex_replace`        | one `pattern`/`replacement`, or a list of `rules`                          |
| `blocklist`            | whole-word, case-insensitive words/phrases: `redact` with a mask or `drop` |
| `whitespace`/`cleanup` | collapse spaces, fix space before punctuation, optional capital and final |
|                        | punctuation                                                               |
| `casing`               | `mode`: upper, lower or sentence; `lowercase`/`uppercase` are shorthands  |
| `max_length`           | truncate at a sentence/word boundary, or drop, past `max_chars`            |
| `strip_annotations`    | removes Whisper's sound annotations: [Music], (laughs), *sighs*, ♪         |
| `webhook`              | POST to an HTTP service that returns the new text (`webhook.py`)          |
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.frames import UtteranceMeta
from pipeline.text import SENTENCE_END as _SENTENCE_END
from pipeline.text import cut_at_grapheme, full_stop, sentence_end_offsets
from pipeline.transform.base import OptionError
from pipeline.transform.webhook import WebhookStep

# Only true hesitation sounds, per language (Whisper's codes): never words that carry meaning, in that language
# or as a loanword ("like", "you know", "so", "well"; German "also", Spanish "este", "o sea", "pues", French
# "ben", "bah", Italian "cioè", Russian "ну"). A sound that is a filler in one language is often a word in another
# (Portuguese "um" is "a/one", Spanish and Italian "eh" closes a question, German "er" is "he"), so each language
# gets only its own list. Languages missing here (Chinese, Japanese and Korean among them: their hesitations
# are syllables of words, which a whole-word match cannot tell apart) keep their text.
DEFAULT_FILLERS: tuple[str, ...] = ("um", "uh", "uhm", "erm", "er", "ah", "hmm", "hm", "mm")  # English
FILLERS_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": DEFAULT_FILLERS,
    "de": ("äh", "ähm", "öh", "öhm", "hm", "hmm"),
    "es": ("eh", "ehm", "em", "mmm", "hmm"),
    "fr": ("euh", "heu", "hum", "hmm"),
    "it": ("ehm", "uhm", "mmh", "hmm"),
    "pt": ("ahn", "hã", "hmm", "hum"),
    "nl": ("eh", "ehm", "uh", "uhm", "hmm"),
    "pl": ("yyy", "eee", "hmm"),
    "ru": ("э", "эм", "хм", "гм"),
    "uk": ("е", "ем", "хм", "гм"),
}
# Letters a hesitation is drawn out on ("ummm", "hmmmm", "ähhh", "эээ"); never "r" ("err" is a word).
_STRETCHY = "mhey" + "эме"  # Latin m h e y, Cyrillic э м е


def language_base(code: str | None) -> str | None:
    """A language code without its region or script ("pt-BR" -> "pt", "zh_Hant" -> "zh"), lower case."""
    if not code or not code.strip():
        return None
    return code.strip().replace("_", "-").split("-")[0].lower()


_CLOSERS = "\"'”’)]»"


def _str_list(option: str, value: Any) -> list[str]:
    """Accept one string or a list of strings (YAML users write either)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise OptionError(option, f"{option} must be a string or a list of strings (got {value!r})")
    return [v.strip() for v in value if v.strip()]


def _phrase_regex(phrase: str) -> str:
    """A literal word or phrase; any run of spaces inside it matches any whitespace."""
    return r"\s+".join(re.escape(w) for w in phrase.split())


def _capitalize_first(s: str) -> str:
    for i, c in enumerate(s):
        if c.isalpha():
            return s[:i] + c.upper() + s[i + 1:] if c.islower() else s
        if not (c in _CLOSERS or c in "\"'“‘(¿¡" or c.isspace()):
            return s
    return s


# ------------------------------------------------------------------------------- filler_words
_OPENERS = "\"'“‘([¿¡«"


def _opening(left: str) -> str | None:
    """How a removed filler after `left` relates to it: "start" (nothing before, or an opening
    quote/bracket: join without a space), "sentence" (a sentence ended before it), None (mid-sentence)."""
    if not left:
        return "start"
    last, before = left[-1], left[:-1]
    if last in _OPENERS and (not before or before[-1].isspace()):
        return "start"
    if last in _SENTENCE_END:
        return "sentence"
    before = before.rstrip()
    if last in _CLOSERS and before and before[-1] in _SENTENCE_END:
        return "sentence"
    return None


def _one_word_opener(left: str) -> bool:
    """True when the current sentence of `left` so far is one word like "So", "Well", "Yeah"
    (not a contraction: "It's, uh, about" is a hesitation, not an opener)."""
    start = max(left.rfind(c) for c in _SENTENCE_END)
    words = left[start + 1:].split()
    return len(words) == 1 and "'" not in words[0] and "’" not in words[0]


def _filler_regex(fillers: list[str], stretch: bool) -> re.Pattern[str]:
    alts = []
    for f in sorted({f.lower() for f in fillers}, key=len, reverse=True):
        rx = _phrase_regex(f)
        if stretch and f[-1] in _STRETCHY:
            rx += re.escape(f[-1]) + "*"
        alts.append(rx)
    # Not inside a word, after a number ("5 mm") or as a question tag ("¿eh?").
    return re.compile(r"(?<![\w'’-])(?<!\d\s)(?<![¿¡])(?P<filler>" + "|".join(alts) + r")(?![\w'’-])"
                      r"(?P<punct>[,;:.!?…—–]*)\s*", re.IGNORECASE)


_EMPTY_BRACKETS = re.compile(r"\s*(?:\(\s*\)|\[\s*\])")


class FillerWords:
    """Remove hesitation fillers and the punctuation ASR put around them, in the utterance's language.

    The language is `meta.language` (the conversation's language; the ASR's for one utterance before it is
    locked). Each language has its own list (`FILLERS_BY_LANGUAGE`): English "um uh uhm erm er ah hmm hm mm",
    German "äh ähm öh öhm hm hmm", Spanish "eh ehm em mmm hmm", French "euh heu hum hmm", ... An utterance in a
    language without a list, or of unknown language, keeps its text: another language's fillers are never
    applied ("um" is Portuguese for "a", "er" German for "he").

    - `words`: the English fillers; replaces the default English list (kept from before languages).
    - `extra`: fillers added to the English list (e.g. `["you know", "i mean"]`).
    - `languages`: `{code: [fillers]}`, a language's own list, replacing its default (`{es: [eh, este]}`); an empty
      list turns the step off for that language; a code without a default adds that language.
    - `stretch` (default true): fillers ending in a hum or a vowel may be drawn out, so `um` also matches
      `ummm`, `hmm` matches `hmmmm`, `äh` matches `ähhh` (`er` is never stretched: `err` is a word).

    Matching is whole-word and case-insensitive; `uh-huh` and `mm-hmm` (which mean "yes") are
    kept, so is a filler right after a number (`5 mm`) and a Spanish question tag (`¿eh?`). Punctuation around a
    removed filler:

    - sentence start: `"Um, I think so."` -> `"I think so."` (the next word is capitalized when the
      filler was);
    - sentence end: `"I agree, uh."` -> `"I agree."`;
    - mid-sentence, the comma before the filler is kept after a one-word opener,
      `"So, um, I think"` -> `"So, I think"`, and dropped otherwise, `"I think, uh, we should"` ->
      `"I think we should"` (it marked the hesitation, and the voice would pause on it).

    An utterance that was only fillers becomes empty, which the chain drops.
    """

    inline = True

    def __init__(self, words: list[str] | None = None, extra: list[str] | None = None,
                 stretch: bool = True, languages: dict[str, Any] | None = None) -> None:
        lists: dict[str, list[str]] = {lang: list(f) for lang, f in FILLERS_BY_LANGUAGE.items()}
        english = _str_list("words", words) if words is not None else list(DEFAULT_FILLERS)
        if words is not None and not english:
            raise OptionError("words", "words is empty; remove the step instead")
        lists["en"] = english + _str_list("extra", extra)
        if languages is not None:
            if not isinstance(languages, dict):
                raise OptionError("languages", f"languages must map language codes to filler lists (got "
                                               f"{languages!r})")
            for code, fillers in languages.items():
                lang = language_base(str(code)) if isinstance(code, str) else None
                if lang is None:
                    raise OptionError("languages", f"languages: {code!r} is not a language code")
                lists[lang] = _str_list(f"languages.{code}", fillers)
        self.words = lists["en"]
        self.languages = lists
        self._rx = {lang: _filler_regex(f, stretch) for lang, f in lists.items() if f}

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str:
        rx = self._rx.get(language_base(meta.language if meta is not None else None) or "")
        if rx is None:
            return text  # a language without fillers, or not known: nothing language-specific
        out: list[str] = []  # text kept so far
        pos = 0
        capitalize_next = False
        for m in rx.finditer(text):
            chunk = text[pos:m.start()]
            if chunk and capitalize_next:
                chunk, capitalize_next = _capitalize_first(chunk), False
            out.append(chunk)
            pos = m.end()
            left = "".join(out).rstrip()
            rest = text[pos:pos + 1]  # only its first character is looked at (a slice would copy the rest)
            terminal = "".join(c for c in m.group("punct") if c in _SENTENCE_END)
            opening = _opening(left)
            if opening:
                # The filler opened a sentence or a quotation: drop it with its punctuation.
                out = [left] if opening == "start" else [left + " "]
                capitalize_next = capitalize_next or m.group("filler")[0].isupper()
            elif terminal and (not rest or rest[0].isupper() or not rest[0].isalpha()):
                # The filler closed a sentence ("I agree, uh."): keep the sentence's end mark.
                out = [left.rstrip(",;:—–") + terminal + (" " if rest else "")]
            else:
                # Mid-sentence: drop the filler's own marks. A comma before it is kept after a one-word
                # opener ("So, um, I" -> "So, I") and otherwise dropped as part of the hesitation
                # ("I think, um, we" -> "I think we"), so the voice does not pause for nothing.
                if left.endswith(",") and not _one_word_opener(left[:-1]):
                    left = left[:-1].rstrip()
                out = [left + " "]
        tail = text[pos:]
        if tail and capitalize_next:
            tail = _capitalize_first(tail)
        out.append(tail)
        result = "".join(out).strip()
        if "(" in result or "[" in result:  # "(um)" leaves "()"
            result = _EMPTY_BRACKETS.sub("", result).strip()
        return result


# ------------------------------------------------------------------------------ regex_replace
_FLAG_NAMES = {"i": re.IGNORECASE, "ignorecase": re.IGNORECASE, "m": re.MULTILINE, "multiline": re.MULTILINE,
               "s": re.DOTALL, "dotall": re.DOTALL, "x": re.VERBOSE, "verbose": re.VERBOSE,
               "a": re.ASCII, "ascii": re.ASCII}


def _parse_flags(option: str, flags: Any) -> re.RegexFlag:
    if flags is None:
        return re.RegexFlag(0)
    names = flags.replace(",", "|").split("|") if isinstance(flags, str) else flags
    if not isinstance(names, list | tuple):
        raise OptionError(option, "flags must be a string like 'ignorecase|multiline' or a list "
                                  f"(got {flags!r})")
    result = re.RegexFlag(0)
    for name in names:
        key = str(name).strip().lower()
        if key not in _FLAG_NAMES:
            raise OptionError(option, f"unknown regex flag {name!r}; use {sorted(set(_FLAG_NAMES))}")
        result |= _FLAG_NAMES[key]
    return result


class RegexReplace:
    """Regular-expression substitution (Python `re` syntax; `\\1`/`\\g<name>` in the replacement).

    Either one rule: `pattern`, `replacement` (default ""), `flags` (e.g. `ignorecase`, or
    `"ignorecase|multiline"`, or a list), `count` (0 = all); or `rules`: a list of mappings with
    those keys, applied in order.
    """

    inline = True
    _RULE_KEYS = frozenset({"pattern", "replacement", "flags", "count"})

    def __init__(self, pattern: str | None = None, replacement: str = "", flags: Any = None, count: int = 0,
                 rules: list[dict[str, Any]] | None = None) -> None:
        if (pattern is None) == (rules is None):
            raise OptionError("pattern", "give either pattern (with replacement) or rules, not both")
        self.rules: list[tuple[re.Pattern[str], str, int]] = []
        if pattern is not None:
            self.rules.append(self._rule("", {"pattern": pattern, "replacement": replacement, "flags": flags,
                                              "count": count}))
            return
        if not isinstance(rules, list) or not rules:
            raise OptionError("rules", "rules must be a non-empty list of "
                                       "{pattern, replacement, flags, count}")
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise OptionError("rules", f"rules[{i}] must be a mapping with pattern and replacement")
            unknown = set(rule) - self._RULE_KEYS
            if unknown:
                raise OptionError("rules", f"rules[{i}] has unknown key(s) {sorted(unknown)}; "
                                           f"allowed: {sorted(self._RULE_KEYS)}")
            if "pattern" not in rule:
                raise OptionError("rules", f"rules[{i}] needs a pattern")
            self.rules.append(self._rule(f"rules[{i}].", rule))

    @staticmethod
    def _rule(where: str, rule: dict[str, Any]) -> tuple[re.Pattern[str], str, int]:
        option = "rules" if where else "pattern"
        pattern, replacement = rule["pattern"], rule.get("replacement", "")
        if replacement is None:
            replacement = ""
        if not isinstance(pattern, str) or not pattern:
            raise OptionError(option, f"{where}pattern must be a non-empty string")
        if not isinstance(replacement, str):
            raise OptionError(option if where else "replacement", f"{where}replacement must be a string")
        count = rule.get("count", 0) or 0
        if not isinstance(count, int) or count < 0:
            raise OptionError(option if where else "count", f"{where}count must be an integer >= 0")
        flags = _parse_flags(option if where else "flags", rule.get("flags"))
        try:
            rx = re.compile(pattern, flags)
        except re.error as exc:
            raise OptionError(option, f"{where}pattern {pattern!r} is not a valid regular expression: "
                                      f"{exc}") from None
        try:  # bad group references and escapes in the replacement fail now, not per utterance
            _check_template(rx, replacement)
        except (re.error, IndexError) as exc:
            raise OptionError(option if where else "replacement",
                              f"{where}replacement {replacement!r} is invalid for this pattern: "
                              f"{exc}") from None
        return rx, replacement, count

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str:
        for rx, replacement, count in self.rules:
            text = rx.sub(replacement, text, count=count)
        return text


def _check_template(rx: re.Pattern[str], replacement: str) -> None:
    """Expand `replacement` against a match with `rx`'s groups: raises re.error if it is invalid."""
    names = {i: n for n, i in rx.groupindex.items()}
    groups = (f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, rx.groups + 1))
    stand_in = re.compile("".join(groups))
    match = stand_in.match("")
    assert match is not None
    match.expand(replacement)


# ---------------------------------------------------------------------------------- blocklist
class Blocklist:
    """Words or phrases that must not be spoken: whole-word, case-insensitive.

    - `words`: list of words/phrases (a phrase matches across any whitespace), and/or
      `words_file`: a UTF-8 file with one per line (`#` starts a comment).
    - `mode`: `redact` (default) replaces each match by `mask` (default `***`); `drop` drops the
      whole utterance.

    "Whole word" means not inside another word: blocking `ass` leaves `class` alone, and `can`
    leaves `can't` alone, but a possessive is caught (`bob` matches in `bob's`).
    """

    inline = True

    def __init__(self, words: list[str] | None = None, mode: str = "redact", mask: str = "***",
                 words_file: str | None = None) -> None:
        entries = _str_list("words", words)
        if words_file is not None:
            try:
                lines = Path(words_file).expanduser().read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise OptionError("words_file", f"cannot read {words_file}: {exc.strerror or exc}") from None
            entries += [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
        if not entries:
            raise OptionError("words", "blocklist needs at least one word (words or words_file)")
        if mode not in ("redact", "drop"):
            raise OptionError("mode", f"mode must be 'redact' or 'drop' (got {mode!r})")
        if not isinstance(mask, str):
            raise OptionError("mask", "mask must be a string")
        self.mode = mode
        self.mask = mask
        alts = sorted({_phrase_regex(e) for e in entries}, key=len, reverse=True)
        self._rx = re.compile(r"(?<![\w'’])(?:" + "|".join(alts) + r")(?=['’]s\b|(?![\w'’]))", re.IGNORECASE)

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str | None:
        if self.mode == "drop":
            return None if self._rx.search(text) else text
        return self._rx.sub(lambda _m: self.mask, text)


# ------------------------------------------------------------------------------------ cleanup
class Cleanup:
    """Tidy whitespace and, optionally, the ends of the text.

    - always: strip, collapse runs of whitespace (newlines included) to one space;
    - `fix_punct_spacing` (default true): remove spaces before `, . ; : ! ? …` ("so , yes" -> "so, yes");
    - `capitalize` (default false): upper-case the first letter;
    - `final_punct` (default none): a mark such as `"."` appended when the text does not already end
      a sentence (`. ! ? …`, `。！？`, `।`, `؟`, ...; closing quotes/brackets are looked through). `"."` stands
      for the language's full stop (`meta.language`, else the script of the last letter): `。` after Chinese
      or Japanese, `।` after Hindi, `۔` after Urdu, nothing after Thai.
    """

    inline = True
    _SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?…]+)(?=\s|$)")

    def __init__(self, capitalize: bool = False, final_punct: str | None = None,
                 fix_punct_spacing: bool = True) -> None:
        if final_punct is not None and (not isinstance(final_punct, str) or not final_punct.strip()):
            raise OptionError("final_punct", "final_punct must be a punctuation mark such as '.' (or null)")
        self.capitalize = bool(capitalize)
        self.final_punct = final_punct.strip() if final_punct else None
        self.fix_punct_spacing = bool(fix_punct_spacing)

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str:
        text = " ".join(text.split())
        if self.fix_punct_spacing:
            text = self._SPACE_BEFORE_PUNCT.sub(r"\1", text)
        if not text:
            return text
        if self.capitalize:
            text = _capitalize_first(text)
        if self.final_punct and text.rstrip(_CLOSERS)[-1:] not in tuple(_SENTENCE_END):
            body = text.rstrip(_CLOSERS)
            if not body:
                return text
            mark = self.final_punct
            if mark == ".":
                mark = full_stop(body, meta.language if meta is not None else None)
            text = body.rstrip(",;:—–-、， ") + mark + text[len(body):]
        return text


# ------------------------------------------------------------------------------------- casing
class Casing:
    """Change letter case. `mode`: `lower`, `upper`, or `sentence` (default).

    `sentence` only *raises* letters: the first letter of each sentence (in any cased script, after Spanish
    `¿ ¡` and opening quotes: "¿qué?" -> "¿Qué?") and, in English text only (`meta.language` "en"), the pronoun
    `I` (`i`, `i'm`, `i've`, ...: "i" is a word of its own in Italian and Catalan); everything else is left as
    ASR wrote it, so names stay capitalized. Turkish and Azerbaijani text gets their dotted and dotless i
    (`i` <-> `İ`, `ı` <-> `I`).
    """

    inline = True
    _PRONOUN_I = re.compile(r"(?<![\w'’])i(?=(?:['’](?:m|ve|ll|d))?(?![\w'’]))")
    _FIRST_LETTER = re.compile(r"[\s\"'“‘«‹(\[¿¡]*(\w)")

    def __init__(self, mode: str = "sentence") -> None:
        if mode not in ("lower", "upper", "sentence"):
            raise OptionError("mode", f"mode must be lower, upper or sentence (got {mode!r})")
        self.mode = mode

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str:
        lang = language_base(meta.language if meta is not None else None)
        dotted = lang in _DOTTED_I_LANGUAGES
        if self.mode == "lower":
            return (text.replace("I", "ı").replace("İ", "i") if dotted else text).lower()
        if self.mode == "upper":
            return (text.replace("i", "İ") if dotted else text).upper()
        if lang == "en":
            text = self._PRONOUN_I.sub("I", text)
        chars = list(text)
        for start in (0, *sentence_end_offsets(text)):
            m = self._FIRST_LETTER.match(text, start)
            if m and m.group(1).islower():
                c = m.group(1)
                chars[m.start(1)] = "İ" if dotted and c == "i" else "I" if dotted and c == "ı" else c.upper()
        return "".join(chars)


_DOTTED_I_LANGUAGES = frozenset({"tr", "az"})


def lowercase() -> Casing:
    """`casing` with mode `lower`."""
    return Casing("lower")


def uppercase() -> Casing:
    """`casing` with mode `upper`."""
    return Casing("upper")


# --------------------------------------------------------------------------------- max_length
class MaxLength:
    """Keep the spoken text short. Past `max_chars` (default 1000):

    - `mode: truncate` (default): cut at the last sentence end if it keeps at least half the
      limit, else at the last word boundary, and append `ellipsis` (default "…") after a word cut;
    - `mode: drop`: drop the utterance.
    """

    inline = True

    def __init__(self, max_chars: int = 1000, mode: str = "truncate", ellipsis: str = "…") -> None:
        if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
            raise OptionError("max_chars", f"max_chars must be an integer >= 1 (got {max_chars!r})")
        if mode not in ("truncate", "drop"):
            raise OptionError("mode", f"mode must be 'truncate' or 'drop' (got {mode!r})")
        if not isinstance(ellipsis, str) or len(ellipsis) >= max_chars:
            raise OptionError("ellipsis", "ellipsis must be a string shorter than max_chars")
        self.max_chars, self.mode, self.ellipsis = max_chars, mode, ellipsis

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str | None:
        if len(text) <= self.max_chars:
            return text
        if self.mode == "drop":
            return None
        # Sentence ends of every script (CJK 。 needs no space after it: pipeline/text.py).
        ends = [e for e in sentence_end_offsets(text) if e <= self.max_chars]
        if ends and ends[-1] >= self.max_chars // 2:
            return text[:ends[-1]].rstrip()
        room = self.max_chars - len(self.ellipsis)
        cut = text[:room + 1].rfind(" ")
        # No space (CJK, a long Thai phrase): cut between graphemes, never inside one ("क्षि" stays whole).
        body = text[:cut] if cut > 0 else cut_at_grapheme(text, room)
        return body.rstrip(" ,;:—–-、，") + self.ellipsis


# -------------------------------------------------------------------------- strip_annotations
class StripAnnotations:
    """Remove Whisper's non-speech annotations: `[Music]`, `[BLANK_AUDIO]`, `(laughs)`,
    `*sighs*`, `♪ ... ♪`. `parens` (default true) also removes parenthesised text; set it false if
    your speakers dictate parentheses."""

    inline = True

    def __init__(self, parens: bool = True) -> None:
        parts = [r"\[[^\[\]]{0,60}\]", r"\*[^*\n]{1,40}\*", r"[♪♫][^♪♫]{0,200}[♪♫]", r"[♪♫]"]
        if parens:
            parts.append(r"\([^()]{0,60}\)")
        self._rx = re.compile("|".join(parts))
        self._tidy = Cleanup()

    def __call__(self, text: str, meta: UtteranceMeta | None = None) -> str:
        return self._tidy(self._rx.sub(" ", text))


BUILTINS: dict[str, Callable[..., Any]] = {
    "filler_words": FillerWords,
    "regex_replace": RegexReplace,
    "blocklist": Blocklist,
    "whitespace": Cleanup,
    "cleanup": Cleanup,
    "casing": Casing,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "max_length": MaxLength,
    "strip_annotations": StripAnnotations,
    "webhook": WebhookStep,
}


def builtin_names() -> Iterable[str]:
    return sorted(BUILTINS)
