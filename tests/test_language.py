"""The conversation's language (pipeline/language.py): the lock state machine over sequences of (language,
probability, seconds), the allowed set, the decoder's per-window choice on real detections, the language
reaching events, /status, metrics and the JSONL record of a relay on real speech, and a translation step
declaring what it writes."""

from __future__ import annotations

import asyncio
import json
import threading
import wave
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from asr_fixtures import base_settings, load_clip, shared_base_engine

from pipeline.config import AsrSettings, LanguageDetectSettings, Settings, TransformSettings, load_settings
from pipeline.frames import UtteranceMeta
from pipeline.language import Heard, LanguageChanged, LanguageState, LanguageTracker, restrict
from pipeline.metrics import Metrics
from pipeline.transform import build_chain

DETECT = LanguageDetectSettings()  # the defaults: lock 2.0 s at 0.75; switch 2 x (2.0 s at 0.9)
SR = 16_000
ML = "multilingual/"


def feed(tracker: LanguageTracker, *heard: tuple[str, float, float]) -> list[LanguageChanged | None]:
    return [tracker.observe(Heard(lang, prob, seconds)) for lang, prob, seconds in heard]


# ------------------------------------------------------------------------------ the state machine
def test_a_fixed_language_never_changes() -> None:
    t = LanguageTracker(DETECT, "es")
    assert t.state is LanguageState.FIXED and t.locked and t.language == "es"
    assert feed(t, ("de", 0.99, 9.0), ("de", 0.99, 9.0), ("de", 0.99, 9.0)) == [None, None, None]
    assert t.language == "es"


def test_a_model_that_writes_one_language_fixes_it_from_any_state() -> None:
    for configured, heard in ((None, ()), (None, (("es", 0.99, 5.0),)), ("de", ())):
        t = LanguageTracker(DETECT, configured)
        feed(t, *heard)
        t.fix("en")
        assert (t.state, t.language, t.probability, t.locked) == (LanguageState.FIXED, "en", None, True)
        assert feed(t, ("es", 0.99, 9.0), ("es", 0.99, 9.0), ("es", 0.99, 9.0)) == [None, None, None]
        assert t.language == "en"


def test_locks_on_the_first_confident_speech_and_not_before() -> None:
    t = LanguageTracker(DETECT, None)
    assert t.state is LanguageState.DETECTING and t.language is None and not t.locked
    # unsure (any length), then confident but short: nothing locks; short confident ones add up
    assert feed(t, ("ar", 0.55, 3.1), ("es", 0.62, 6.0), ("es", 0.96, 1.2)) == [None, None, None]
    assert t.language is None
    change = t.observe(Heard("es", 0.91, 1.0))  # 2.2 s of confident Spanish
    assert change == LanguageChanged("es", 0.96, None, "locked")
    assert (t.state, t.language, t.probability) == (LanguageState.LOCKED, "es", 0.96)


def test_one_long_confident_utterance_locks_at_once() -> None:
    t = LanguageTracker(DETECT, None)
    assert t.observe(Heard("ja", 0.999, 5.8)) == LanguageChanged("ja", 0.999, None, "locked")


def test_short_or_disfluent_utterances_in_another_language_never_flip_it() -> None:
    """The issue's failure: a 7-word disfluent English clip detected as Arabic. After the lock, short ones
    and unsure ones are no evidence, however many there are."""
    t = LanguageTracker(DETECT, None)
    t.observe(Heard("en", 0.97, 4.0))
    assert feed(t, *[("ar", 0.6, 2.6)] * 5, *[("es", 0.99, 0.8)] * 5, ("de", 0.89, 9.0)) == [None] * 11
    assert t.language == "en"


def test_one_confident_utterance_is_not_enough_and_a_reply_in_the_language_resets_it() -> None:
    t = LanguageTracker(DETECT, None)
    t.observe(Heard("en", 0.97, 4.0))
    assert feed(t, ("es", 0.98, 3.0), ("en", 0.95, 2.5), ("es", 0.98, 3.0), ("en", 0.9, 1.0),
                ("es", 0.97, 3.0), ("de", 0.99, 4.0)) == [None] * 6
    assert t.language == "en"


def test_a_bilingual_speaker_who_changes_language_is_followed_both_ways() -> None:
    t = LanguageTracker(DETECT, None)
    t.observe(Heard("en", 0.97, 4.0))
    # an unsure or short one between the turns says nothing either way
    assert feed(t, ("de", 0.97, 3.0), ("en", 0.4, 1.0), ("de", 0.93, 5.0)) == [
        None, None, LanguageChanged("de", 0.93, "en", "switched")]
    assert feed(t, ("en", 0.99, 2.5), ("en", 0.98, 3.0)) == [None, LanguageChanged("en", 0.98, "de", "switched")]
    assert t.state is LanguageState.LOCKED


def test_switch_evidence_counts_as_configured() -> None:
    t = LanguageTracker(LanguageDetectSettings(switch_utterances=3, switch_probability=0.8, switch_speech_s=1.0),
                        None)
    t.observe(Heard("fr", 0.9, 3.0))
    assert feed(t, ("it", 0.85, 1.5), ("it", 0.81, 1.2), ("it", 0.99, 1.0)) == [
        None, None, LanguageChanged("it", 0.81, "fr", "switched")]


def test_no_detection_is_no_evidence() -> None:
    t = LanguageTracker(DETECT, None)
    assert t.observe(Heard(None, None, 5.0)) is None and t.observe(Heard("en", None, 5.0)) is None
    assert not t.locked


def test_restrict_renormalises_over_the_allowed_set() -> None:
    dist = {"ur": 0.5, "hi": 0.3, "en": 0.1, "pa": 0.1}
    assert restrict(dist, None) is dist
    assert restrict(dist, ["hi", "en"]) == pytest.approx({"hi": 0.75, "en": 0.25})
    assert restrict(dist, ["de", "fr"]) == {"de": 0.5, "fr": 0.5}  # nothing of the set heard: no preference


# ------------------------------------------------------------------- the decoder's choice, real audio
def _distribution(pcm: np.ndarray) -> dict[str, float]:
    from pipeline.asr.whisper.window import pad_features, to_float, window_s

    dec = shared_base_engine().decoder
    encoded = dec._encode(pad_features([dec.features(to_float(pcm))], window_s(len(pcm) / SR)))
    return {str(t)[2:-2]: float(p) for t, p in dec.model.model.detect_language(encoded)[0]}


def _decoder(**settings: Any) -> Any:
    from pipeline.asr.whisper.decoder import WindowDecoder

    engine = shared_base_engine()
    return WindowDecoder(engine.decoder.model, engine.decoder.prompts, base_settings(**settings), None)


def test_the_allowed_set_chooses_among_its_languages_only() -> None:
    """A Hindi sentence (IndicWav2Vec 3029_008, 3.8 s): Whisper base is unsure of Hindi on the whole of it (too
    unsure to lock) and puts Bengali first on its first 3.5 s; within asr.languages [hi, en] it is Hindi both
    times, sure enough to lock."""
    whole = _distribution(load_clip(ML + "IndicWav2Vec/3029_008.wav"))
    start = _distribution(load_clip(ML + "IndicWav2Vec/3029_008.wav", 0.0, 3.5))
    anywhere, within = _decoder(), _decoder(languages=["hi", "en"])
    assert anywhere.choose(whole, None, 3.8).probability < DETECT.lock_probability
    assert anywhere.choose(start, None, 3.5).language != "hi"
    for dist, seconds in ((whole, 3.8), (start, 3.5)):
        choice = within.choose(dist, None, seconds)
        assert choice.language == "hi" and choice.detected == ("hi", choice.probability)
        assert choice.probability > DETECT.switch_probability


def test_a_locked_language_is_kept_unless_the_detector_is_sure_of_another_on_enough_speech() -> None:
    german = _distribution(load_clip(ML + "picovoice-leopard/test_de.wav"))  # 5.3 s, de ~1.0
    dec = _decoder()
    assert dec.choose(german, "es", 5.3).language == "de"  # a whole German turn is decoded in German ...
    kept = dec.choose(german, "es", 1.5)  # ... a short utterance stays in the conversation's language
    assert kept.language == "es" and kept.detected is not None and kept.detected[0] == "de"
    ask_not = _distribution(load_clip("whisper.cpp/jfk.wav", 3.2, 4.4))  # "Ask not!": English, unsure
    assert dec.choose(ask_not, "es", 1.2).language == "es"


# ------------------------------------------------------------------------------------ config
def test_language_settings_are_checked_with_the_key_named() -> None:
    assert AsrSettings(language="auto").language is None and AsrSettings(language="Spanish").language == "es"
    assert AsrSettings(language=None, languages=["HI", "en", "hi"]).languages == ["hi", "en"]
    bad = [({"language": "xx"}, "not a Whisper language code"),
           ({"language": None, "languages": ["en", "klingon"]}, "not a Whisper language code"),
           ({"language": "de", "languages": ["en", "es"]}, "is not in asr.languages"),
           ({"task": "translate"}, "needs a multilingual model"),
           ({"engine": "openai-http", "language": None, "languages": ["en", "es"]}, "needs asr.engine faster-whisper"),
           ({"engine": "openai-http", "model": "base", "task": "translate", "openai_http": {"url": "http://h/v1/x"}},
            "/audio/transcriptions")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            AsrSettings.model_validate(fields)


# ------------------------------------------------------------------- a relay on real speech (in-process)
def write_stream(path: Path, parts: list[tuple[str, float, float | None]], gap_s: float = 2.0) -> None:
    gap = np.zeros(int(gap_s * SR), np.int16)
    audio = [gap]
    for name, start, end in parts:
        audio += [load_clip(name, start, end), gap]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(np.concatenate(audio).tobytes())


# Spanish x3 with a one-word English "Ask not!" among them, then a German speaker for three turns.
LOCK_STREAM = [(ML + "picovoice-leopard/test_es.wav", 0.0, None), (ML + "cuttledoc/fleurs-es-002.ogg", 0.0, None),
               ("whisper.cpp/jfk.wav", 3.2, 4.4), (ML + "css10/19demarzo_0008.wav", 0.0, None),
               (ML + "cuttledoc/fleurs-de-001.ogg", 0.0, None), (ML + "cuttledoc/fleurs-de-004.ogg", 0.0, None),
               (ML + "picovoice-leopard/test_de.wav", 0.0, None)]
LOCK_LANGUAGES = ["es", "es", "es", "es", "de", "de", "de"]


def relay_settings(tmp_path: Path, wav: Path, **overrides: Any) -> Settings:
    base = {"source.spec": f"file:{wav}", "source.file.speed": 4.0, "control.enabled": False,
            "sink.spec": f"jsonl:{tmp_path / 'out.jsonl'}", "asr.model": "base", "asr.download": False,
            "asr.models_dir": "/nonexistent", "asr.language": "auto"}
    return load_settings(None, {**base, **overrides}, env={})


async def _run_relay(settings: Settings) -> tuple[Any, list[dict[str, Any]]]:
    """A relay over the shared base engine (its own scheduler client, which does not close the engine);
    paced at 4x so each transcript is in before the next utterance is decoded, as with a live speaker.
    Returns the relay and its `language` events."""
    from pipeline.app import build_relay
    from pipeline.asr.scheduler import AsrScheduler

    metrics = Metrics()
    asr = AsrScheduler(shared_base_engine(), settings.asr.batch, metrics.asr).client("test")
    relay = build_relay(settings, metrics=metrics, asr=asr)
    events = relay.events.subscribe(maxlen=100_000)  # the whole run (levels come 10 a second)
    await relay.start()
    await asyncio.wait_for(relay.run(), 120)
    return relay, [e.as_dict() for e in events.pending() if e.kind == "language"]


def test_the_lock_holds_on_a_one_word_utterance_and_follows_a_speaker_who_changes_language(tmp_path: Path) -> None:
    wav = tmp_path / "es_de.wav"
    write_stream(wav, LOCK_STREAM)
    relay, events = asyncio.run(_run_relay(relay_settings(tmp_path, wav)))
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["language"] for r in records] == LOCK_LANGUAGES, [(r["language"], r["text"]) for r in records]
    assert "ask not" not in records[2]["text"].lower()  # decoded in the conversation's Spanish, not English
    assert all(r["language_probability"] is not None for r in records)
    assert "Dinosaurier" in records[4]["text"] and "Höhle" in records[5]["text"]  # the turns in German
    assert [(e["language"], e["previous"], e["reason"]) for e in events] == [
        ("es", None, "locked"), ("de", "es", "switched")]
    assert all(e["probability"] > 0.9 and e["text_language"] == e["language"] for e in events)
    assert events[1]["utterance_id"] == records[5]["utterance_id"]  # the second German turn switched it
    status = relay.status()["language"]
    assert status == {"code": "de", "spoken": "de", "probability": events[1]["probability"], "locked": True,
                      "state": "locked", "task": "transcribe"}
    m = relay.metrics
    assert m.value("echo_relay_language_changes_total", {"reason": "locked"}) == 1
    assert m.value("echo_relay_language_changes_total", {"reason": "switched"}) == 1
    assert m.value("echo_relay_utterances_by_language_total", {"language": "es"}) == 4
    assert m.value("echo_relay_utterances_by_language_total", {"language": "de"}) == 3


# ------------------------------------------------------------------------- a step declaring its language
class _Servers:
    """The example adaptor (examples/transforms/translate_hook.py) in front of a LibreTranslate-shaped server
    on 127.0.0.1 that answers from a fixed table (no translation model offline) and records the requests."""

    TABLE: ClassVar[dict[tuple[str, str, str], str]] = {("es", "de", "las arenas son blancas"): "der Sand ist weiß"}

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []
        servers = self

        class Translator(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                q = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                servers.asked.append(q)
                found = servers.TABLE.get((q["source"], q["target"], q["q"]))
                body = json.dumps({"translatedText": found} if found else {"error": "unknown"}).encode()
                self.send_response(200 if found else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "transforms"))
        import translate_hook

        self.translator = ThreadingHTTPServer(("127.0.0.1", 0), Translator)
        self.hook = translate_hook.make_server("127.0.0.1", 0, f"http://127.0.0.1:{self.translator.server_port}",
                                               "de")
        for server in (self.translator, self.hook):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in (self.hook, self.translator):
            server.shutdown()
            server.server_close()


@pytest.fixture
def translation() -> Iterator[_Servers]:
    servers = _Servers()
    yield servers
    servers.close()


def test_a_translation_step_declares_the_language_it_writes(translation: _Servers) -> None:
    seen: list[str | None] = []

    def after(text: str, meta: UtteranceMeta) -> str:
        seen.append(meta.language)
        return text

    import pipeline.transform.builtins as builtins_module

    url = f"http://127.0.0.1:{translation.hook.server_port}/"
    settings = TransformSettings.model_validate({"steps": [
        {"step": "webhook", "url": url, "output_language": "German"}, {"step": "after"}]})
    assert settings.output_language == "de"
    chain = build_chain(settings, Metrics(), builtins={**builtins_module.BUILTINS, "after": lambda: after})
    meta = UtteranceMeta("u1", 0.0, 2.0, asr_text="las arenas son blancas", language="es",
                         language_probability=0.99)
    outcome = asyncio.run(chain.run("las arenas son blancas", meta))
    assert outcome.text == "der Sand ist weiß"
    assert translation.asked == [{"q": "las arenas son blancas", "source": "es", "target": "de", "format": "text"}]
    assert seen == ["de"] and (meta.language, meta.language_probability) == ("de", None)
    # The translator refuses: the step fails, its on_error (pass) echoes the text untranslated, in its language.
    meta = UtteranceMeta("u2", 0.0, 2.0, language="es", language_probability=0.99)
    outcome = asyncio.run(chain.run("otra frase", meta))
    assert outcome.text == "otra frase" and meta.language == "es" and seen[-1] == "es"
