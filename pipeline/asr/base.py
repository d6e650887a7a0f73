"""ASR engine interface: one utterance's audio + metadata in, text + confidence out."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from pipeline.frames import Pcm, Transcript, UtteranceMeta


class AsrError(Exception):
    """The engine cannot start (model missing/corrupt, server unreachable). Message is user-facing."""


class AsrEngine(ABC):
    name: str = "asr"
    model_name: str = ""

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Load and warm up once, before the first utterance (no-op by default)."""

    @abstractmethod
    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        """Transcribe 16 kHz mono int16 `audio`. Must not block the event loop."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class SyncAsrEngine(AsrEngine):
    """Base for CPU-bound engines: implement `load_sync` and `transcribe_sync`; they run in a
    dedicated one-thread executor so the event loop never blocks and decodes never overlap."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"asr-{self.name}")

    def load_sync(self) -> None:
        """Load and warm up."""

    @abstractmethod
    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript: ...

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load_sync)

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.transcribe_sync, audio, meta)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
