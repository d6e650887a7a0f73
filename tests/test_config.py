"""Configuration: defaults, env filling, unknown keys, error messages, CLI overrides, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Settings, load_settings, redacted_dump
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_config_equals_documented_defaults() -> None:
    """config.yaml documents the defaults: loading it must give exactly Settings()'s values."""
    loaded = load_settings(REPO / "config.yaml", env={}).model_dump()
    defaults = Settings().model_dump()
    # Paths in the file are resolved relative to it; everything else must match exactly.
    assert loaded["source"].pop("spec") == defaults["source"].pop("spec")
    assert Path(loaded["asr"].pop("models_dir")) == REPO / defaults["asr"].pop("models_dir")
    assert loaded == defaults


def test_env_references_are_filled(tmp_path: Path) -> None:
    p = write(tmp_path, "asr:\n  model: ${MODEL}\n  beam_size: ${BEAM:-3}\ntavus:\n  api_key: ${KEY:-}\n")
    s = load_settings(p, env={"MODEL": "base.en"})
    assert s.asr.model == "base.en" and s.asr.beam_size == 3 and s.tavus.api_key is None


def test_missing_env_without_default_names_key(tmp_path: Path) -> None:
    p = write(tmp_path, "asr:\n  model: ${NOPE}\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p, env={})
    assert e.value.key == "asr.model" and "NOPE" in str(e.value)


@pytest.mark.parametrize(("text", "key", "words"), [
    ("vad:\n  hangover: 3\n", "vad.hangover", "unknown key"),
    ("vad:\n  hangover_ms: soon\n", "vad.hangover_ms", "integer"),
    ("vad:\n  aggressiveness: 7\n", "vad.aggressiveness", "less than or equal to 3"),
    ("vad:\n  frame_ms: 25\n", "vad.frame_ms", "10, 20 or 30"),
    ("bogus: {}\n", "bogus", "unknown key"),
    ("transform:\n  steps:\n    - timeout_s: 1\n", "transform.steps[0].step", "required"),
    ("transform:\n  steps:\n    - step: x\n      on_error: explode\n", "transform.steps[0].on_error", "pass"),
])
def test_mistakes_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text), env={})
    assert e.value.key == key
    assert words in str(e.value)


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_settings(write(tmp_path, "a: 1\n b: [\n"), env={})
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(write(tmp_path, "- 1\n- 2\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_overrides_beat_file_and_are_validated(tmp_path: Path) -> None:
    p = write(tmp_path, "sink:\n  spec: console\n")
    assert load_settings(p, {"sink.spec": "jsonl:x.jsonl"}, env={}).sink.spec == "jsonl:x.jsonl"
    with pytest.raises(ConfigError) as e:
        load_settings(p, {"source.file.speed": -1}, env={})
    assert e.value.key == "source.file.speed"


def test_cross_field_rule() -> None:
    with pytest.raises(ConfigError, match="speculative_ms must be shorter"):
        load_settings(None, {"vad.hangover_ms": 100, "endpoint.speculative_ms": 150}, env={})


def test_relative_file_source_is_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("source:\n  spec: file:talk.wav\n")
    assert load_settings(p, env={}).source.spec == f"file:{tmp_path / 'sub' / 'talk.wav'}"


def test_secrets_are_redacted_and_env_key_used(tmp_path: Path) -> None:
    p = write(tmp_path, "control:\n  token: ${TOK}\n")
    s = load_settings(p, env={"TOK": "tok-123456", "TAVUS_API_KEY": "sk-secret-abc"})
    assert s.tavus.api_key is not None and s.tavus.api_key.get_secret_value() == "sk-secret-abc"
    dump = redacted_dump(s)
    assert dump["tavus"]["api_key"] == "***" and dump["control"]["token"] == "***"
    assert "sk-secret-abc" not in repr(s) and "sk-secret-abc" not in str(dump)
