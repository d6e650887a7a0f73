"""Transform step interface: `(text, meta) -> text | None` (None drops the utterance).

A step is any callable with that signature, sync or async. Factories named in config receive the
step's extra config keys as keyword arguments and return such a callable (a class whose instances
are callable works too).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Literal, TypeAlias

from pipeline.frames import UtteranceMeta

StepResult: TypeAlias = "str | None"
Step: TypeAlias = Callable[[str, UtteranceMeta], "str | Awaitable[str | None] | None"]

# A lone surrogate ("x \ud800", e.g. from json.loads of "\\ud800") cannot be encoded as UTF-8: it
# failed only in the sink, with a traceback (issue 11).
_SURROGATE = re.compile("[\ud800-\udfff]")
# Control characters (Unicode category Cc) other than tab, line feed and carriage return: NUL and
# friends are never speech, and C1 controls (U+0080..U+009F) are the usual trace of mojibake.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

TextProblem: TypeAlias = Literal["too_long", "bad_text"]


def text_problem(text: str, max_chars: int) -> tuple[TextProblem, str] | None:
    """Why `text` must not be handed on (reason, detail), or None when it may.

    `too_long`: more than `max_chars` characters (`transform.max_text_chars`); `bad_text`: a lone
    surrogate (not encodable as UTF-8) or a control character other than tab, LF and CR. The
    detail names the first offending character by code point and position, never the text itself.
    """
    if len(text) > max_chars:
        return "too_long", f"{len(text)} characters, over transform.max_text_chars ({max_chars})"
    bad = _SURROGATE.search(text)
    if bad is not None:
        return "bad_text", f"not encodable as UTF-8: lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}"
    bad = _CONTROL.search(text)
    if bad is not None:
        return "bad_text", f"control character U+{ord(bad.group()):04X} at character {bad.start()}"
    return None


class OptionError(ValueError):
    """Raised by a step factory for an invalid option value; `option` names the option.

    `build_chain` turns it into a `ConfigError` on the key `transform.steps[i].<option>`.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
