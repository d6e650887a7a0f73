"""Transform step interface: `(text, meta) -> text | None` (None drops the utterance).

A step is any callable with that signature, sync or async. Factories named in config receive the
step's extra config keys as keyword arguments and return such a callable (a class whose instances
are callable works too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

from pipeline.frames import UtteranceMeta

StepResult: TypeAlias = "str | None"
Step: TypeAlias = Callable[[str, UtteranceMeta], "str | Awaitable[str | None] | None"]
