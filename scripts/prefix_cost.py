"""Where a turn end's decode time goes, and whether forcing the text already decoded at an earlier pause saves any
(issue 24: a turn end the rule finishes at 250 ms is echoed only when the decode started at 150 ms is in).

    .venv/bin/python scripts/prefix_cost.py

For three clips of the clean benchmark stream (the first 15 s: one short window, as the relay decodes a turn), with
the relay's loaded model, prompt and suppressed tokens (tiny.en, int8, asr.cpu_threads 2), `generate` called as
WindowDecoder.decode calls it for a greedy decode (without its token budget and no-speech probability; a forced
prefix is not something a Request can ask for): the encoder pass, the generation, and the generation
again with the first 70 % of the words given as a forced prefix after the start-of-transcript sequence (what a
decode at the turn end could take from the decode at the clause pause before it). Each timing is the best of
three. CTranslate2 runs a forced prefix through the decoder step by step, as it generates, so the prefix saves
only the sampling, not the steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ctranslate2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.asr.whisper import FasterWhisperEngine  # noqa: E402
from pipeline.asr.whisper.window import pad_features, to_float, window_s  # noqa: E402
from pipeline.config import AsrSettings  # noqa: E402
from pipeline.frames import SAMPLE_RATE  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402

CLIPS = ("2086-149220-0000", "2902-9006-0017", "1993-147149-0021")
PREFIX_SHARE = 0.7
REPEATS = 3


def best_of(fn: Callable[[], Any], n: int = REPEATS) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def encode(model: Any, features: Any) -> Any:
    return model.encode(ctranslate2.StorageView.from_array(features))


def generate(model: Any, encoded: Any, prompt: list[int], suppress: list[int]) -> Any:
    return model.generate(encoded, [prompt], beam_size=1, max_length=448, return_scores=True,
                          return_logits_vocab=True, suppress_blank=True, suppress_tokens=suppress)[0]


def main() -> None:
    engine = FasterWhisperEngine(AsrSettings())
    engine.load_sync()
    dec = engine.decoder
    model = dec.model.model
    tok = dec.prompts.tokenizer("en")
    prompt = dec.prompts.prompt("en")
    suppress = dec.prompts.suppressed("en")
    print("| clip | audio | window | encode | generate (tokens) | generate with a forced 70 % prefix |")
    print("|---|---|---|---|---|---|")
    for clip in CLIPS:
        pcm = decode_file(ROOT / "tests/data/speech/clapclap/librispeech_dev_clean" / f"{clip}.flac")
        pcm = pcm[:15 * SAMPLE_RATE]
        seconds = len(pcm) / SAMPLE_RATE
        window = window_s(seconds)
        feats = pad_features([dec.features(to_float(pcm))], window)
        enc_s, encoded = best_of(partial(encode, model, feats))
        gen_s, result = best_of(partial(generate, model, encoded, prompt, suppress))
        tokens = result.sequences_ids[0]
        words = tok.decode(tokens).split()
        prefix = tok.encode(" " + " ".join(words[:int(len(words) * PREFIX_SHARE)]).rstrip(".,"))
        pre_s, _ = best_of(partial(generate, model, encoded, prompt + prefix, suppress))
        print(f"| {clip} | {seconds:.1f} s | {window} s | {enc_s:.3f} s | {gen_s:.3f} s ({len(tokens)}) | "
              f"{pre_s:.3f} s ({len(prefix)} forced) |")


if __name__ == "__main__":
    main()
