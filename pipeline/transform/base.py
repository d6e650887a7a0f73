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


class OptionError(ValueError):
    """Raised by a step factory for an invalid option value; `option` names the option.

    `build_chain` turns it into a `ConfigError` on the key `transform.steps[i].<option>`.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
