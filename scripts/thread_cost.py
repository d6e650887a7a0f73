"""Encoder and generation time of one greedy decode by compute type and CTranslate2 intra-op threads (issue 24:
whether any thread setting shortens a turn end's decode).

    .venv/bin/python scripts/thread_cost.py int8 1
    .venv/bin/python scripts/thread_cost.py int8 2

The first 15 s of two clean-stream clips, called as WindowDecoder.decode calls `generate` for a greedy decode;
each figure is the best of five.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ctranslate2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.asr.whisper import FasterWhisperEngine  # noqa: E402
from pipeline.asr.whisper.window import pad_features, to_float, window_s  # noqa: E402
from pipeline.config import AsrSettings  # noqa: E402
from pipeline.frames import SAMPLE_RATE  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402

CLIPS = ("2086-149220-0000", "2902-9006-0017")
REPEATS = 5


def main() -> None:
    compute_type, threads = sys.argv[1], int(sys.argv[2])
    engine = FasterWhisperEngine(AsrSettings(compute_type=compute_type, cpu_threads=threads))
    engine.load_sync()
    dec = engine.decoder
    model = dec.model.model
    prompt, suppress = dec.prompts.prompt("en"), dec.prompts.suppressed("en")
    for clip in CLIPS:
        pcm = decode_file(ROOT / "tests/data/speech/clapclap/librispeech_dev_clean" / f"{clip}.flac")
        pcm = pcm[:15 * SAMPLE_RATE]
        feats = pad_features([dec.features(to_float(pcm))], window_s(len(pcm) / SAMPLE_RATE))
        best_enc = best_gen = float("inf")
        n_tokens = 0
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            encoded = model.encode(ctranslate2.StorageView.from_array(feats))
            t1 = time.perf_counter()
            result = model.generate(encoded, [prompt], beam_size=1, max_length=448, suppress_blank=True,
                                    suppress_tokens=suppress, return_scores=True, return_no_speech_prob=True,
                                    return_logits_vocab=True)[0]
            t2 = time.perf_counter()
            best_enc, best_gen = min(best_enc, t1 - t0), min(best_gen, t2 - t1)
            n_tokens = len(result.sequences_ids[0])
        print(f"{compute_type} threads={threads} {clip}: encode {best_enc:.3f} s, generate {best_gen:.3f} s "
              f"({n_tokens} tokens)")


if __name__ == "__main__":
    main()
