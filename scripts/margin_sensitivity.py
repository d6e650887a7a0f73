"""How far the multilingual benchmark's offline reference moves when only the silence around a clip's speech
changes (issue 23's target "streamed at most offline + 2 points" on streams of 1-3 clips per language).

    .venv/bin/python scripts/margin_sensitivity.py                      # base, every language of the set
    .venv/bin/python scripts/margin_sensitivity.py --languages es,pt --model base

Each clip of tests/data/speech/multilingual is decoded offline exactly as scripts/bench.py's offline pass does
(the relay's own engine, language given, one whole-audio transcribe) several times: the whole clip, then the clip
cut to its speech (pipeline.dsp.speech_bounds, the benchmark's own speech bounds) plus MARGINS_S seconds of the
clip's own audio before and after. No word is added or removed, only silence (or the clip's room tone). Scored
with scripts/lang_scoring.py (WER, CER for ja/zh) as the benchmark scores. The per-language mean of each cut,
and its spread (highest minus lowest mean), is the resolution of a streamed-vs-offline comparison on that set:
the relay's utterance audio is the VAD's cut, whose margins differ from the whole clip's by a few tenths of a
second.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import multilingual_audio as mla  # noqa: E402
from lang_scoring import error_rate, metric  # noqa: E402

from pipeline.asr import make_asr_engine  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.dsp import speech_bounds  # noqa: E402
from pipeline.frames import SAMPLE_RATE, UtteranceMeta  # noqa: E402
from pipeline.metrics import Metrics  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402

MARGINS_S = (0.1, 0.2, 0.3, 0.5)  # silence kept each side of the speech; the relay's cut is in this range


async def language_rows(model: str, language: str) -> tuple[list[str], list[float]]:
    """Markdown rows of each clip (error per cut) and the language's mean error per cut (whole clip first)."""
    settings = load_settings(None, {"asr.model": model, "asr.language": language}, env={})
    engine = make_asr_engine(settings.asr, Metrics())
    await engine.load()
    errors: list[list[float]] = []
    rows = []
    try:
        for clip in mla.clips_of(language):
            audio = decode_file(mla.SPEECH / clip.name)
            start, end = speech_bounds(audio)
            cuts = [audio] + [audio[max(0, int((start - m) * SAMPLE_RATE)):int((end + m) * SAMPLE_RATE)]
                              for m in MARGINS_S]
            clip_errors = []
            for cut in cuts:
                tr = await engine.transcribe(cut, UtteranceMeta(clip.name, 0.0, len(cut) / SAMPLE_RATE))
                clip_errors.append(error_rate(language, clip.ref, tr.text))
            errors.append(clip_errors)
            rows.append(f"| {clip.name.removeprefix('multilingual/')} | {language} | "
                        + " | ".join(f"{100 * e:.1f} %" for e in clip_errors) + " |")
    finally:
        await engine.close()
    means = [statistics.mean(col) for col in zip(*errors, strict=True)]
    return rows, means


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--languages", default="", help="comma-separated codes (default: every language of the set)")
    args = ap.parse_args()
    langs = [x for x in args.languages.split(",") if x] or mla.languages()
    cuts = ["whole clip", *(f"speech ± {m} s" for m in MARGINS_S)]
    clip_rows: list[str] = []
    summary = []
    for lang in langs:
        rows, means = asyncio.run(language_rows(args.model, lang))
        clip_rows += rows
        pct = [100 * m for m in means]
        summary.append(f"| {lang} | {metric(lang)} | " + " | ".join(f"{v:.1f} %" for v in pct)
                       + f" | {min(pct):.1f}-{max(pct):.1f} % | {max(pct) - min(pct):.1f} |")
    print(f"model {args.model}, language given, offline (one transcribe of each cut)\n")
    print("| language | scored by | " + " | ".join(cuts) + " | range | spread (points) |")
    print("|---|---|" + "---|" * (len(cuts) + 2))
    print("\n".join(summary))
    print("\n| clip | language | " + " | ".join(cuts) + " |")
    print("|---|---|" + "---|" * len(cuts))
    print("\n".join(clip_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
