"""What decoding with timestamps costs: the relay engine's decode of each clean clip with and without timestamps.

    .venv/bin/python scripts/timestamp_cost.py [--reps 3] [--model PATH]

For each of the 10 LibriSpeech dev-clean clips (the clean bench stream's), the faster-whisper engine's window
ladder (pipeline/asr/whisper/plan.py `window_plan`: short window, fallbacks) decodes the whole clip, once without
timestamps (what the relay does) and once with them, alternately, `--reps` times (interleaved, so a busy shared
machine slows both alike). Prints a table per clip: decode time (median of the repetitions), tokens generated, and
the WER of each (whisper_normalizer, as scripts/bench.py); and the totals. CPU time of single decodes:
run it on a quiet machine for figures to quote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jiwer  # noqa: E402

from pipeline.asr.models import bundled_model_dir  # noqa: E402
from pipeline.asr.whisper import FasterWhisperEngine  # noqa: E402
from pipeline.asr.whisper.plan import window_plan  # noqa: E402
from pipeline.asr.whisper.window import Decode, to_float  # noqa: E402
from pipeline.config import AsrSettings  # noqa: E402
from pipeline.frames import SAMPLE_RATE, Pcm  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402

CLIPS = REPO / "tests" / "data" / "speech" / "clapclap" / "librispeech_dev_clean"


def decode(engine: FasterWhisperEngine, audio: Pcm, timestamps: bool) -> tuple[float, Decode]:
    """One clip through the window ladder; (seconds, the decode that stands)."""
    dec = engine.decoder
    t0 = time.perf_counter()
    samples = to_float(audio)
    plan = window_plan(dec.features(samples), len(samples) / SAMPLE_RATE, engine.settings, timestamps=timestamps)
    request = next(plan)
    while True:
        try:
            request = plan.send(engine.decode_round([request])[0])
        except StopIteration as done:
            return time.perf_counter() - t0, done.value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default=None, help="model name or path (default: the bundled tiny.en)")
    args = ap.parse_args()
    model = args.model or str(bundled_model_dir())
    engine = FasterWhisperEngine(AsrSettings.model_validate({"model": model, "download": False}))
    engine.load_sync()
    clips = sorted(CLIPS.glob("*.flac"))
    times: dict[tuple[str, bool], list[float]] = {}
    last: dict[tuple[str, bool], Decode] = {}
    for rep in range(args.reps):
        for clip in clips:
            audio = decode_file(clip)
            order = (False, True) if rep % 2 == 0 else (True, False)  # alternate which goes first
            for ts in order:
                seconds, d = decode(engine, audio, ts)
                times.setdefault((clip.stem, ts), []).append(seconds)
                last[clip.stem, ts] = d
    print(f"model {model}; {args.reps} repetitions, interleaved; median decode seconds\n")
    from bench_measure import normalizer

    norm = normalizer()
    print("| clip | audio | without timestamps | with timestamps | ratio | tokens without / with "
          "| WER without / with |")
    print("|---|---|---|---|---|---|---|")
    total = {False: 0.0, True: 0.0}
    errors = {False: 0.0, True: 0.0}
    for clip in clips:
        a, b = (statistics.median(times[clip.stem, ts]) for ts in (False, True))
        total[False] += a
        total[True] += b
        da, db = last[clip.stem, False], last[clip.stem, True]
        ref = " ".join(norm(clip.with_suffix(".ref.txt").read_text(encoding="utf-8")).split())
        wa, wb = (float(jiwer.wer(ref, " ".join(norm(x.text).split()) or "-")) for x in (da, db))
        errors[False] += wa
        errors[True] += wb
        print(f"| {clip.stem} | {len(decode_file(clip)) / SAMPLE_RATE:.1f} s | {a:.3f} s | {b:.3f} s | {b / a:.2f} | "
              f"{len(da.tokens)} / {len(db.tokens)} | {100 * wa:.1f} / {100 * wb:.1f} % |")
    n = len(clips)
    print(f"| total | | {total[False]:.3f} s | {total[True]:.3f} s | {total[True] / total[False]:.2f} | | "
          f"{100 * errors[False] / n:.1f} / {100 * errors[True] / n:.1f} % (mean) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
