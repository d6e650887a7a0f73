"""Unit tests of the hallucination gate (pure functions, no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.asr.gate import (
    SILENCE_DBFS,
    compression_ratio,
    gate,
    has_repetition,
    is_annotation,
    is_credit,
    is_doubled,
    is_phantom,
    normalize_phrase,
    rms_dbfs,
)
from pipeline.config import GateSettings

G = GateSettings()
OK = {"no_speech_prob": 0.05, "avg_logprob": -0.3, "audio_dbfs": -20.0}


def test_rms_dbfs_levels() -> None:
    assert rms_dbfs(np.zeros(1600, np.int16)) == SILENCE_DBFS
    assert rms_dbfs(np.zeros(0, np.int16)) == SILENCE_DBFS
    full = np.full(1600, 32767, np.int16)
    assert rms_dbfs(full) == pytest.approx(0.0, abs=0.01)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000) * 32768 * 10 ** (-50 / 20)).astype(np.int16)
    assert rms_dbfs(noise) == pytest.approx(-50.0, abs=0.3)
    assert rms_dbfs(np.full(100, 0.5, np.float32)) == pytest.approx(-6.02, abs=0.01)


def test_normalize_phrase() -> None:
    assert normalize_phrase("  Thank you!! ") == "thank you"
    assert normalize_phrase("Thanks for watching.") == "thanks for watching"
    assert normalize_phrase("[BLANK_AUDIO]") == "blank audio"
    assert normalize_phrase("...") == ""
    assert normalize_phrase("Subtitles by the Amara.org community") == normalize_phrase(
        "subtitles by the amara.org community")


def test_keeps_normal_speech() -> None:
    assert gate("And so, my fellow Americans.", settings=G, **OK) is None


@pytest.mark.parametrize("text", ["", "   ", ".", "...", " - "])
def test_empty(text: str) -> None:
    assert gate(text, settings=G, **OK) == "empty"


def test_whisper_no_speech_rule_needs_both_conditions() -> None:
    # High no-speech probability AND low log-probability: silence.
    assert gate("you", no_speech_prob=0.9, avg_logprob=-1.0, audio_dbfs=-20, settings=G) == "no_speech"
    # A confident decode is kept despite a high no-speech probability (Whisper's rule) ...
    assert gate("hello there", no_speech_prob=0.9, avg_logprob=-0.3, audio_dbfs=-20, settings=G) is None
    # ... and a low no-speech probability keeps a moderately unsure decode.
    assert gate("hello there", no_speech_prob=0.2, avg_logprob=-1.0, audio_dbfs=-20, settings=G) is None


def test_low_logprob() -> None:
    stats = {"no_speech_prob": 0.1, "audio_dbfs": -20.0}
    assert gate("hello there", avg_logprob=-1.6, settings=G, **stats) == "low_logprob"
    strict = GateSettings(min_avg_logprob=-0.5)
    assert gate("hello there", avg_logprob=-0.6, settings=strict, **stats) == "low_logprob"


def test_repetition_by_compression_ratio() -> None:
    loop = "Ask what you can do for your country. " * 12
    assert compression_ratio(loop) > G.max_compression_ratio
    assert gate(loop, settings=G, **OK) == "repetition"
    assert gate("Ask what you can do for your country.", settings=G, **OK) is None
    assert compression_ratio("") == 0.0


@pytest.mark.parametrize("text", ["Thank you.", "thank you!", "Thanks for watching!", "you", "Bye.",
                                  "Thank you. Thank you.", "Subtitles by the Amara.org community"])
def test_phantom_on_near_silence(text: str) -> None:
    assert gate(text, no_speech_prob=0.3, avg_logprob=-0.5, audio_dbfs=-55.0, settings=G) == "phantom"


@pytest.mark.parametrize("text", ["Thank you.", "Bye.", "Okay."])
def test_phantom_phrases_are_kept_when_loud(text: str) -> None:
    # Somebody really said it: the audio is at speech level.
    assert gate(text, no_speech_prob=0.3, avg_logprob=-0.5, audio_dbfs=-25.0, settings=G) is None


def test_phantom_threshold_is_configurable() -> None:
    s = GateSettings(phantom_max_dbfs=-60.0)
    assert gate("Thank you.", no_speech_prob=0.3, avg_logprob=-0.5, audio_dbfs=-55.0, settings=s) is None
    s = GateSettings(phantom_phrases=["hello world"])
    quiet = {"no_speech_prob": 0.3, "avg_logprob": -0.5, "audio_dbfs": -55.0}
    assert gate("Hello, world!", settings=s, **quiet) == "phantom"
    assert gate("Thank you.", no_speech_prob=0.3, avg_logprob=-0.5, audio_dbfs=-55.0, settings=s) is None


def test_phantom_needs_the_whole_text() -> None:
    assert not is_phantom("Thank you so much for coming", G.phantom_phrases)
    assert gate("Thank you so much for coming", no_speech_prob=0.3, avg_logprob=-0.5, audio_dbfs=-55,
                settings=G) is None
    assert is_phantom("bye bye bye", G.phantom_phrases)
    assert not is_phantom("", G.phantom_phrases)


@pytest.mark.parametrize("text", ["[Music]", "(upbeat music)", "*coughs*", "[BLANK_AUDIO]",
                                  "(Applause) [Music]"])
def test_annotations_are_dropped_at_any_level(text: str) -> None:
    assert is_annotation(text)
    assert gate(text, no_speech_prob=0.1, avg_logprob=-0.3, audio_dbfs=-15.0, settings=G) == "phantom"


def test_symbols_only_are_empty() -> None:
    assert gate("♪ ♪", no_speech_prob=0.1, avg_logprob=-0.3, audio_dbfs=-15.0, settings=G) == "empty"


def test_text_with_an_annotation_inside_is_kept() -> None:
    assert not is_annotation("hello (laughs) there")
    assert gate("hello (laughs) there", settings=G, **OK) is None


def test_has_repetition() -> None:
    def words(text: str) -> list[str]:
        return text.split()

    assert has_repetition(words("and so " + "ask what you can do for your country " * 4))
    assert has_repetition(words("of house of house of house of house"))
    # Legitimate short repetitions are not loops.
    assert not has_repetition(words("here's some more words words words words um and that"))
    assert not has_repetition(words("no no no"))
    assert not has_repetition(words("the cat sat on the mat and the dog sat on the rug"))
    assert not has_repetition([])


def test_order_of_reasons() -> None:
    # Empty wins over everything; no_speech before low_logprob.
    assert gate("", no_speech_prob=0.99, avg_logprob=-5, audio_dbfs=-90, settings=G) == "empty"
    assert gate("you", no_speech_prob=0.99, avg_logprob=-2, audio_dbfs=-90, settings=G) == "no_speech"
    assert gate("you", no_speech_prob=0.1, avg_logprob=-2, audio_dbfs=-90, settings=G) == "low_logprob"


@pytest.mark.parametrize(("text", "doubled"), [
    ("Experience proves this. Experience proves this.", True),
    ("Ask not, ask not.", False),  # two words: too short to call a loop
    ("words words words words", False),  # one-word phrase
    ("and so my fellow Americans and so my fellow Americans", True),
    ("Experience proves this. Experience proves that.", False),
    ("Experience proves this.", False),
])
def test_is_doubled(text: str, doubled: bool) -> None:
    assert is_doubled(text.split()) is doubled


# ------------------------------------------------------------------------------- other languages
QUIET = {"no_speech_prob": 0.3, "avg_logprob": -0.5, "audio_dbfs": -55.0}
LOUD = {"no_speech_prob": 0.1, "avg_logprob": -0.3, "audio_dbfs": -15.0}


@pytest.mark.parametrize("text", [
    "Sous-titres réalisés par la communauté d'Amara.org",
    "Subtítulos realizados por la comunidad de Amara.org",
    "Sottotitoli creati dalla comunità Amara.org",
    "Ondertitels ingediend door de Amara.org gemeenschap",
    "Legendas pela comunidade Amara.org",
    "Napisy stworzone przez społeczność Amara.org",
    "字幕由Amara.org社区提供",
    "字幕由 优优独播剧场 提供",  # the pattern, not a fixed string
    "Untertitel im Auftrag des ZDF, 2017",
    "Untertitel im Auftrag des ZDF für funk, 2021. Untertitel im Auftrag des ZDF für funk, 2021.",
    "Untertitelung des ZDF, 2020",
    "Sous-titrage ST' 501",
    "Субтитры сделал DimaTorzok",
    "Редактор субтитров А.Синецкая Корректор А.Егорова",
    "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
    "中文字幕志愿者 李宗盛",
    "Subtitles by the Amara.org community",
    "SOUS-TITRES RÉALISÉS PAR LA COMMUNAUTÉ D'AMARA.ORG",  # case folded
])
def test_subtitle_credits_are_dropped_at_any_level(text: str) -> None:
    assert is_credit(text, G.phantom_patterns)
    assert gate(text, settings=G, **LOUD) == "phantom"


@pytest.mark.parametrize("text", [
    "ご視聴ありがとうございました", "ご視聴ありがとうございました。ご視聴ありがとうございました。",
    "시청해주셔서 감사합니다.",
    "Продолжение следует...", "Спасибо за просмотр!", "Vielen Dank fürs Zuschauen!", "Merci d'avoir regardé.",
    "¡Gracias por ver el video!", "Obrigado por assistir.", "Grazie per la visione!", "Bedankt voor het kijken.",
    "谢谢观看", "谢谢 观看!", "MUZIEK.", "ПЕЧАЛЬНАЯ МУЗЫКА", "Thanks for watching. Bye.", "Gracias. Gracias.",
])
def test_phantom_lines_of_other_languages_on_near_silence(text: str) -> None:
    assert gate(text, settings=G, **QUIET) == "phantom"


@pytest.mark.parametrize("text", ["ご視聴ありがとうございました", "Продолжение следует.", "Gracias.", "Merci.",
                                  "Vielen Dank fürs Zuschauen!", "Musik."])
def test_phantom_lines_said_at_speech_level_are_kept(text: str) -> None:
    assert gate(text, settings=G, **LOUD) is None


@pytest.mark.parametrize("text", [
    "Les sous-titres sont trop petits.", "Me gustan los subtítulos en español.", "Ich brauche Untertitel.",
    "Gracias por venir, fue un placer.", "字幕太小了。", "Merci beaucoup pour votre aide.",
    "Bonjour. Sous-titres réalisés par la communauté d'Amara.org",  # real speech before a credit: kept whole
    "La música me gusta.", "Спасибо, я понял.",
])
def test_speech_near_the_phantom_lines_is_kept(text: str) -> None:
    assert not is_credit(text, G.phantom_patterns)
    assert gate(text, settings=G, **QUIET) is None
    assert gate(text, settings=G, **LOUD) is None


def test_phantom_patterns_are_checked_at_load(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_settings

    path = tmp_path / "config.yaml"
    path.write_text("asr:\n  gate:\n    phantom_patterns: ['subtitles (by']\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(path, env={})
    assert ei.value.key is not None and ei.value.key.startswith("asr.gate.phantom_patterns"), ei.value
    assert "not a regular expression" in str(ei.value)
    s = GateSettings(phantom_patterns=[r"hello world"], phantom_phrases_by_language={"xx": ["blub"]})
    assert gate("Hello, world!", settings=s, **LOUD) == "phantom"
    assert gate("Blub.", settings=s, **QUIET) == "phantom"
    assert gate("Merci.", settings=s, **QUIET) is None  # the defaults are replaced
