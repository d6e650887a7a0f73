#!/usr/bin/env python
"""WER of `echo-relay transcribe` (the relay's VAD + ASR) on every clip, against the same model on the whole file.

    .venv/bin/python scripts/wer_table.py [--config config.yaml]

Both sides are normalized with Whisper's English normalizer. For the mfa/ clips, whose references are
verbatim, the WER is also given without fillers (um, uh, er, ah, hmm, yknow) and annotation tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEECH = REPO / "tests" / "data" / "speech"
sys.path.insert(0, str(REPO))

from pipeline.asr import make_asr_engine  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.frames import UtteranceMeta  # noqa: E402
from pipeline.metrics import Metrics  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402

FILLERS = {"um", "uh", "er", "ah", "hmm", "yknow", "erm"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml")
    args = ap.parse_args()
    import jiwer
    from bench_measure import normalizer
    norm = normalizer()

    def wer(ref: str, hyp: str, drop_fillers: bool = False) -> float:
        ref = re.sub(r"<[^>]*>|\[[^\]]*\]", " ", ref)
        r, h = norm(ref).split(), norm(hyp).split()
        if drop_fillers:
            r = [w for w in r if w not in FILLERS]
            h = [w for w in h if w not in FILLERS]
        return float(jiwer.wer(" ".join(r), " ".join(h))) if r else float(bool(h))

    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    files = [str(SPEECH / r["file"]) for r in rows]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "transcribe", "--json", "--config", str(args.config),
                           *files], cwd=REPO, capture_output=True, text=True, check=True)
    streamed = [json.loads(line)["text"] for line in proc.stdout.splitlines()]

    settings = load_settings(args.config)

    async def offline() -> list[str]:
        engine = make_asr_engine(settings.asr, Metrics())
        await engine.load()
        out = []
        for f in files:
            audio = decode_file(f)
            out.append((await engine.transcribe(audio, UtteranceMeta(f, 0.0, len(audio) / 16000))).text)
        await engine.close()
        return out
    whole = asyncio.run(offline())

    print(f"model {settings.asr.model} {settings.asr.compute_type}, beam {settings.asr.beam_size}, "
          f"VAD {settings.vad.engine}\n")
    print("| clip | transcribe WER | whole-file WER | without fillers (transcribe / whole) |\n|---|---|---|---|")
    ws, wo = [], []
    for r, s, w in zip(rows, streamed, whole, strict=True):
        a, b = wer(r["reference_transcript"], s), wer(r["reference_transcript"], w)
        ws.append(a)
        wo.append(b)
        extra = ""
        if r["file"].startswith("mfa/"):
            extra = (f"{100 * wer(r['reference_transcript'], s, True):.1f} % / "
                     f"{100 * wer(r['reference_transcript'], w, True):.1f} %")
        print(f"| {r['file']} | {100 * a:.1f} % | {100 * b:.1f} % | {extra} |")
    print(f"| **mean of {len(rows)} clips** | **{100 * statistics.mean(ws):.1f} %** | "
          f"**{100 * statistics.mean(wo):.1f} %** | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
