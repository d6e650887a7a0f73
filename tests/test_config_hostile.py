"""Hostile and unlucky configuration (issue 11, "Configuration" and "Secrets").

Every configuration mistake is exit status 2 with one `echo-relay: configuration error: KEY: ...` line
per problem, and fails fast; no secret is ever printed. The many generated cases load in-process
with `load_settings` (a real file each time); representative ones run `python -m pipeline config
check` (or `run`) as subprocesses. Classes: hostile YAML (alias bombs, deep nesting, self-references,
duplicate keys, bytes that are not UTF-8, huge files, junk), numbers out of range / not finite /
given as booleans, `config check` agreeing with `run`, relative paths, and secrets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline import config as cfg
from pipeline.config import (
    MAX_CONFIG_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    ConfigError,
    PerceptionAnalyzer,
    Settings,
    TransformStep,
    load_settings,
    redacted_dump,
    secret_values,
)
from pipeline.wiring import check_stages
from tests.conftest import REPO

HANG_GUARD_S = 120  # a subprocess that has not finished by then hangs: a generous guard, not a timing claim
GEN = hsettings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JFK = REPO / "pipeline" / "assets" / "jfk.wav"


# ------------------------------------------------------------------------------------------ helpers
def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHO_RELAY_", "TAVUS_"))}
    full_env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def config_errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The `echo-relay: configuration error:` lines, after checking exit 2 and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("echo-relay:")]
    assert lines and all(ln.startswith("echo-relay: configuration error: ") for ln in lines), proc.stderr
    return [ln.removeprefix("echo-relay: configuration error: ") for ln in lines]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A directory for the files the generated cases write (module scope: hypothesis reuses it)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def load_text(scratch: Path, text: str | bytes, env: dict[str, str] | None = None) -> Settings:
    path = scratch / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return load_settings(path, env=env or {})


def problem_keys(exc: ConfigError) -> list[str | None]:
    return [p.key for p in exc.problems]


# ------------------------------------------------------------------------- every numeric setting
@dataclass(frozen=True)
class Num:
    key: str  # dotted, e.g. "transform.steps[0].timeout_s"
    model: type[BaseModel]
    is_int: bool
    low: float | None
    low_inclusive: bool
    high: float | None
    high_inclusive: bool
    or_name: bool = False  # str | int: a name or an index (source.mic.device)


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def _number_type(annotation: Any) -> type | None:
    if annotation in (int, float):
        return annotation  # type: ignore[no-any-return]
    if get_origin(annotation) in (Union, UnionType):
        for arg in get_args(annotation):
            if arg in (int, float):
                return arg  # type: ignore[no-any-return]
    return None


def numeric_settings() -> list[Num]:
    """Every int/float setting of every section (Literal choices such as vad.frame_ms excluded)."""
    found: list[Num] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            sub = _sub_model(info.annotation)
            if sub is not None:
                walk(sub, f"{key}[0]" if sub in (TransformStep, PerceptionAnalyzer) else key)
                continue
            kind = _number_type(info.annotation)
            if kind is None or get_origin(info.annotation) is Literal:
                continue
            low = high = None
            low_inclusive = high_inclusive = True
            for m in info.metadata:
                if isinstance(m, Ge):
                    low = m.ge
                elif isinstance(m, Gt):
                    low, low_inclusive = m.gt, False
                elif isinstance(m, Le):
                    high = m.le
                elif isinstance(m, Lt):
                    high, high_inclusive = m.lt, False
            found.append(Num(key, model, kind is int, low, low_inclusive, high, high_inclusive,
                             or_name=str in get_args(info.annotation)))

    walk(Settings, "")
    return found


NUMBERS = numeric_settings()
# source.mic.device (a name or an index >= 0) has no range: tested among the reported examples.
OWN_NUMBERS = [n for n in NUMBERS if not n.or_name]
# Settings with a rule across keys (endpoint.speculative_ms < vad.hangover_ms, likely_prob <=
# confident_prob, reopen_backoff_min_s <= reopen_backoff_max_s): tested on their own below.
CROSS_FIELD = {"vad.hangover_ms", "endpoint.speculative_ms", "endpoint.likely_prob", "endpoint.confident_prob",
               "source.mic.reopen_backoff_min_s", "source.mic.reopen_backoff_max_s"}


def tree_for(key: str, value: Any) -> dict[str, Any]:
    """The nested config tree that sets one dotted key (a transform step gets `step: whitespace`, an analyzer
    `analyzer: loudness`)."""
    parts = key.replace("[0]", ".[0]").split(".")
    tree: dict[str, Any] = {}
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "[0]":
            continue
        if i + 1 < len(parts) and parts[i + 1] == "[0]":
            item: dict[str, Any] = {"step": "whitespace"} if part == "steps" else {"analyzer": "loudness"}
            node[part] = [item]
            node = item
        elif last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
    return tree


def yaml_for(key: str, raw_scalar: str) -> str:
    """YAML text setting `key` to `raw_scalar` exactly as written (e.g. `yes`, `.inf`)."""
    return yaml.safe_dump(tree_for(key, "RAW_SCALAR"), sort_keys=False).replace("RAW_SCALAR", raw_scalar)


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[Num, float]:
    num = draw(st.sampled_from([n for n in NUMBERS if n.low is not None or n.high is not None]))
    sides = [s for s, b in (("low", num.low), ("high", num.high)) if b is not None]
    side = draw(st.sampled_from(sides))
    if num.is_int:
        if side == "low":
            assert num.low is not None
            top = int(num.low) - (1 if num.low_inclusive else 0)
            return num, draw(st.integers(max_value=top, min_value=top - 10**12))
        assert num.high is not None
        bottom = int(num.high) + (1 if num.high_inclusive else 0)
        return num, draw(st.integers(min_value=bottom, max_value=bottom + 10**12))
    if side == "low":
        return num, draw(st.floats(max_value=num.low, exclude_max=num.low_inclusive, allow_nan=False,
                                   allow_infinity=False))
    return num, draw(st.floats(min_value=num.high, exclude_min=num.high_inclusive, allow_nan=False,
                               allow_infinity=False))


def test_every_numeric_setting_has_a_documented_range() -> None:
    assert len(OWN_NUMBERS) > 50  # all sections were walked, transform steps included
    for num in OWN_NUMBERS:
        assert num.low is not None and num.high is not None, f"{num.key} has no lower/upper bound"
    # ControlSettings and TransformSettings state their ranges in their own words (docs/control-api.md).
    described = [n for n in OWN_NUMBERS if n.model.__name__ not in ("TransformSettings", "ControlSettings")]
    for num in described:
        field = num.model.model_fields[num.key.rsplit(".", 1)[-1]]
        assert "range" in (field.description or ""), f"{num.key}: the description states no range"


@GEN
@given(case=out_of_range())
def test_numbers_out_of_range_are_refused_naming_the_key(scratch: Path, case: tuple[Num, float]) -> None:
    num, value = case
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, yaml.safe_dump(tree_for(num.key, value)))
    assert num.key in problem_keys(ei.value), str(ei.value)
    assert "Input should be" in str(ei.value)


@GEN
@given(num=st.sampled_from(NUMBERS), spelling=st.sampled_from(["true", "false", "yes", "no", "on", "off", "True",
                                                               "FALSE", "Yes", "ON"]))
def test_a_boolean_is_never_taken_for_a_number(scratch: Path, num: Num, spelling: str) -> None:
    """`control.port: true` was port 1: in every section (the control API's too), for every number."""
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, yaml_for(num.key, spelling))
    assert num.key in problem_keys(ei.value)
    assert "boolean" in str(ei.value)


@GEN
@given(num=st.sampled_from([n for n in NUMBERS if not n.is_int]),
       raw=st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "+.Inf", "'inf'", "'nan'", "'-Infinity'"]))
def test_floats_must_be_finite(scratch: Path, num: Num, raw: str) -> None:
    """`source.file.speed: .inf` wrote Infinity into the JSONL."""
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, yaml_for(num.key, raw))
    assert num.key in problem_keys(ei.value)


@GEN
@given(data=st.data())
def test_numbers_within_their_range_are_accepted(scratch: Path, data: st.DataObject) -> None:
    num = data.draw(st.sampled_from([n for n in OWN_NUMBERS if n.key not in CROSS_FIELD]))
    assert num.low is not None and num.high is not None
    if num.is_int:
        value: float = data.draw(st.integers(int(num.low) + (0 if num.low_inclusive else 1),
                                             int(num.high) - (0 if num.high_inclusive else 1)))
    else:
        value = data.draw(st.floats(num.low, num.high, exclude_min=not num.low_inclusive,
                                    exclude_max=not num.high_inclusive))
    settings = load_text(scratch, yaml.safe_dump(tree_for(num.key, value)))
    section: Any = settings
    for part in num.key.replace("[0]", ".0").split("."):
        section = section[int(part)] if part.isdigit() else getattr(section, part)
    assert section == value


@pytest.mark.parametrize(("text", "key", "words"), [
    ("asr:\n  cpu_threads: 1000000\n", "asr.cpu_threads", "less than or equal to 128"),
    ("sink:\n  audio_sample_rate: 0\n", "sink.audio_sample_rate", "greater than or equal to 8000"),
    ("sink:\n  audio_sample_rate: -24000\n", "sink.audio_sample_rate", "greater than or equal to 8000"),
    ("source:\n  file:\n    speed: .inf\n", "source.file.speed", "finite"),
    ("control:\n  port: true\n", "control.port", "boolean"),
    ("source:\n  mic:\n    device: -1\n", "source.mic.device", "0 or more"),
    ("source:\n  mic:\n    reopen_backoff_min_s: 5\n    reopen_backoff_max_s: 1\n", "source.mic",
     "must not exceed"),
    ("endpoint:\n  likely_prob: 0.99\n", "endpoint", "must not exceed"),
])
def test_the_reported_examples(scratch: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, text)
    assert key in problem_keys(ei.value) and words in str(ei.value), str(ei.value)


# --------------------------------------------------------------------------------- hostile YAML
def billion_laughs(levels: int = 9, fan: int = 9) -> str:
    lines = ['lol0: &lol0 "lol"']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("name", "text", "words"), [
    ("billion laughs", billion_laughs(), f"more than {MAX_YAML_ALIASES} aliases"),
    # Under the alias count, still 10**6 values once expanded.
    ("few aliases, huge expansion", billion_laughs(levels=6, fan=10), "more than 10000 values"),
    ("wide alias", "a: &a [" + ", ".join(["x"] * 200) + "]\nb: [" + ", ".join(["*a"] * 60) + "]\n",
     "more than 10000 values"),
    ("deep flow nesting", "vad: " + "[" * 100_000 + "]" * 100_000 + "\n", "nest"),
    ("deep block nesting", "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "x: 1\n", "nested"),
    ("deep via aliases", "a: &a " + "[" * 20 + "1" + "]" * 20 + "\nb: &b " + "[" * 20 + "*a" + "]" * 20 + "\n",
     "nested more than"),
    ("self-referencing list", "a: &a [1, *a]\n", "alias *a is inside the value &a"),
    ("self-referencing mapping", "vad: &v {engine: *v}\n", "alias *v is inside the value &v"),
    ("self-referencing merge", "a: &a\n  b: 1\n  <<: *a\n", "alias *a is inside the value &a"),
    ("mutual reference", "a: &a [&b [*a]]\n", "alias *a is inside"),
    ("control character", "vad:\n  engine: sil\x01ero\n", "not valid YAML at line 2"),
    ("empty tagged int", "vad:\n  hangover_ms: !!int\n", "cannot convert"),
    ("tagged junk", "vad:\n  hangover_ms: !!timestamp 2024-13-45\n", "cannot convert"),
    ("huge integer", "vad:\n  hangover_ms: " + "9" * 5000 + "\n", "cannot convert"),
    ("python tag", "vad: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ("too many values", "asr:\n  gate:\n    phantom_phrases: [" + ", ".join(["x"] * 20_000) + "]\n",
     "more than 10000 values"),
])
def test_hostile_yaml_fails_fast_with_a_config_error(scratch: Path, name: str, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, text)
    assert words in str(ei.value), (name, str(ei.value))
    assert "config.yaml" in str(ei.value)  # names the file


def test_nesting_at_the_limit_is_fine_and_one_more_is_not(scratch: Path) -> None:
    # A nested value under an unknown key: the loader accepts MAX_YAML_DEPTH levels, validation then
    # rejects the key; one more level is refused by the loader.
    def nested(levels: int) -> str:  # the mapping, its [ ... ] levels, the innermost 1
        return "x: " + "[" * (levels - 2) + "1" + "]" * (levels - 2) + "\n"

    with pytest.raises(ConfigError) as ok:
        load_text(scratch, nested(MAX_YAML_DEPTH))
    assert problem_keys(ok.value) == ["x"]
    with pytest.raises(ConfigError, match=f"nested more than {MAX_YAML_DEPTH} levels"):
        load_text(scratch, nested(MAX_YAML_DEPTH + 1))


@pytest.mark.parametrize(("text", "keys"), [
    ("control:\n  port: 8001\n  port: 8002\n", ["control.port"]),
    ("vad:\n  threshold: 0.5\nvad:\n  threshold: 0.6\n", ["vad"]),
    ("transform:\n  steps:\n    - step: whitespace\n      step: casing\n", ["transform.steps[0].step"]),
    ("asr:\n  gate:\n    no_speech_prob: 0.5\n    no_speech_prob: 0.5\n  beam_size: 1\n  beam_size: 2\n",
     ["asr.gate.no_speech_prob", "asr.beam_size"]),
    ("sink: {spec: console, 'spec': console}\n", ["sink.spec"]),
    ("tavus:\n  max_call_duration: 300\n  max_call_duration: 0x12C\n", ["tavus.max_call_duration"]),
])
def test_duplicate_keys_are_refused_naming_each_key_and_line(scratch: Path, text: str, keys: list[str]) -> None:
    """They were silently merged (the last one won)."""
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, text)
    assert problem_keys(ei.value) == keys
    for problem in ei.value.problems:
        assert "duplicate key at line" in problem.message and "first at line" in problem.message


def test_a_merge_key_may_be_overridden(scratch: Path) -> None:
    """`<<: *base` then an explicit key is YAML's documented override, not a duplicate."""
    s = load_text(scratch, "transform:\n  steps:\n    - &w {step: whitespace, timeout_s: 1}\n"
                           "    - <<: *w\n      timeout_s: 3\n")
    assert [st.timeout_s for st in s.transform.steps] == [1, 3]


@pytest.mark.parametrize("data", [
    "vad:\n  engine: café\n".encode("latin-1"),
    "vad:\n  engine: silero\n".encode("utf-16"),
    b"vad:\n  engine: \xff\xfe\xfd\n",
    b"\x80" + b"a" * 100,
    b"asr:\n  language: en\n\xc3",  # a cut multi-byte character at the end
])
def test_bytes_that_are_not_utf8_name_the_file(scratch: Path, data: bytes) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml is not UTF-8 text \(byte 0x[0-9a-f]{2} at line \d+"):
        load_text(scratch, data)


def test_a_utf8_bom_is_fine(scratch: Path) -> None:
    assert load_text(scratch, "\ufeffvad:\n  engine: webrtc\n").vad.engine == "webrtc"


def test_huge_and_endless_files_are_refused_unread(scratch: Path) -> None:
    big = scratch / "big.yaml"
    line = b"# " + b"x" * 97 + b"\n"
    big.write_bytes(b"vad:\n  engine: silero\n" + line * 500_000)  # 50 MB of valid YAML
    with pytest.raises(ConfigError, match=f"big.yaml is larger than {MAX_CONFIG_BYTES} bytes"):
        load_settings(big, env={})
    if Path("/dev/zero").exists():
        with pytest.raises(ConfigError, match="/dev/zero is larger than"):
            load_settings("/dev/zero", env={})


def test_unreadable_paths_name_the_file(scratch: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(scratch, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(scratch / "nope.yaml", env={})
    locked = scratch / "locked.yaml"
    locked.write_text("vad: {}\n")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ConfigError, match=f"cannot read config file {locked}"):
            load_settings(locked, env={})
    finally:
        locked.chmod(0o600)


# Random junk: text made of YAML's own punctuation, anchors, tags and real key names.
_PIECES = st.sampled_from([
    *"{}[]:,-?&*!|>'\"#%@` \n\t.0123456789", "&a ", "*a", "<<: ", "!!binary ", "!!int ", "!!float ",
    "!!timestamp ", "!!set ", "!!python/object:os.system ",
    "---\n", "...\n", "vad:", "  hangover_ms: ", "control:\n  port: ", "asr:\n  engine: ", "${X}", "${Y:-1}",
    "\ufeff", "\x85", "\u2028", "yes", "~", ".inf", "1e999", "9" * 5000, "\\0", "0x", "0o7", "2024-13-45",
])
_JUNK_TEXT = st.lists(_PIECES | st.text(max_size=6), max_size=80).map("".join)
_KEYS = st.sampled_from(["source", "vad", "asr", "sink", "tavus", "control", "transform", "endpoint", "logging",
                         "spec", "engine", "port", "hangover_ms", "steps", "step", "speed", "file", "mic",
                         "cpu_threads", "api_key", "words_file", "<<"]) | st.text(max_size=6) | st.integers()
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_TREES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
                      max_leaves=40)


def _loads_or_config_error(scratch: Path, data: str | bytes) -> None:
    try:
        settings = load_text(scratch, data)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert "\n" not in problem.line, problem.line  # one line each
    else:
        assert isinstance(settings, Settings)


@GEN
@given(text=_JUNK_TEXT)
def test_junk_text_is_settings_or_a_config_error(scratch: Path, text: str) -> None:
    _loads_or_config_error(scratch, text)


@GEN
@given(data=st.binary(max_size=400))
def test_junk_bytes_are_settings_or_a_config_error(scratch: Path, data: bytes) -> None:
    _loads_or_config_error(scratch, data)


@GEN
@given(tree=st.dictionaries(_KEYS, _TREES, max_size=6))
def test_junk_structures_are_settings_or_a_config_error(scratch: Path, tree: dict[Any, Any]) -> None:
    _loads_or_config_error(scratch, yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))


# ------------------------------------------------------------------------- subprocess: exit 2
@pytest.mark.parametrize(("name", "text", "words"), [
    ("alias bomb", billion_laughs(), "aliases"),
    ("deep nesting", "vad: " + "[" * 50_000 + "]" * 50_000 + "\n", "nest"),
    ("self reference", "a: &a [*a]\n", "alias *a"),
    ("duplicate key", "control:\n  port: 1\n  port: 2\n", "control.port: duplicate key at line 3"),
    ("not UTF-8", "vad:\n  engine: café\n".encode("latin-1"), "is not UTF-8 text"),
    ("boolean port", "control:\n  port: true\n", "control.port"),
])
def test_config_check_exits_2_naming_the_problem(tmp_path: Path, name: str, text: str | bytes,
                                                  words: str) -> None:
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    errors = config_errors(cli("config", "check", "--config", str(path)))
    assert len(errors) == 1 and words in errors[0], (name, errors)


def test_a_50_mb_config_is_refused_by_check_and_run(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as fh:
        fh.write(b"vad:\n  engine: silero\n")
        fh.truncate(50_000_000)
    for args in (("config", "check"), ("run", "--no-control")):
        errors = config_errors(cli(*args, "--config", str(big)))
        assert errors == [f"config file {big} is larger than {MAX_CONFIG_BYTES} bytes (configurations are a few KB); "
                          "is it the right file?"]


# ----------------------------------------------------- config check runs what run runs, all at once
BROKEN = """\
asr:
  engine: no_such_engine
vad:
  engine: nope.nope:Nope
  hangover_ms: soon
source:
  spec: "file:"
sink:
  spec: jsonl:{out_dir}
transform:
  steps:
    - step: filler_wordz
    - step: regex_replace
      pattern: "([a-z"
    - step: blocklist
      words_file: missing-words.txt
    - step: whitespace
      bogus_option: 1
    - step: webhook
      url: ftp://not-http
"""


def test_config_check_reports_every_problem_at_once(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(BROKEN.format(out_dir="out"), encoding="utf-8")
    errors = config_errors(cli("config", "check", "--config", str(path)))
    keys = [e.split(": ", 1)[0] for e in errors]
    assert sorted(keys) == sorted([
        "source.spec", "vad.hangover_ms", "transform.steps[0].step", "transform.steps[1].pattern",
        "transform.steps[2].words_file", "transform.steps[3].bogus_option", "transform.steps[4].url",
        "asr.engine", "vad.engine", "sink.spec"]), errors
    by_key = dict(e.split(": ", 1) for e in errors)
    assert "give a path after 'file:'" in by_key["source.spec"]
    assert "not a valid regular expression" in by_key["transform.steps[1].pattern"]
    assert f"{tmp_path / 'missing-words.txt'}" in by_key["transform.steps[2].words_file"]
    assert "unknown name 'no_such_engine'" in by_key["asr.engine"]
    assert "is a directory" in by_key["sink.spec"]
    assert "configuration OK" not in errors


@pytest.mark.parametrize(("text", "key", "words"), [
    ("asr:\n  engine: no_such_engine\n", "asr.engine", "unknown name 'no_such_engine'"),
    ("asr:\n  engine: os:getcwd\n", "asr.engine", "could not be created"),
    ("asr:\n  engine: .relative:Engine\n", "asr.engine", "is not a dotted path"),
    ("vad:\n  engine: no_such.module:Vad\n", "vad.engine", "cannot import module"),
    ("transform:\n  steps:\n    - step: no_such_step\n", "transform.steps[0].step", "unknown name"),
    ("transform:\n  steps:\n    - step: blocklist\n      words_file: nope.txt\n", "transform.steps[0].words_file",
     "cannot read"),
])
def test_run_maps_stage_building_mistakes_to_exit_2(tmp_path: Path, text: str, key: str, words: str) -> None:
    """A wrong asr.engine was `unexpected error: PluginError`, exit 1. Nothing is loaded before."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    errors = config_errors(cli("run", "--no-control", "--config", str(path), "--sink", "console"))
    assert len(errors) == 1 and errors[0].startswith(f"{key}: ") and words in errors[0], errors
    if key == "asr.engine" and "could not" not in words:
        errors = config_errors(cli("transcribe", "--config", str(path), str(JFK)))
        assert errors[0].startswith(f"{key}: "), errors


@GEN
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.:-0123456789", min_size=1, max_size=20))
def test_any_unknown_engine_name_is_a_config_error(name: str) -> None:
    import importlib.util

    top = name.replace(":", ".").split(".")[0]
    try:
        importable = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        importable = False
    if importable or name in ("faster-whisper", "openai-http", "silero", "webrtc"):
        return  # an existing module may hold a real callable: not an unknown name
    s = Settings().model_copy(update={"asr": Settings().asr.model_copy(update={"engine": name}),
                                      "vad": Settings().vad.model_copy(update={"engine": name})})
    problems = check_stages(s, checks=("asr", "vad"))
    assert [p.key for p in problems] == ["asr.engine", "vad.engine"]


def test_a_missing_source_file_is_reported_by_check(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("source:\n  spec: file:talk.wav\n", encoding="utf-8")
    errors = config_errors(cli("config", "check", "--config", str(path)))
    assert errors == [f"source.spec: audio file {tmp_path / 'talk.wav'} does not exist"]


# ----------------------------------------------------------------------------- relative paths
def test_relative_paths_in_the_file_resolve_against_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "model-dir").mkdir(parents=True)
    (conf / "words.txt").write_text("falcon\n", encoding="utf-8")
    (conf / "talk.wav").write_bytes(JFK.read_bytes())
    path = conf / "c.yaml"
    path.write_text("source:\n  spec: FILE:talk.wav\nsink:\n  spec: jsonl:out/echo.jsonl\n  also: [jsonl:copy.jsonl]\n"
                    "asr:\n  models_dir: store\n  model: model-dir\n"
                    "transform:\n  steps:\n    - step: blocklist\n      words_file: words.txt\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("config", "check", "--config", str(path), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["source"]["spec"] == f"file:{conf / 'talk.wav'}"
    assert shown["sink"]["spec"] == f"jsonl:{conf / 'out' / 'echo.jsonl'}"
    assert shown["sink"]["also"] == [f"jsonl:{conf / 'copy.jsonl'}"]
    assert shown["asr"]["models_dir"] == str(conf / "store")
    assert shown["asr"]["model"] == str(conf / "model-dir")
    assert shown["transform"]["steps"][0]["words_file"] == str(conf / "words.txt")
    # Model names and Hugging Face repo ids stay names.
    for name in ("tiny.en", "Systran/faster-whisper-tiny"):
        path.write_text(f"asr:\n  model: {name}\n", encoding="utf-8")
        assert load_settings(path, env={}).asr.model == name


def test_paths_on_the_command_line_stay_relative_to_the_working_directory(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sink:\n  spec: jsonl:in-file.jsonl\n", encoding="utf-8")
    s = load_settings(path, {"sink.spec": "jsonl:out.jsonl", "source.spec": "file:x.wav"}, env={})
    assert s.sink.spec == "jsonl:out.jsonl" and s.source.spec == "file:x.wav"


@pytest.mark.parametrize("spec", ["file:", "file:   ", "FILE:"])
def test_an_empty_file_spec_stays_an_error(scratch: Path, spec: str) -> None:
    """`file:` used to become the config file's own directory (then exit 3 at run)."""
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, f"source:\n  spec: '{spec}'\n")
    assert problem_keys(ei.value) == ["source.spec"]


# ------------------------------------------------------------------------------------- secrets
_SECRETS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=14,
                   max_size=40).map(lambda s: "Zq" + s)  # "Zq": never a word the messages contain


@GEN
@given(secret=_SECRETS, num=st.sampled_from([n for n in NUMBERS if not n.or_name]))  # a device name is text
def test_a_secret_in_the_wrong_key_is_never_echoed(scratch: Path, secret: str, num: Num) -> None:
    """`control.port: ${ECHO_RELAY_TOKEN}` printed the token in the validation error."""
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, yaml_for(num.key, "${ECHO_RELAY_TOKEN}"), env={"ECHO_RELAY_TOKEN": secret})
    assert num.key in problem_keys(ei.value)
    assert secret not in str(ei.value) and "*** from the environment" in str(ei.value)
    # ... and written literally (a token pasted into the wrong key):
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, yaml_for(num.key, secret + "9"))
    assert secret not in str(ei.value)


@GEN
@given(secret=_SECRETS, where=st.sampled_from(["header", "url_userinfo", "url_query", "url_user", "env_model",
                                               "env_spec", "api_key", "meeting_token", "step_token"]))
def test_secrets_are_redacted_from_the_dump_and_every_message(scratch: Path, secret: str, where: str) -> None:
    env = {"HOOK_TOKEN": secret}
    step = {"step": "webhook", "url": "https://hook.example/t"}
    tree: dict[str, Any] = {"transform": {"steps": [step]}}
    if where == "header":
        step["headers"] = {"Authorization": "Bearer ${HOOK_TOKEN}", "X-Api-Key": secret, "Cookie": f"s={secret}"}
    elif where == "url_userinfo":
        step["url"] = f"https://user:{secret}@hook.example/t"
    elif where == "url_user":
        step["url"] = f"https://{secret}@hook.example/t"
    elif where == "url_query":
        step["url"] = f"https://hook.example/t?token={secret}&x=1"
    elif where == "env_model":
        tree["asr"] = {"model": "${HOOK_TOKEN}"}
    elif where == "env_spec":
        tree["sink"] = {"spec": "jsonl:/tmp/${HOOK_TOKEN}.jsonl"}
    elif where == "api_key":
        tree["tavus"] = {"api_key": secret}
    elif where == "meeting_token":
        tree["tavus"] = {"meeting_token": "${HOOK_TOKEN}"}
    else:
        step["token"] = secret  # a user step's own option named like a secret
    settings = load_text(scratch, yaml.safe_dump(tree), env=env)
    assert secret not in yaml.safe_dump(redacted_dump(settings), allow_unicode=True)
    assert secret in secret_values(settings)  # registered for the logs by the CLI
    # The same value where validation or a stage check quotes it:
    step["url"] = step["url"].replace("https://", "ftp://")  # the webhook step rejects it, quoting the URL
    problems = check_stages(load_text(scratch, yaml.safe_dump(tree), env=env), checks=("transform",))
    assert all(secret not in p.line for p in problems)
    # A spec filled from the environment, which the spec grammar's error quotes:
    with pytest.raises(ConfigError) as ei:
        load_text(scratch, yaml.safe_dump({**tree, "sink": {"spec": "kafka:${HOOK_TOKEN}"}}), env=env)
    assert "sink.spec" in problem_keys(ei.value) and secret not in str(ei.value)


def test_short_values_from_the_environment_are_still_hidden_in_the_dump(scratch: Path) -> None:
    s = load_text(scratch, "asr:\n  beam_size: ${BEAM}\n  model: ${MODEL:-tiny.en}\n", env={"BEAM": "3"})
    dump = redacted_dump(s)
    assert s.asr.beam_size == 3 and dump["asr"]["beam_size"] == "***"
    assert dump["asr"]["model"] == "tiny.en"  # the file's default, not the environment's


def test_config_check_prints_no_secret(tmp_path: Path) -> None:
    hook, relay, url_pw, query = "hooktok-5f4e3d2c1b", "relaytok-0a9b8c7d6e", "pw-1a2b3c4d5e", "qt-9z8y7x6w5v"
    path = tmp_path / "c.yaml"
    path.write_text(
        "transform:\n  steps:\n    - step: webhook\n"
        f"      url: https://user:{url_pw}@hook.example/x?token={query}\n"
        "    - step: webhook\n      url: https://hook.example/y\n"  # user info and a header: one step each (issue 27)
        "      headers: {Authorization: 'Bearer ${HOOK_TOKEN}'}\n"
        "control:\n  token: ${ECHO_RELAY_TOKEN}\n"
        f"tavus:\n  conversation_url: https://x.daily.co/room?t={query}\n", encoding="utf-8")
    env = {"HOOK_TOKEN": hook, "ECHO_RELAY_TOKEN": relay}
    ok = cli("config", "check", "--config", str(path), "--log-level", "debug", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "Authorization: '***'" in ok.stdout and "https://***@hook.example/x?token=***" in ok.stdout
    # The same secrets where validation fails: a token in the wrong key, a bad URL.
    path.write_text(path.read_text() + "asr:\n  beam_size: ${ECHO_RELAY_TOKEN}\n"
                    f"sink:\n  spec: 'kafka:{url_pw}'\n", encoding="utf-8")
    bad = cli("config", "check", "--config", str(path), env=env)
    keys = [e.split(": ", 1)[0] for e in config_errors(bad)]
    assert keys == ["asr.beam_size", "sink.spec"]
    for proc in (ok, bad):
        for secret in (hook, relay, url_pw, query):
            assert secret not in proc.stdout + proc.stderr, secret


def test_run_output_hides_values_from_the_environment(tmp_path: Path) -> None:
    """A start-up failure quoting an env-filled value (here a model directory) prints ***."""
    secret_dir = tmp_path / "models-4d3c2b1a0f9e"
    path = tmp_path / "c.yaml"
    path.write_text("asr:\n  model: ${MODEL_DIR}\n  download: false\n", encoding="utf-8")
    proc = cli("run", "--no-control", "--config", str(path), "--sink", "console", "--log-level", "debug",
               env={"MODEL_DIR": str(secret_dir)})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert secret_dir.name not in proc.stdout + proc.stderr
    assert "model directory *** does not exist" in proc.stderr


def test_config_error_lines_are_single_and_key_named() -> None:
    err = ConfigError.combine([ConfigError("a", "x.y"), ConfigError.combine([ConfigError("b", "z"),
                                                                            ConfigError("c")])])
    assert [p.line for p in err.problems] == ["x.y: a", "z: b", "c"]
    assert str(err) == "x.y: a\nz: b\nc" and err.key == "x.y"
    assert cfg.dotted(("transform", "steps", 0, "url")) == "transform.steps[0].url"
