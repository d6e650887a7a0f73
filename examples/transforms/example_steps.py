"""Example transform steps loaded by dotted path (no packaging needed).

Put this directory on PYTHONPATH (or copy the file next to your config) and name a step as
`example_steps:<name>` in `transform.steps`:

    transform:
      steps:
        - step: example_steps:skip_while_replica_speaks   # plain sync function, no options
        - step: example_steps:min_words                   # factory function with an option
          count: 2
        - step: example_steps:glossary                    # plain async function
          timeout_s: 0.5
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeline.frames import UtteranceMeta


def skip_while_replica_speaks(text: str, meta: UtteranceMeta) -> str | None:
    """A plain step: (text, meta) -> text, or None to drop. Uses the room state the sink reports."""
    if meta.room.get("replica_speaking"):
        return None
    return text


def min_words(count: int = 2) -> Callable[[str, UtteranceMeta], str | None]:
    """A factory: config options arrive as keyword arguments, the returned callable is the step.

    Drops very short utterances ("okay", "yeah") that would otherwise make the replica talk.
    """
    if count < 1:
        raise ValueError("count must be >= 1")

    def step(text: str, meta: UtteranceMeta) -> str | None:
        return text if len(text.split()) >= count else None

    return step


GLOSSARY = {"tavus": "Tavus", "echo relay": "echo-relay"}


async def glossary(text: str, meta: UtteranceMeta) -> str:
    """An async step: awaits I/O (here a stand-in for a database or HTTP lookup) without blocking."""
    await asyncio.sleep(0)  # e.g. `await client.get(...)`
    for wrong, right in GLOSSARY.items():
        text = text.replace(wrong, right)
    return text
