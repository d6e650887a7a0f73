"""The multilingual benchmark's scoring and analysis (scripts/lang_scoring.py, scripts/multilingual_audio.py) on
real clips: what a relay's JSONL records and `language` events are turned into. The relay itself is exercised by
the benchmark run (scripts/bench.py --stream multilingual), not here."""

from __future__ import annotations

import sys
from typing import Any

from conftest import REPO, ml_error, ml_row

sys.path.insert(0, str(REPO / "scripts"))
import multilingual_audio as mla


def test_scoring_is_cer_for_japanese_and_chinese_and_normalised_wer_otherwise() -> None:
    ja = ml_row("multilingual/picovoice-leopard/test_ja.wav")["reference_transcript"]
    # Japanese: spaces and punctuation do not count, one wrong character of the reference's does
    assert ml_error("ja", ja, " ".join(ja) + "。") == 0.0
    assert 0 < ml_error("ja", ja, "x" + ja[1:]) <= 1 / (len(ja) - 2)
    es = ml_row("multilingual/css10/19demarzo_0008.wav")["reference_transcript"]
    words = es.split()
    assert ml_error("es", es, es.upper().replace(",", "").replace(".", "")) == 0.0
    assert abs(ml_error("es", es, " ".join(words[1:])) - 1 / len(words)) < 1e-9
    assert ml_error("de", "", "") == 0.0 and ml_error("de", "", "hallo") == 1.0
    # Devanagari words stay whole (vowel signs are marks): one wrong word of the reference's 10 is 1/10
    hi = ml_row("multilingual/IndicWav2Vec/3029_008.wav")["reference_transcript"]
    assert len(hi.split()) == 10
    assert abs(ml_error("hi", hi, hi.replace("रोटियाँ", "रोटी")) - 1 / 10) < 1e-9


def echo(uid: str, start: float, end: float, emitted: float, text: str, **extra: Any) -> dict[str, Any]:
    return {"event": "echo", "utterance_id": uid, "audio_start_s": start, "audio_end_s": end,
            "emitted_at_s": emitted, "text": text, **extra}


def es_stream() -> mla.MlStream:
    stream = mla.single_streams(["es"], 2.5)[0]
    mla.hard_audio.assemble(stream.pieces)
    for it in stream.speech:
        it.offline_text = it.ref
    return stream


def test_a_single_language_stream_counts_wrong_languages_after_the_lock_event() -> None:
    stream = es_stream()
    a, b, c = stream.speech
    records = [echo("u1", *a.speech_span, a.speech_span[1] + 0.6, a.ref, language="pt"),
               echo("u2", *b.speech_span, b.speech_span[1] + 0.7, b.ref, language="es"),
               echo("u3", *c.speech_span, c.speech_span[1] + 0.8, "las arenas", language="it"),
               echo("u4", 0.2, 1.0, 1.5, "Subtítulos realizados por la comunidad de Amara.org", language="es")]
    lock_t = b.speech_span[1] + 0.65
    events = [{"kind": "language", "t": lock_t, "language": "es", "probability": 0.97, "previous": None,
               "reason": "locked"}]
    r = mla.analyse_ml(stream, records, events)
    assert r.language_source == "record"
    assert [t.outcome.wer for t in r.turns[:2]] == [0.0, 0.0] and r.turns[2].outcome.wer > 0.5
    assert [len(t.wrong) for t in r.turns] == [1, 0, 1]
    assert [u.utterance_id for u in r.wrong_after_lock] == ["u3"]  # u1 (pt) came before the lock
    assert r.lock.source == "event" and abs(r.lock.time_to_lock_s - (lock_t - a.speech_span[0])) < 1e-9
    assert [u.text for u in r.hallucinations] == [records[3]["text"]]
    assert mla.lock_ok(r) is False
    latencies = [t.outcome.latency_s for t in r.turns]
    assert all(lat is not None for lat in latencies)
    assert abs(latencies[0] - (a.speech_span[1] + 0.6 - (a.offset_s + a.true_end_s))) < 1e-9


def test_without_events_the_lock_is_derived_and_late_analyzer_results_fill_in() -> None:
    stream = es_stream()
    a, b, c = stream.speech
    perception = {"language": {"language": "es", "probability": 0.9, "detected": True}}
    records = [echo("u1", *a.speech_span, a.speech_span[1] + 0.6, a.ref, perception={"language": {
                   "language": "it", "probability": 0.6, "detected": True}}),
               echo("u2", *b.speech_span, b.speech_span[1] + 0.7, b.ref, perception={}),  # over the budget
               echo("u3", *c.speech_span, c.speech_span[1] + 0.8, c.ref, perception=perception)]
    late = [{"kind": "perception", "utterance_id": "u2", "late": True, "results": perception}]
    r = mla.analyse_ml(stream, records, late)
    assert r.language_source == "perception" and r.events == []
    assert [u.language for u in r.utterances] == ["it", "es", "es"]
    assert r.lock.source == "derived" and r.lock.language == "es" and r.lock.t == records[1]["emitted_at_s"]
    assert r.wrong_after_lock == [] and mla.lock_ok(r) is True


def test_the_mixed_stream_alternates_languages_and_checks_every_long_turn() -> None:
    stream = mla.mixed_stream(["es", "en"], 2.5)
    mla.hard_audio.assemble(stream.pieces)
    assert [it.category for it in stream.speech] == ["es", "en"] * 3
    records = [echo(f"u{i}", *it.speech_span, it.speech_span[1] + 0.6, it.ref,
                    language=it.category if i != 3 else "es") for i, it in enumerate(stream.speech)]
    r = mla.analyse_ml(stream, records, [])
    n, good, ok = mla.mixed_ok(r)
    assert (n, good, ok) == (6, 5, False)
    assert [t.own_language for t in r.turns] == [True, True, True, False, True, True]
