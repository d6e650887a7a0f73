"""`shout`: an example echo-relay transform step shipped as an installable package.

Registered under the `echo_relay.transforms` entry-point group (see pyproject.toml), so a config
names it `step: shout`. It is a class: the step's config options are passed to `__init__`, and
the instance is called once per utterance.

    transform:
      steps:
        - step: shout
          words: [never, always]   # upper-case only these words (default: the whole text)
          exclaim: true            # turn a final "." into "!"
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["Shout"]


class Shout:
    """Upper-case the text (or only `words`) and, with `exclaim`, end statements with "!"."""

    def __init__(self, words: list[str] | None = None, exclaim: bool = True) -> None:
        if words is not None and not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError("words must be a list of non-empty strings")
        self.exclaim = exclaim
        self._rx = None
        if words:
            alternatives = "|".join(re.escape(w.strip()) for w in words)
            self._rx = re.compile(r"\b(?:" + alternatives + r")\b", re.IGNORECASE)

    def __call__(self, text: str, meta: Any) -> str:
        # `meta` is a pipeline.frames.UtteranceMeta; this step does not need it, and typing it as Any
        # keeps the package importable without echo-relay installed.
        text = self._rx.sub(lambda m: m.group(0).upper(), text) if self._rx else text.upper()
        if self.exclaim and text.endswith("."):
            text = text[:-1] + "!"
        return text
