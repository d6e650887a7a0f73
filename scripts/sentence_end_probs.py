#!/usr/bin/env python
"""Does Whisper's final-punctuation probability tell a clip's end from a mid-clip cut, in every language?

    .venv/bin/python scripts/sentence_end_probs.py            # base (language auto) on the multilingual clips
    .venv/bin/python scripts/sentence_end_probs.py --english  # also tiny.en and base on 10 LibriSpeech clips

Each clip is decoded whole (it ends a sentence) and cut at 45 % and 70 % of its length (mid-sentence: the clips
are one or two sentences). For every decode that ends in a sentence mark both measures of
pipeline/asr/whisper/sentence_ends.py are printed: `token` (the probability of the written mark's tokens) and
`mass` (the probability that a sentence ends there, over every sentence-end token). The summary counts, per
measure, the ends and cuts at or above endpoint.likely_prob / confident_prob: a useful measure puts clip ends
above and cuts below. Accuracy figures only (no timing); about two minutes of CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from asr_fixtures import base_settings, load_clip, meta_for, tiny_settings  # noqa: E402
from conftest import ml_clips, ml_row  # noqa: E402

from pipeline.asr.whisper import FasterWhisperEngine  # noqa: E402
from pipeline.asr.whisper import sentence_ends as se  # noqa: E402
from pipeline.config import EndpointSettings  # noqa: E402

CUTS = (0.45, 0.70)
LIBRISPEECH = sorted(str(p.relative_to(REPO / "tests/data/speech"))
                     for p in (REPO / "tests/data/speech/clapclap/librispeech_dev_clean").glob("*.flac"))

_seen: dict[str, float | None] = {}
_original = se.SentenceEndTokens.final_mark_prob


def _both(self: se.SentenceEndTokens, tokens: Any, logits: Any, first: int, last: int,
          mode: se.PunctMode = "mass") -> float | None:
    """Records both measures of each decode; returns the one the engine asked for."""
    _seen["token"] = _original(self, tokens, logits, first, last, "token")
    _seen["mass"] = _original(self, tokens, logits, first, last, "mass")
    return _seen[mode]


def run(engine: FasterWhisperEngine, clips: list[tuple[str, str]]) -> list[tuple[str, str, str, Any, Any]]:
    rows = []
    for lang, clip in clips:
        full = load_clip(clip)
        for frac in (1.0, *CUTS):
            pcm = full[: int(len(full) * frac)]
            _seen.clear()
            tr = engine.transcribe_sync(pcm, meta_for(pcm))
            kind = "end" if frac == 1.0 else "cut"
            rows.append((lang, kind, tr.text, _seen.get("token"), _seen.get("mass")))
            tp, mp = _seen.get("token"), _seen.get("mass")
            print(f"{lang:3} {kind} token={_fmt(tp)} mass={_fmt(mp)}  ...{tr.text[-40:]!r}  {clip.split('/')[-1]}",
                  flush=True)
    return rows


def _fmt(p: float | None) -> str:
    return "  -  " if p is None else f"{p:.3f}"


def summary(title: str, rows: list[tuple[str, str, str, Any, Any]]) -> None:
    ep = EndpointSettings()
    print(f"\n{title}: decodes ending a sentence mark, and those at/above likely {ep.likely_prob} / confident "
          f"{ep.confident_prob}")
    print("| measure | kind | decodes | with a mark | >= likely | >= confident |")
    print("|---|---|---|---|---|---|")
    for measure, col in (("token", 3), ("mass", 4)):
        for kind in ("end", "cut"):
            sel = [r for r in rows if r[1] == kind]
            ps = [r[col] for r in sel if r[col] is not None]
            print(f"| {measure} | {kind} | {len(sel)} | {len(ps)} | {sum(p >= ep.likely_prob for p in ps)} | "
                  f"{sum(p >= ep.confident_prob for p in ps)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--english", action="store_true", help="also tiny.en and base on LibriSpeech")
    args = ap.parse_args()
    se.SentenceEndTokens.final_mark_prob = _both  # type: ignore[method-assign]
    base = FasterWhisperEngine(base_settings())
    base.load_sync()
    multi = [(ml_row(c)["language"], c) for c in ml_clips()]
    results = {"base, multilingual clips": run(base, multi)}
    if args.english:
        results["base, LibriSpeech"] = run(base, [("en", c) for c in LIBRISPEECH])
        tiny = FasterWhisperEngine(tiny_settings())
        tiny.load_sync()
        results["tiny.en, LibriSpeech"] = run(tiny, [("en", c) for c in LIBRISPEECH])
    for title, rows in results.items():
        summary(title, rows)


if __name__ == "__main__":
    main()
