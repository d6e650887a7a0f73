"""The wheel as users install it: built with `python -m build`, installed into a fresh virtual environment
(no network: the dependencies come from this venv through a .pth file, the wheel with `--no-deps --no-index`),
and run from there: `--version`, the bundled sample, and the container's entrypoint serving and draining on
SIGTERM (deploy/docker/entrypoint.sh, deploy/docker/probe.py). README "Install" and "Deploy"."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
TOKEN = "test-token-0123456789abcdef"
# What the Dockerfile copies into its build stage, and all the wheel needs.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "pipeline")
STEP_S = 120  # the longest any one command here may take (a model load on a busy 2-core machine included)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    workdir: Path  # an empty directory to run in: no ./config.yaml, no ./pipeline

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in {"PYTHONPATH", "VIRTUAL_ENV", "ECHO_RELAY_CONFIG", "ECHO_RELAY_TOKEN", "TAVUS_API_KEY"}}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", **extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.workdir, env=self.env(**extra), capture_output=True, text=True,
                              timeout=STEP_S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    # Build from a copy of the inputs, so the checkout gets no build/ or egg-info of this build.
    src = base / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = base / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True, text=True, timeout=STEP_S)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("echo_relay-*.whl")

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=STEP_S)
    venv_site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies from this venv, after the fresh one's own site-packages: its .pth files (the editable
    # install of the checkout among them) are not processed, so `pipeline` can only come from the wheel.
    (venv_site / "_echo_relay_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "--no-deps", "--no-index", "--no-cache-dir", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=STEP_S)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    workdir = base / "work"
    workdir.mkdir()
    return Installed(wheel, venv, workdir)


def _package_data() -> set[str]:
    """Every file of the checkout the installed package reads besides its modules."""
    files = {ROOT / "pipeline" / "py.typed"}
    for folder in (ROOT / "pipeline" / "assets", ROOT / "pipeline" / "control" / "page"):
        files |= {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return {p.relative_to(ROOT).as_posix() for p in files}


def test_wheel_carries_the_package_data(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = _package_data()
    assert {"pipeline/assets/jfk.wav", "pipeline/control/page/index.html", "pipeline/py.typed"} <= expected
    assert not expected - names, sorted(expected - names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert re.search(r"^echo-relay = pipeline\.entry:main$", text, re.M), text  # signals first (pipeline/signals.py)


def test_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    where = installed.run(str(installed.bin / "python"), "-c", "import pipeline; print(pipeline.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout


def test_version_matches_pyproject(installed: Installed) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = installed.run("echo-relay", "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"echo-relay {version}"


def test_runs_the_bundled_sample(installed: Installed) -> None:
    out = installed.run("echo-relay", "run", "--speed", "0", "--sink", "jsonl:out.jsonl", "--no-control", "--no-view")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (installed.workdir / "out.jsonl").read_text().splitlines()]
    text = " ".join(r["text"] for r in records if r["event"] == "echo").lower()
    for words in ("fellow americans", "ask not", "what you can do for your country"):
        assert words in text, text


def _url(log: str) -> str:
    m = re.search(r"control API on http://[^:\s\"]+:(\d+)", log)
    assert m, log[-3000:]
    return f"http://127.0.0.1:{m.group(1)}"


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[str], timeout_s: float = STEP_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text()
        if re.search(pattern, text):
            return text
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}:\n{text[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{path.read_text()[-3000:]}")


@pytest.fixture
def serving(installed: Installed, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path, Path]]:
    """The image's entrypoint with the image's config, as `docker run IMAGE --control-port 0` starts it."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([str(DOCKER / "entrypoint.sh"), "--control-port", "0"], cwd=installed.workdir,
                                env=installed.env(ECHO_RELAY_CONFIG=str(DOCKER / "config.yaml"),
                                                  ECHO_RELAY_TOKEN=TOKEN),
                                stdout=stdout, stderr=stderr, text=True)
    try:
        url = _url(_wait_for(err, r"serve: up to \d+ relays", proc))
        yield proc, url, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _probe(installed: Installed, url: str, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return installed.run(str(installed.bin / "python"), str(DOCKER / "probe.py"), *args,
                         ECHO_RELAY_PORT=url.rsplit(":", 1)[1], ECHO_RELAY_TOKEN=token)


def test_entrypoint_serves_and_drains_on_sigterm(installed: Installed,
                                                 serving: tuple[subprocess.Popen[str], str, Path, Path]) -> None:
    proc, url, out, err = serving
    # exec: the entrypoint's process is echo-relay itself, so SIGTERM reaches it
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"/echo-relay") for part in cmdline), cmdline
    assert b"serve" in cmdline

    # the probes the image and the pod use
    assert _probe(installed, url, "/healthz", token="").returncode == 0
    ready = _probe(installed, url, "/readyz")
    assert ready.returncode == 0 and '"ready"' in ready.stdout, ready.stdout + ready.stderr
    refused = _probe(installed, url, "/readyz", token="")
    assert refused.returncode == 1 and "401" in refused.stdout
    idle = _probe(installed, url, "wait-idle", "--max-s", "5")
    assert idle.returncode == 0 and "no active relay" in idle.stdout

    headers = {"Authorization": f"Bearer {TOKEN}"}
    # what Prometheus scrapes (deploy/compose/prometheus.yml, deploy/kubernetes/servicemonitor.yaml), with the token
    metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert metrics.status_code == 200 and "echo_relay_model_loaded 1.0" in metrics.text, metrics.text[:500]
    # the config's source, the sample, looped: the relay runs until the SIGTERM however slow this machine is
    created = httpx.post(f"{url}/v1/relays", json={"config": {"source.file.loop": True}}, headers=headers, timeout=10)
    assert created.status_code == 201, created.text
    relay = f"{url}/v1/relays/{created.json()['id']}"
    deadline = time.monotonic() + STEP_S
    while httpx.get(relay, headers=headers, timeout=10).json()["ledger"]["delivered"] < 1:
        assert time.monotonic() < deadline, "no utterance delivered"
        time.sleep(0.2)
    busy = _probe(installed, url, "wait-idle", "--max-s", "0.5")
    assert busy.returncode == 0 and "1 relay(s) still active" in busy.stdout, busy.stdout + busy.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STEP_S) == 0, err.read_text()[-3000:]
    log = err.read_text()
    assert "SIGTERM: refusing new relays, draining 1 relay(s)" in log
    # ended, not failed: what was said was delivered (a word cut off by the stop may be dropped by the gate)
    ended = re.search(r"relay \w+ ended: \d+ utterance\(s\), (\d+) delivered, \d+ dropped, 0 undeliverable", log)
    assert ended and int(ended.group(1)) >= 1, log[-3000:]
    assert "And so my fellow Americans" in out.read_text()


def test_entrypoint_without_a_token_says_which_variable(installed: Installed) -> None:
    out = installed.run(str(DOCKER / "entrypoint.sh"), "--control-port", "0",
                        ECHO_RELAY_CONFIG=str(DOCKER / "config.yaml"))
    assert out.returncode == 5, out.stderr[-3000:]  # echo-relay refuses 0.0.0.0 without control.token
    assert "ECHO_RELAY_TOKEN is not set" in out.stderr
    assert "without control.token" in out.stderr


def test_entrypoint_passes_other_commands_through(installed: Installed) -> None:
    version = installed.run(str(DOCKER / "entrypoint.sh"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("echo-relay "), version.stdout + version.stderr
    check = installed.run(str(DOCKER / "entrypoint.sh"), "config", "check",
                          ECHO_RELAY_CONFIG=str(DOCKER / "config.yaml"), ECHO_RELAY_TOKEN=TOKEN)
    assert check.returncode == 0, check.stderr
    assert "0.0.0.0" in check.stdout and "ECHO_RELAY_TOKEN is not set" not in check.stderr
