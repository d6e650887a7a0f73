"""Find engines and transform steps by built-in name, entry point, or dotted path.

One resolver serves every pluggable stage, so `asr.engine`, `vad.engine`, transform steps and
perception analyzers all accept the same three forms:

- a built-in name (`faster-whisper`, `webrtc`, `filler_words`, ...),
- an installed entry point in the stage's group (`echo_relay.asr`, `echo_relay.vad`,
  `echo_relay.transforms`, `echo_relay.perception`),
- a dotted path `package.module:attribute` (or `package.module.attribute`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

ASR_GROUP = "echo_relay.asr"
VAD_GROUP = "echo_relay.vad"
TRANSFORM_GROUP = "echo_relay.transforms"
PERCEPTION_GROUP = "echo_relay.perception"  # audio and video analyzers (pipeline/perception/)


class PluginError(ValueError):
    """A plugin name or path could not be resolved; the message says what was tried."""


def import_dotted(path: str) -> Any:
    """Import `pkg.mod:attr` or `pkg.mod.attr` and return the attribute."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise PluginError(f"{path!r} is not a dotted path like 'package.module:name'")
    if module_name.startswith(".") or any(not part.isidentifier() for part in module_name.split(".")):
        # importlib reads ".x" as a relative import (a TypeError) and would accept nothing useful here.
        raise PluginError(f"{path!r} is not a dotted path like 'package.module:name' "
                          f"({module_name!r} is not a module name)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import module {module_name!r} for {path!r}: {exc}") from exc
    except Exception as exc:  # the module itself is broken (SyntaxError, an error at import): still the key's fault
        raise PluginError(f"importing module {module_name!r} for {path!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(f"module {module_name!r} has no attribute {attr_path!r}") from exc
    return obj


def resolve(name: str, builtins: Mapping[str, Callable[..., Any]], group: str) -> Any:
    """Return the factory/class/callable registered under `name` for an entry point `group`."""
    if name in builtins:
        return builtins[name]
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # a broken third-party package must not look like "unknown name"
                raise PluginError(f"entry point {name!r} in {group} failed to load: {exc}") from exc
    if ":" in name or "." in name:
        return import_dotted(name)
    known = sorted(builtins) + sorted(ep.name for ep in entry_points(group=group))
    raise PluginError(f"unknown name {name!r}; expected one of {known} or a dotted path 'package.module:name'")
