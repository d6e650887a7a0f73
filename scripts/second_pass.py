"""What the decoder's second pass recovers, and what it leaves counted (pipeline/asr/coverage.py, issue 25).

    .venv/bin/python scripts/second_pass.py [--pairs 24] [--snr 0,5]

Two-sentence utterances in noise, the case where Whisper decoded without timestamps skips a first sentence: two
LibriSpeech dev-clean clips (2.5-12 s) joined by 0.4 s of silence (inside one utterance), under a dcase_noise
recording at each SNR (scripts/hard_audio.py's mixing, fixed seed). Each mix is cut by the relay's VAD and every
utterance decoded by the faster-whisper engine three ways: the first pass alone (`asr.second_pass: false`), with
the second pass (the default), and, for comparison, every short decode redone in the full 30 s window. Prints, per
way: the mean WER of the mixes, the recall of the first sentence's words, decodes that got a second pass, utterances
and seconds counted as left out, and the decode time of the utterances that got a second pass (CPU time of single
decodes on a shared machine: compare the columns, not the absolute figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "scripts", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import hard_audio  # noqa: E402
import jiwer  # noqa: E402
from bench_measure import normalizer  # noqa: E402

from pipeline.asr.models import bundled_model_dir  # noqa: E402
from pipeline.asr.whisper import FasterWhisperEngine  # noqa: E402
from pipeline.config import AsrSettings, Settings  # noqa: E402
from pipeline.frames import SAMPLE_RATE, UtteranceMeta  # noqa: E402
from pipeline.vad import make_vad_stage  # noqa: E402

PAUSE_S = 0.4
SEED = 7
WAYS = ("first pass only", "second pass (default)", "30 s window when short")


def recall(ref: str, hyp: str) -> float:
    from collections import Counter

    r, h = ref.split(), Counter(hyp.split())
    hit = 0
    for w in r:
        if h[w] > 0:
            h[w] -= 1
            hit += 1
    return hit / len(r) if r else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--snr", default="0,5", help="SNRs in dB, comma-separated")
    ap.add_argument("--model", default=None, help="model name or path (default: the bundled tiny.en)")
    args = ap.parse_args()
    model = args.model or str(bundled_model_dir())
    base = {"model": model, "download": False}
    engines = {WAYS[0]: FasterWhisperEngine(AsrSettings.model_validate({**base, "second_pass": False})),
               WAYS[1]: FasterWhisperEngine(AsrSettings.model_validate(base)),
               WAYS[2]: FasterWhisperEngine(AsrSettings.model_validate({**base, "second_pass": False,
                                                                        "short_window": False}))}
    for e in engines.values():
        e.load_sync()
    norm = normalizer()
    src = hard_audio.load_sources()
    clips = [k for k in sorted(src.clips)
             if k.startswith(hard_audio.LIBRI) and 2.5 < len(src.clips[k]) / SAMPLE_RATE < 12]
    rng = np.random.default_rng(SEED)
    pairs = [(a, b) for a in clips for b in clips if a != b]
    rng.shuffle(pairs)
    stats = {w: {"wer": [], "recall": [], "passes": 0, "counted": 0, "counted_s": 0.0, "time": 0.0} for w in WAYS}
    n_utts = 0
    for a, b in pairs[:args.pairs]:
        clean = np.concatenate([src.clips[a], np.zeros(int(PAUSE_S * SAMPLE_RATE), np.int16), src.clips[b]])
        for snr in (float(x) for x in args.snr.split(",")):
            nk = str(rng.choice(sorted(src.noises)))
            item = hard_audio.speech_item("x", "x", clean, "", noise=src.noises[nk], snr_db=snr,
                                          noise_start=int(rng.integers(len(src.noises[nk]))))
            utts = make_vad_stage(Settings()).segment(item.audio)
            n_utts += len(utts)
            ref = " ".join(norm(src.refs[a] + " " + src.refs[b]).split())
            first = " ".join(norm(src.refs[a]).split())
            texts: dict[str, list[str]] = {w: [] for w in WAYS}
            for u in utts:
                spans = tuple(((x - u.start) / SAMPLE_RATE, (y - u.start) / SAMPLE_RATE) for x, y in u.spans())
                meta = UtteranceMeta(u.id, u.audio_start_s, u.audio_end_s, speech_spans=spans)
                results = {}
                for w, engine in engines.items():
                    if w == WAYS[2] and not results[WAYS[0]].extra.get("uncovered_s"):
                        results[w] = results[WAYS[0]]  # only the decodes that look short are redone
                        continue
                    t0 = time.perf_counter()
                    results[w] = engine.transcribe_sync(u.audio, meta)
                    results[w].extra["clock_s"] = time.perf_counter() - t0
                passed = "second_pass" in results[WAYS[1]].extra
                for w, tr in results.items():
                    texts[w].append("" if tr.dropped_reason else tr.text)
                    st = stats[w]
                    st["passes"] += int(w == WAYS[1] and passed)
                    if tr.extra.get("uncovered_s"):
                        st["counted"] += 1
                        st["counted_s"] += tr.extra["uncovered_s"]
                    if passed:
                        st["time"] += tr.extra.get("clock_s", 0.0)
            for w in WAYS:
                hyp = " ".join(norm(" ".join(texts[w])).split())
                stats[w]["wer"].append(float(jiwer.wer(ref, hyp or "-")))
                stats[w]["recall"].append(recall(first, hyp))
            print(f"{Path(a).stem}+{Path(b).stem} @{snr:g} dB ({nk}): " + ", ".join(
                f"{w.split()[0]} {100 * stats[w]['wer'][-1]:.0f} %" for w in WAYS), file=sys.stderr, flush=True)
    print(f"\n{args.pairs} pairs x SNR {args.snr} dB, {n_utts} utterances; model {model}\n")
    print("| | mean WER | first sentence recall | second passes | counted left out | decode time of those |")
    print("|---|---|---|---|---|---|")
    for w in WAYS:
        st = stats[w]
        print(f"| {w} | {100 * statistics.mean(st['wer']):.1f} % | {100 * statistics.mean(st['recall']):.1f} % | "
              f"{st['passes'] or '-'} | {st['counted']} ({st['counted_s']:.1f} s) | {st['time']:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
