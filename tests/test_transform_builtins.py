"""Built-in transform steps on realistic ASR (Whisper-style) text."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import ConfigError, TransformSettings, TransformStep
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.transform import BUILTINS, build_chain
from pipeline.transform.base import OptionError
from pipeline.transform.builtins import (
    Blocklist,
    Casing,
    Cleanup,
    FillerWords,
    MaxLength,
    RegexReplace,
    StripAnnotations,
)

META = UtteranceMeta(utterance_id="u1", audio_start_s=0.0, audio_end_s=1.0, language="en")  # English text


def test_builtin_names() -> None:
    assert {"filler_words", "regex_replace", "blocklist", "whitespace", "cleanup", "casing", "lowercase",
            "uppercase", "max_length", "strip_annotations", "webhook"} <= set(BUILTINS)


# ------------------------------------------------------------------------------ filler_words
@pytest.mark.parametrize(("text", "expected"), [
    ("So, um, I think we should go.", "So, I think we should go."),
    ("Um, I think so.", "I think so."),
    ("Uh, yeah, that's right.", "Yeah, that's right."),
    ("um so what do we do", "so what do we do"),
    ("Um, uh, let me check.", "Let me check."),
    ("It's, uh, about three o'clock.", "It's about three o'clock."),
    ("I think, uh, we should, um, go now.", "I think we should go now."),
    ("Okay. Well, um, I guess.", "Okay. Well, I guess."),
    ("I was um going to say", "I was going to say"),
    ("I think so, um.", "I think so."),
    ("Well, uh, I don't know, um.", "Well, I don't know."),
    ("Is it, uh?", "Is it?"),
    ("And then, um...", "And then..."),
    ("I agree, um. Let's go.", "I agree. Let's go."),
    ("I agree. Um. Let's go.", "I agree. Let's go."),
    ("So um... yeah.", "So yeah."),
    ("Ummm, hmmmm, okay.", "Okay."),
    ("Erm, the thing is, er, complicated.", "The thing is complicated."),
    ("Ah, I see. Hmm, interesting.", "I see. Interesting."),
    ('"Um, yes," he said.', '"Yes," he said.'),
    ("That's (um) fine.", "That's fine."),
    # kept: meaningful words, affirmatives, units, words containing filler letters
    ("Uh-huh, mm-hmm, that's it.", "Uh-huh, mm-hmm, that's it."),
    ("It's 5 mm wide.", "It's 5 mm wide."),
    ("To err is human.", "To err is human."),
    ("The umbrella is in the hummer, uhm.", "The umbrella is in the hummer."),
    ("You know, like, I mean it.", "You know, like, I mean it."),
    ("Hmm.", ""),
    ("Uh, um.", ""),
])
def test_filler_words(text: str, expected: str) -> None:
    assert FillerWords()(text, META) == expected


def test_filler_words_custom_lists() -> None:
    assert FillerWords(extra=["you know"])("So, you know, it works, you know.", META) == "So, it works."
    only = FillerWords(words=["like"])
    assert only("It was, like, um, great.", META) == "It was um, great."
    assert FillerWords(stretch=False)("Ummm, okay.", META) == "Ummm, okay."
    with pytest.raises(OptionError):
        FillerWords(words=[])
    with pytest.raises(OptionError):
        FillerWords(words=[1, 2])  # type: ignore[list-item]


def meta_in(language: str | None) -> UtteranceMeta:
    return UtteranceMeta(utterance_id="u1", audio_start_s=0.0, audio_end_s=1.0, language=language)


@pytest.mark.parametrize(("language", "text", "expected"), [
    ("es", "Eh, creo que sí.", "Creo que sí."),
    ("es", "Pues, ehm, no sé, eh.", "Pues, no sé."),
    ("es", "Está bueno, ¿eh?", "Está bueno, ¿eh?"),  # a question tag, not a hesitation
    ("es", "Este libro es, o sea, muy bueno.", "Este libro es, o sea, muy bueno."),  # "este" = this
    ("es", "Um, uh, hola.", "Um, uh, hola."),  # English fillers are not Spanish ones
    ("de", "Ähm, ich glaube, äh, ja.", "Ich glaube ja."),
    ("de", "Also, er kommt morgen.", "Also, er kommt morgen."),  # "also" = so, "er" = he
    ("de", "Ähhh, hmmm, gut.", "Gut."),
    ("fr", "Euh, je pense que oui, hum.", "Je pense que oui."),
    ("fr", "Ben, c'est bon.", "Ben, c'est bon."),
    ("pt", "Comprei um carro, ahn, ontem.", "Comprei um carro ontem."),  # "um" = a
    ("it", "Ehm, i ragazzi sono qui.", "I ragazzi sono qui."),
    ("nl", "Uhm, ik weet het niet.", "Ik weet het niet."),
    ("ru", "Э, я думаю, эмм, да.", "Я думаю да."),
    ("pt-BR", "Hum, acho que sim.", "Acho que sim."),  # a region: the language's list
    ("en", "Um, I think so.", "I think so."),
    ("ja", "えーと、そうですね。", "えーと、そうですね。"),  # no list: the text as it came
    (None, "Um, I think so.", "Um, I think so."),  # language unknown: nothing language-specific
])
def test_filler_words_per_language(language: str | None, text: str, expected: str) -> None:
    assert FillerWords()(text, meta_in(language)) == expected


def test_filler_words_languages_option() -> None:
    step = FillerWords(languages={"es": ["eh", "este"], "de": []})
    assert step("Este, eh, vale.", meta_in("es")) == "Vale."
    assert step("Äh, ja.", meta_in("de")) == "Äh, ja."  # an empty list turns it off for that language
    assert step("Euh, oui.", meta_in("fr")) == "Oui."  # other languages keep their defaults
    assert FillerWords(languages={"sv": ["öh"]})("Öh, ja.", meta_in("sv")) == "Ja."  # a language added
    assert FillerWords(words=["like"])("Um, like, sí.", meta_in("es")) == "Um, like, sí."  # words: English
    with pytest.raises(OptionError):
        FillerWords(languages=["es"])  # type: ignore[arg-type]
    with pytest.raises(OptionError):
        FillerWords(languages={"es": [1]})


async def test_filler_only_utterance_is_dropped_by_chain() -> None:
    m = Metrics()
    steps = [TransformStep(step="filler_words"), TransformStep(step="whitespace")]
    chain = build_chain(TransformSettings(steps=steps), m)
    out = await chain.run("Um. Uh, hmm.", META)
    assert out.dropped and out.dropped_by is not None and out.dropped_by.step == "filler_words"
    assert m.value("echo_relay_dropped_total", {"stage": "transform", "reason": "empty:filler_words"}) == 1


@pytest.mark.parametrize(("language", "text", "expected"), [
    ("es", "hola. ¿qué tal? ¡muy bien! él vino.", "Hola. ¿Qué tal? ¡Muy bien! Él vino."),
    ("it", "i ragazzi sono qui. i cani no.", "I ragazzi sono qui. I cani no."),  # "i" is an article
    ("ca", "tu i jo", "Tu i jo"),  # Catalan "i" = and
    ("en", "yes i'm here. and i know", "Yes I'm here. And I know"),
    (None, "so i said", "So i said"),  # the pronoun rule is English: not applied to an unknown language
    ("ru", "привет. как дела?", "Привет. Как дела?"),
    ("tr", "istanbul güzel. ırmak", "İstanbul güzel. Irmak"),
    ("ja", "はい。そうです。", "はい。そうです。"),
])
def test_casing_sentence_in_other_languages(language: str | None, text: str, expected: str) -> None:
    assert Casing("sentence")(text, meta_in(language)) == expected


def test_casing_turkish_upper_and_lower() -> None:
    assert Casing("upper")("istanbul", meta_in("tr")) == "İSTANBUL"
    assert Casing("lower")("IRMAK İZMİR", meta_in("tr")) == "ırmak izmir"
    assert Casing("upper")("istanbul", meta_in("en")) == "ISTANBUL"


@pytest.mark.parametrize(("language", "text", "expected"), [
    ("zh", "我很好", "我很好。"), (None, "今日は晴れです", "今日は晴れです。"), ("hi", "मैं ठीक हूँ", "मैं ठीक हूँ।"),
    ("ur", "میں ٹھیک ہوں", "میں ٹھیک ہوں۔"), ("th", "สวัสดีครับ", "สวัสดีครับ"), ("es", "hola", "hola."),
    ("zh", "你好吗？", "你好吗？"), ("hi", "ठीक है।", "ठीक है।"), ("ar", "هل أنت بخير؟", "هل أنت بخير؟"),
    ("zh", "我很好，", "我很好。"),
])
def test_cleanup_final_punct_is_the_language_full_stop(language: str | None, text: str, expected: str) -> None:
    assert Cleanup(final_punct=".")(text, meta_in(language)) == expected


def test_max_length_in_scripts_without_spaces() -> None:
    ja = "今日は晴れです。" * 10 + "明日は雨が降るでしょう"
    assert MaxLength(max_chars=50)(ja, META) == "今日は晴れです。" * 6  # 48 chars: the last sentence end that fits
    step = MaxLength(max_chars=10)
    out = step("क्षि" * 10, META)  # no space, no sentence end: cut between graphemes, never inside "क्षि"
    assert out is not None and out == "क्षि" * 2 + "…"
    out = step("漢字かなカナ漢字かなカナ", META)
    assert out == "漢字かなカナ漢字か…"


# ----------------------------------------------------------------------------- regex_replace
def test_regex_replace_single_rule_and_flags() -> None:
    step = RegexReplace(pattern=r"\bgonna\b", replacement="going to", flags="ignorecase")
    assert step("I'm Gonna go, gonna bring snacks.", META) == "I'm going to go, going to bring snacks."
    assert RegexReplace(pattern="a", replacement="b", count=1)("aaa", META) == "baa"
    assert RegexReplace(pattern="^x", replacement="", flags=["m", "ignorecase"])("X1\nx2", META) == "1\n2"


def test_regex_replace_rules_in_order_with_groups() -> None:
    step = RegexReplace(rules=[
        {"pattern": r"(\d+) percent", "replacement": r"\1%"},
        {"pattern": r"(?P<n>\d+)%", "replacement": r"\g<n> per cent", "flags": "i"},
        {"pattern": r"\s+", "replacement": " "},
    ])
    assert step("Growth was  12 percent this year.", META) == "Growth was 12 per cent this year."


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"pattern": "(unclosed"}, "pattern"),
    ({"pattern": "a", "replacement": r"\2"}, "replacement"),
    ({"pattern": "a", "replacement": r"\q"}, "replacement"),
    ({"pattern": "(?P<x>a)", "replacement": r"\g<y>"}, "replacement"),
    ({"pattern": "a", "flags": "bogus"}, "flags"),
    ({}, "pattern"),
    ({"pattern": "a", "rules": [{"pattern": "b"}]}, "pattern"),
    ({"rules": [{"patern": "b"}]}, "rules"),
    ({"rules": []}, "rules"),
    ({"rules": [{"pattern": "("}]}, "rules"),
])
def test_regex_replace_rejects_bad_options(kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(OptionError) as ei:
        RegexReplace(**kwargs)
    assert ei.value.option == option


# --------------------------------------------------------------------------------- blocklist
def test_blocklist_redacts_whole_words_case_insensitively() -> None:
    step = Blocklist(words=["damn", "Acme Corp", "ass"])
    text = "Damn, the ACME   corp deal is a pain in the ass, but the class passed."
    assert step(text, META) == "***, the *** deal is a pain in the ***, but the class passed."
    named = Blocklist(words=["bob"], mask="[name]")
    assert named("Bob's car, bobsled, Bob.", META) == "[name]'s car, bobsled, [name]."
    assert Blocklist(words=["can"])("I can't, but you can.", META) == "I can't, but you ***."


def test_blocklist_drop_mode() -> None:
    step = Blocklist(words=["project falcon"], mode="drop")
    assert step("Tell them about Project  Falcon.", META) is None
    assert step("Tell them about the falcon project.", META) == "Tell them about the falcon project."


def test_blocklist_words_file(tmp_path: Any) -> None:
    f = tmp_path / "words.txt"
    f.write_text("# secrets\nfoo\n\nbar baz  # phrase\n", encoding="utf-8")
    assert Blocklist(words_file=str(f))("foo and bar baz and food", META) == "*** and *** and food"
    with pytest.raises(OptionError) as ei:
        Blocklist(words_file=str(tmp_path / "missing.txt"))
    assert ei.value.option == "words_file"
    with pytest.raises(OptionError):
        Blocklist()


# ----------------------------------------------------------------------------------- cleanup
def test_whitespace_cleanup_defaults() -> None:
    step = Cleanup()
    assert step("  so ,  I think   we\nshould  go .  ", META) == "so, I think we should go."
    assert step("it costs .5 dollars", META) == "it costs .5 dollars"


def test_cleanup_capitalize_and_final_punct() -> None:
    step = Cleanup(capitalize=True, final_punct=".")
    assert step(" i think we should go ", META) == "I think we should go."
    assert step("really?", META) == "Really?"
    assert step('he said "hello"', META) == 'He said "hello."'
    assert step("and then,", META) == "And then."
    assert step("wait...", META) == "Wait..."
    with pytest.raises(OptionError):
        Cleanup(final_punct="")


# ------------------------------------------------------------------------------------ casing
def test_casing_modes() -> None:
    text = "i think NASA's plan is fine. and i'm sure? yes! i'd go."
    assert Casing("lower")(text, META) == text.lower()
    assert Casing("upper")(text, META) == text.upper()
    assert Casing("sentence")(text, META) == "I think NASA's plan is fine. And I'm sure? Yes! I'd go."
    assert Casing("sentence")("the iPhone is in it", META) == "The iPhone is in it"
    assert BUILTINS["lowercase"]()("Hello There", META) == "hello there"
    assert BUILTINS["uppercase"]()("Hello There", META) == "HELLO THERE"
    with pytest.raises(OptionError):
        Casing("title")


# -------------------------------------------------------------------------------- max_length
def test_max_length_truncates_at_sentence_or_word() -> None:
    step = MaxLength(max_chars=40)
    assert step("Short enough.", META) == "Short enough."
    assert step("This is one sentence. This is another that goes on and on.", META) == "This is one sentence."
    cut = step("This is one very long sentence that goes on and on and on without end", META)
    assert cut == "This is one very long sentence that…" and cut is not None and len(cut) <= 40
    assert MaxLength(max_chars=10, mode="drop")("this is too long", META) is None
    with pytest.raises(OptionError):
        MaxLength(max_chars=0)


# ------------------------------------------------------------------------- strip_annotations
def test_strip_annotations() -> None:
    step = StripAnnotations()
    assert step("[Music] Hello (laughs) there, *sighs* friend. ♪ la la ♪", META) == "Hello there, friend."
    assert step("[BLANK_AUDIO]", META) == ""
    assert StripAnnotations(parens=False)("Call me (maybe) [Music]", META) == "Call me (maybe)"


# ---------------------------------------------------------------------------- through config
async def test_realistic_chain_from_config() -> None:
    settings = TransformSettings(steps=[
        TransformStep(step="strip_annotations"),
        TransformStep(step="filler_words"),
        TransformStep(step="regex_replace", rules=[{"pattern": r"\bgonna\b", "replacement": "going to",
                                                   "flags": "ignorecase"}]),
        TransformStep(step="blocklist", words=["damn"]),
        TransformStep(step="casing", mode="sentence"),
        TransformStep(step="whitespace", capitalize=True, final_punct="."),
        TransformStep(step="max_length", max_chars=200),
    ])
    chain = build_chain(settings, Metrics())
    out = await chain.run(" [Music] um, i'm gonna, uh, fix the damn build  ", META)
    assert out.text == "I'm going to fix the *** build."
    assert [t.outcome for t in out.timings] == ["ok"] * 7


def test_builtin_option_errors_name_keys() -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(TransformSettings(steps=[TransformStep(step="max_length", max_chars="ten")]))
    assert ei.value.key == "transform.steps[0].max_chars"
