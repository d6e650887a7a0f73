"""ASR engine interface: one utterance's audio + metadata in, text + confidence out."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pipeline.frames import Pcm, Transcript, UtteranceMeta

T = TypeVar("T")


class AsrError(Exception):
    """The engine cannot start (model missing/corrupt, server unreachable). Message is user-facing."""


class AsrEngine(ABC):
    name: str = "asr"
    model_name: str = ""
    # True: the engine decodes one call at a time (one thread), so callers queue for it and it gets
    # several utterances per `transcribe_batch` call (pipeline/asr/scheduler.py). False: calls may
    # overlap (a remote server), and each goes to `transcribe` at once.
    batching: bool = False
    # True: the relay may ask for more than the one final decode of an utterance: speculative decodes in its
    # pauses (pipeline/speculation.py) and interim ones for event-stream watchers. False: one request per
    # utterance (a remote server that queues or bills each one, `asr.openai_http.speculative`).
    speculative: bool = True

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Load and warm up once, before the first utterance (no-op by default)."""

    @property
    def only_language(self) -> str | None:
        """After `load`: the one language the loaded model can write, whatever asr.language says (an
        English-only Whisper model: "en"); None when it writes any. The relay fixes the conversation's language
        to it (pipeline/language.py) and Tavus is told it (pipeline/tavus/provision.py)."""
        return None

    def readiness(self) -> dict[str, bool]:
        """The engine's own checks for `/readyz`, beside the relay's (e.g. a remote server's reachability)."""
        return {}

    @abstractmethod
    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        """Transcribe 16 kHz mono int16 `audio`. Must not block the event loop."""

    async def transcribe_batch(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | BaseException]:
        """Several utterances at once (the shared scheduler calls this, pipeline/asr/scheduler.py): a result
        or an exception per item, in order. By default, `transcribe` on each, concurrently."""
        return list(await asyncio.gather(*(self.transcribe(a, m) for a, m in items), return_exceptions=True))

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class SyncAsrEngine(AsrEngine):
    """Base for CPU-bound engines: implement `load_sync` and `transcribe_sync`; they run in a
    dedicated one-thread executor so the event loop never blocks and decodes never overlap."""

    batching = True

    def __init__(self, concurrency: int = 1) -> None:
        # Calls of the engine that may run at once (its threads); the scheduler keeps that many batches going.
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"asr-{self.name}")

    def load_sync(self) -> None:
        """Load and warm up."""

    @abstractmethod
    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript: ...

    def transcribe_batch_sync(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | Exception]:
        """Override to decode several utterances in one call; by default one after the other."""
        results: list[Transcript | Exception] = []
        for audio, meta in items:
            try:
                results.append(self.transcribe_sync(audio, meta))
            except Exception as exc:
                results.append(exc)
        return results

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load_sync)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the engine's thread, after the decodes already there."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.transcribe_sync, audio, meta)

    async def transcribe_batch(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | BaseException]:
        loop = asyncio.get_running_loop()
        return list(await loop.run_in_executor(self._executor, self.transcribe_batch_sync, list(items)))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
