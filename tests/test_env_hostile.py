"""Hostile and unlucky input, round 2 (issue 27): settings from the environment, names no file can have, and
credentials in two places.

- Secrets and settings from the environment with no config file: every `${VAR}` default config.yaml shows is
  pipeline/config.py `ENV_DEFAULTS` (one source), and holds with no file, with config.yaml, and with a file
  that leaves the key out; a token from ECHO_RELAY_TOKEN with no file really protects the API.
- Bad bytes in names: a NUL byte, a lone surrogate or a name too long for the OS in any setting naming a file
  (source and sink specs, sink.also, asr.models_dir, asr.model, serve.file_roots, step and analyzer path
  options) is a configuration error naming the key before any call into the OS: exit 2 from the CLI, 422
  from POST /v1/relays (never a 500).
- Credentials in two places: a URL with user info beside a configured Authorization header (webhook), an API
  key (openai-http) or in tavus.api_url is refused at config check; what a webhook sends is exactly the one
  credential configured (a real HTTP server on 127.0.0.1 records it).
Generated cases load in-process; a few representative ones run `python -m pipeline` as subprocesses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.app import check_stages
from pipeline.config import ENV_DEFAULTS, ConfigError, Settings, load_settings, parse_yaml, redacted_dump
from pipeline.control.server import start_control_server
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.specs import MAX_NAME_BYTES, MAX_PATH_BYTES
from pipeline.transform.webhook import WebhookStep
from tests.conftest import REPO

HANG_GUARD_S = 120  # a subprocess that has not finished by then hangs: a guard, not a timing claim
GEN = hsettings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GEN_HTTP = hsettings(GEN, max_examples=20)  # one real HTTP request each
ENV_NAMES = ("ECHO_RELAY_", "TAVUS_", "OPENAI_API_KEY")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_NAMES)}
    full_env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def value_at(settings: Settings, key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        node = getattr(node, part)
    return node.get_secret_value() if hasattr(node, "get_secret_value") else node


def refs_in(tree: Any, at: str = "") -> dict[str, str]:
    """Every string of a raw (unexpanded) YAML tree holding a `${VAR}` reference, by dotted key."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in refs_in(value, f"{at}.{key}" if at else key).items()}
    return {at: tree} if isinstance(tree, str) and "${" in tree else {}


# --------------------------------------------------------------- settings from the environment
SHIPPED = parse_yaml((REPO / "config.yaml").read_text(encoding="utf-8"), "config.yaml")
# A value each variable may hold (a URL for the URL setting), and what the setting is without it.
ENV_VALUES = {"tavus.api_url": "http://127.0.0.1:9/tavus"}
DEFAULT_VALUE = {"tavus.api_url": "https://tavusapi.com"}


def test_config_yaml_shows_exactly_the_built_in_environment_defaults() -> None:
    assert refs_in(SHIPPED) == ENV_DEFAULTS


@pytest.fixture
def no_file_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without config.yaml, and no ECHO_RELAY_CONFIG: the built-in defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ECHO_RELAY_CONFIG", raising=False)
    return tmp_path


@pytest.mark.parametrize("source", ["no file", "config.yaml", "a file without the key"])
@pytest.mark.parametrize("key", sorted(ENV_DEFAULTS))
def test_each_environment_default_holds_with_or_without_a_file(tmp_path: Path, key: str, source: str) -> None:
    var = ENV_DEFAULTS[key][2:].split(":-")[0].rstrip("}")
    value = ENV_VALUES.get(key, f"{var.lower()}-value-7f3a9c")
    path: Path | None = None
    if source == "config.yaml":
        path = REPO / "config.yaml"
    elif source == "a file without the key":
        path = tmp_path / "c.yaml"
        path.write_text("vad:\n  threshold: 0.5\n", encoding="utf-8")
    assert value_at(load_settings(path, env={var: value}), key) == value
    assert value_at(load_settings(path, env={}), key) == DEFAULT_VALUE.get(key)  # unset: the `:-` default


@pytest.mark.parametrize("key", sorted(ENV_DEFAULTS))
def test_a_key_the_file_sets_wins_over_the_environment(tmp_path: Path, key: str) -> None:
    var = ENV_DEFAULTS[key][2:].split(":-")[0].rstrip("}")
    section, *middle, last = key.split(".")
    path = tmp_path / "c.yaml"
    indent = "".join(f"{'  ' * (i + 1)}{m}:\n" for i, m in enumerate(middle))
    written = ENV_VALUES.get(key, "written-in-the-file-1234").replace("9/", "8/")
    path.write_text(f"{section}:\n{indent}{'  ' * (len(middle) + 1)}{last}: {json.dumps(written)}\n", encoding="utf-8")
    env_value = ENV_VALUES.get(key, "from-the-environment-5678")
    if key == "tavus.api_url":  # TAVUS_API_URL overrides the file (the README's documented convenience)
        assert value_at(load_settings(path, env={var: env_value}), key) == env_value
    else:
        assert value_at(load_settings(path, env={var: env_value}), key) == written


@GEN
@given(token=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="$"), min_size=6,
                     max_size=64))
def test_any_token_from_the_environment_is_taken_as_is(token: str) -> None:
    settings = load_settings(None, env={"ECHO_RELAY_TOKEN": token})
    assert settings.control.token is not None and settings.control.token.get_secret_value() == token
    assert redacted_dump(settings)["control"]["token"] == "***"  # filled from the environment: never shown


def test_with_no_file_the_token_from_the_environment_protects_the_api(no_file_dir: Path) -> None:
    """The issue's case: no --config, no ECHO_RELAY_CONFIG, no ./config.yaml, ECHO_RELAY_TOKEN set."""
    token = "env-token-5a1f0c"
    settings = load_settings(None, {"control.port": 0}, env={"ECHO_RELAY_TOKEN": token})

    class Handle:
        events = None

        def readiness(self) -> dict[str, bool]:
            return {"running": True}

        def status(self) -> dict[str, Any]:
            return {"secret": "private transcript"}

    async def probe() -> list[int]:
        from pipeline.events import EventBus
        handle: Any = Handle()
        handle.events = EventBus(Metrics(), lambda: 0.0)
        server = await start_control_server(handle, Metrics(), settings)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                statuses = [(await client.get("/status")).status_code,
                            (await client.get("/status", headers={"Authorization": "Bearer nope"})).status_code,
                            (await client.get("/status", headers={"Authorization": f"Bearer {token}"})).status_code,
                            (await client.get("/healthz")).status_code]
        finally:
            await server.stop()
        return statuses

    assert asyncio.run(probe()) == [401, 401, 200, 200]


def test_config_check_with_no_file_shows_the_token_is_set(no_file_dir: Path) -> None:
    proc = cli("config", "check", cwd=no_file_dir, env={"ECHO_RELAY_TOKEN": "env-token-5a1f0c",
                                                        "OPENAI_API_KEY": "sk-env-key-99"})
    assert proc.returncode == 0, proc.stderr
    dumped = parse_yaml(proc.stdout)
    assert dumped["control"]["token"] == "***" and dumped["asr"]["openai_http"]["api_key"] == "***"
    assert "env-token-5a1f0c" not in proc.stdout + proc.stderr and "sk-env-key-99" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------ bad bytes in names
def _nul(draw: st.DrawFn, base: str) -> str:
    at = draw(st.integers(0, len(base)))
    return base[:at] + "\x00" + base[at:]


def _surrogate(draw: st.DrawFn, base: str) -> str:
    at = draw(st.integers(0, len(base)))
    return base[:at] + chr(draw(st.integers(0xD800, 0xDBFF) | st.integers(0xDE00, 0xDFFF))) + base[at:]


def _long_name(draw: st.DrawFn, base: str) -> str:
    return base + "/" + "n" * draw(st.integers(MAX_NAME_BYTES + 1, MAX_NAME_BYTES + 300))


def _long_path(draw: st.DrawFn, base: str) -> str:
    return base + "/d" * draw(st.integers(MAX_PATH_BYTES // 2 + 1, MAX_PATH_BYTES))


BAD_NAMES = {"nul": _nul, "surrogate": _surrogate, "long_name": _long_name, "long_path": _long_path}
PROBLEM_WORDS = {"nul": "NUL byte", "surrogate": "lone surrogate", "long_name": f"at most {MAX_NAME_BYTES} bytes",
                 "long_path": f"at most {MAX_PATH_BYTES}"}
# Where a path enters the configuration: the dotted key a problem is reported under, and the override.
PATH_SETTINGS: dict[str, tuple[str, Any]] = {
    "source.spec": ("source.spec", lambda p: "file:" + p),
    "sink.spec": ("sink.spec", lambda p: "jsonl:" + p),
    "sink.also": ("sink.also", lambda p: ["jsonl:" + p]),
    "asr.models_dir": ("asr.models_dir", lambda p: p),
    "asr.model": ("asr.model", lambda p: p),
    "serve.file_roots": ("serve.file_roots", lambda p: [p]),
    "transform.steps": ("transform.steps[0]", lambda p: [{"step": "blocklist", "words_file": p}]),
    "perception.analyzers": ("perception.analyzers[0]", lambda p: [{"analyzer": "loudness", "model_path": p}]),
}


@st.composite
def bad_name(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(sorted(BAD_NAMES)))
    base = "/tmp/" + draw(st.text(st.characters(min_codepoint=48, max_codepoint=122, categories=["L", "N"]),
                                  min_size=1, max_size=20))
    return kind, BAD_NAMES[kind](draw, base)


@GEN
@given(case=bad_name(), setting=st.sampled_from(sorted(PATH_SETTINGS)))
def test_a_name_no_file_can_have_is_a_config_error_naming_the_key(case: tuple[str, str], setting: str) -> None:
    kind, path = case
    key, value = PATH_SETTINGS[setting]
    with pytest.raises(ConfigError) as info:
        load_settings(None, {setting: value(path)}, env={})
    assert [p.key for p in info.value.problems] == [key], info.value
    line = info.value.problems[0].line
    assert PROBLEM_WORDS[kind] in line, line
    assert line.isprintable() and "\x00" not in line  # the bad character is shown escaped, never as is


FIXED_BAD_NAMES = {"nul": "/tmp/a\x00b.wav", "surrogate": "/tmp/a\ud800b.wav", "long_name": "/tmp/" + "n" * 300,
                   "long_path": "/tmp" + "/d" * (MAX_PATH_BYTES // 2 + 1)}


@pytest.mark.parametrize("kind", sorted(FIXED_BAD_NAMES))
def test_the_same_names_in_a_config_file(tmp_path: Path, kind: str) -> None:
    path = FIXED_BAD_NAMES[kind]
    cfg = tmp_path / "c.yaml"  # JSON strings are YAML double-quoted scalars: \u0000 and \ud800 escapes
    cfg.write_text(f"source:\n  spec: {json.dumps('file:' + path)}\nsink:\n  spec: {json.dumps('jsonl:' + path)}\n"
                   f"asr:\n  models_dir: {json.dumps(path)}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    if kind == "surrogate":  # YAML itself refuses a lone surrogate escape: a config error naming the file
        assert "is not valid YAML" in str(info.value) and str(cfg) in str(info.value)
        return
    assert sorted(p.key or "" for p in info.value.problems) == ["asr.models_dir", "sink.spec", "source.spec"], \
        info.value
    assert all(PROBLEM_WORDS[kind] in p.line for p in info.value.problems), info.value


def test_run_and_check_exit_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text('source:\n  spec: "file:/tmp/a\\0b.wav"\n', encoding="utf-8")
    for args in (["config", "check", "--config", str(cfg)], ["run", "--config", str(cfg), "--no-control"]):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "configuration error: source.spec:" in proc.stderr and "NUL byte" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    long_name = "file:/tmp/" + "x" * (MAX_NAME_BYTES + 1) + ".wav"  # argv cannot carry a NUL; a name too long
    proc = cli("run", "--source", long_name, "--no-control")
    assert proc.returncode == 2 and "configuration error: source.spec:" in proc.stderr, proc.stderr
    proc = cli("transcribe", "/tmp/" + "y" * (MAX_NAME_BYTES + 1) + ".wav")
    assert proc.returncode == 2 and "configuration error: files[0]:" in proc.stderr, proc.stderr
    assert "loaded" not in proc.stderr  # refused before the model was loaded


@pytest.fixture(scope="module")
def serve_api() -> Iterator[tuple[str, Any]]:
    """`serve`'s control API on 127.0.0.1 (its own loop in a thread) with a pool that never starts a relay."""
    from faults import SHORT_CLIPS, ReferenceAsr, make_track

    from pipeline.config import set_dotted
    from pipeline.control.server import create_serve_app
    from pipeline.serve import RelayPool

    tree: dict[str, Any] = {}
    for key, value in {"control.port": 0, "serve.file_roots": ["/tmp"], "asr.download": False}.items():
        set_dotted(tree, key, value)
    settings = Settings.model_validate(tree)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    track_dir = Path("/tmp") / f"env-hostile-{os.getpid()}"
    track_dir.mkdir(exist_ok=True)
    pool = RelayPool(settings, tree, engine=ReferenceAsr(make_track(track_dir / "t.wav", SHORT_CLIPS[:1])))

    async def start() -> Any:
        return await start_control_server(None, pool.metrics, settings, app=create_serve_app(pool, settings))

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield server.url, pool
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@GEN_HTTP
@given(case=bad_name(), field=st.sampled_from(["source", "sink", "config.sink.also", "config.transform.steps"]))
def test_post_relays_with_a_bad_name_is_422_naming_the_field(serve_api: tuple[str, Any], case: tuple[str, str],
                                                             field: str) -> None:
    url, pool = serve_api
    kind, path = case
    body: dict[str, Any] = {"source": "file:/tmp/ok.wav", "sink": "console"}
    if field == "source":
        body["source"] = "file:" + path
    elif field == "sink":
        body["sink"] = "jsonl:" + path
    elif field == "config.sink.also":
        body["config"] = {"sink": {"also": ["jsonl:" + path]}}
    else:
        body["config"] = {"transform": {"steps": [{"step": "blocklist", "words_file": path}]}}
    raw = json.dumps(body).encode()  # json.dumps writes a lone surrogate as \ud800: valid JSON text
    r = httpx.post(url + "/v1/relays", content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"].startswith(field), err
    assert PROBLEM_WORDS[kind] in err["error"], err
    assert pool.list() == []


# ------------------------------------------------------------------- credentials in two places
USERINFO_URLS = ["http://user:pw-9x7q@127.0.0.1:9/hook", "http://user@127.0.0.1:9/hook", "http://:pw-9x7q@127.0.0.1:9/hook",
                 "https://u%40x:p%3Aw@example.invalid/hook"]
AUTH_SPELLINGS = ["Authorization", "authorization", "AUTHORIZATION", "AuThOrIzAtIoN"]


@pytest.mark.parametrize("header", AUTH_SPELLINGS)
@pytest.mark.parametrize("url", USERINFO_URLS)
def test_webhook_url_with_user_info_beside_an_authorization_header_is_refused(url: str, header: str) -> None:
    settings = load_settings(None, {"transform.steps": [{"step": "webhook", "url": url,
                                                          "headers": {header: "Bearer hook-token-123"}}]}, env={})
    problems = check_stages(settings, checks=("transform",))
    assert [p.key for p in problems] == ["transform.steps[0].url"], problems
    assert "user info" in problems[0].message and "Authorization" in problems[0].message
    assert "pw-9x7q" not in problems[0].line and "hook-token-123" not in problems[0].line


def test_config_check_refuses_it_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("transform:\n  steps:\n    - step: webhook\n      url: http://ops:hunter22@127.0.0.1:9/x\n"
                   "      headers: {Authorization: Bearer tok-abcdef}\n", encoding="utf-8")
    proc = cli("config", "check", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "configuration error: transform.steps[0].url:" in proc.stderr
    assert "hunter22" not in proc.stderr and "tok-abcdef" not in proc.stderr


@pytest.mark.parametrize("url", USERINFO_URLS)
def test_openai_http_url_with_user_info_and_an_api_key_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"asr.openai_http.url": url}, env={"OPENAI_API_KEY": "sk-env-123456"})
    assert info.value.problems[0].key == "asr.openai_http.api_key" and "user info" in info.value.problems[0].message
    assert "sk-env-123456" not in str(info.value)
    load_settings(None, {"asr.openai_http.url": url}, env={})  # user info alone is one credential: fine


@pytest.mark.parametrize("url", USERINFO_URLS)
def test_tavus_url_with_user_info_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"tavus.api_url": url}, env={})
    assert info.value.problems[0].key == "tavus.api_url" and "never sent" in info.value.problems[0].message


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []  # Authorization of each request, in order

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.mark.parametrize(("userinfo", "headers", "sent"), [
    ("", {}, None),
    ("", {"Authorization": "Bearer only-the-header"}, "Bearer only-the-header"),
    ("ops:s3cret@", {}, "Basic " + base64.b64encode(b"ops:s3cret").decode()),
    ("ops:s3cret@", {"X-Trace": "1"}, "Basic " + base64.b64encode(b"ops:s3cret").decode()),
])
def test_a_webhook_sends_exactly_the_credential_configured(recorder: ThreadingHTTPServer, userinfo: str,
                                                           headers: dict[str, str], sent: str | None) -> None:
    step = WebhookStep(f"http://{userinfo}127.0.0.1:{recorder.server_address[1]}/hook", headers=headers)
    meta = UtteranceMeta(utterance_id="u1", audio_start_s=0.0, audio_end_s=1.0)

    async def call() -> str | None:
        try:
            return await step("hello", meta)
        finally:
            await step.aclose()

    _Recorder.seen.clear()
    assert asyncio.run(call()) == "hello"  # 204: unchanged
    assert _Recorder.seen == [sent]
