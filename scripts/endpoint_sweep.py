#!/usr/bin/env python
"""Collect what the endpointer sees at every pause, then sweep endpoint rules on a simulated clock.

    .venv/bin/python scripts/endpoint_sweep.py                  # 10 LibriSpeech clips
    .venv/bin/python scripts/endpoint_sweep.py --set all

For each clip, the relay's own VAD stage runs over the clip followed by 2.5 s of silence. At every
pause that reaches `endpoint.speculative_ms`, the audio so far is decoded with the relay's ASR engine
(as the relay does), and the pause's length (until speech resumes, or the end) is recorded together
with the transcript's final character and `final_punct_prob`. A pause is a *true* sentence end
when it is the clip's last pause, or the offline whole-clip transcript has . ? ! at that word.

The sweep then replays each rule "finish once the pause reaches T(text, p)" over those pauses:
  latency = pause start + max(T, speculative_ms + decode time) - true speech end
and counts mid-sentence splits. This is the same arithmetic as the relay's, without its real-time
overheads; `scripts/bench.py` measures the real thing.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_measure import SENTENCE_END, load_clips, normalizer  # noqa: E402

from pipeline.asr import make_asr_engine  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.frames import SAMPLE_RATE as SR  # noqa: E402
from pipeline.frames import AudioFrame, UtteranceMeta  # noqa: E402
from pipeline.metrics import Metrics  # noqa: E402
from pipeline.vad import SpeechPaused, SpeechResumed, UtteranceEnded, make_vad_stage  # noqa: E402


@dataclass
class Pause:
    clip: str
    start_s: float  # VAD speech end (clip time)
    length_s: float  # silence until speech resumed (or the end)
    text: str
    p: float | None
    decode_s: float
    true_end: bool  # a real sentence end (per the offline transcript) or the clip's end
    last: bool  # the clip's final pause
    clip_end_s: float  # true speech end of the clip


def is_sentence_end(prefix_text: str, offline: str, norm) -> bool:  # type: ignore[no-untyped-def]
    off_words = offline.split()
    a = [norm(w) for w in prefix_text.split()]
    b = [norm(w) for w in off_words]
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    mapping = {i + k: j + k for i, j, n in sm.get_matching_blocks() for k in range(n)}
    j = next((mapping[i] for i in range(len(a) - 1, -1, -1) if i in mapping), None)
    return j is not None and bool(SENTENCE_END.search(off_words[j]))


async def collect(which: str, overrides: dict[str, object]) -> list[Pause]:
    settings = load_settings(REPO / "config.yaml", overrides={"endpoint.enabled": True, **overrides})
    engine = make_asr_engine(settings.asr, Metrics())
    await engine.load()
    norm = normalizer()
    clips = load_clips(which)
    pauses: list[Pause] = []
    for c in clips:
        tr = await engine.transcribe(c.audio, UtteranceMeta(c.name, 0, 0))
        offline = tr.text
        audio = np.concatenate([c.audio, np.zeros(int(2.5 * SR), np.int16)])
        vad = make_vad_stage(settings)
        block = SR // 50
        open_pause: Pause | None = None
        mine: list[Pause] = []
        for i in range(0, len(audio), block):
            for ev in vad.process(AudioFrame(audio[i:i + block], i)):
                if isinstance(ev, SpeechPaused):
                    t = await engine.transcribe(ev.snapshot.audio, UtteranceMeta(ev.utterance_id, 0, 0))
                    open_pause = Pause(c.name, ev.snapshot.speech_end / SR, 0.0, t.text, t.final_punct_prob,
                                       t.decode_s, False, False, c.speech_end_s)
                    mine.append(open_pause)
                elif isinstance(ev, SpeechResumed | UtteranceEnded) and open_pause is not None:
                    end = ev.pos if isinstance(ev, SpeechResumed) else len(audio)
                    open_pause.length_s = end / SR - open_pause.start_s
                    open_pause = None
        if open_pause is not None:
            open_pause.length_s = len(audio) / SR - open_pause.start_s
        # Text decoded at a pause covers the whole utterance so far; splits reset it, so use the
        # concatenation of the previous finished pieces is not needed: mid-sentence is judged on the
        # last word, located in the offline transcript.
        for k, p in enumerate(mine):
            p.last = bool(p.start_s >= c.speech_end_s - 0.35 and k == len(mine) - 1)
            p.true_end = p.last or is_sentence_end(p.text, offline, norm)
        pauses += mine
    await engine.close()
    return pauses


def simulate(pauses: list[Pause], rule, spec_s: float) -> tuple[list[float], int, int]:  # type: ignore[no-untyped-def]
    """Return (latencies of clip ends, mid-sentence splits, clips)."""
    lat: list[float] = []
    mid = 0
    clips = {p.clip for p in pauses}
    for p in pauses:
        need = rule(p.text, p.p)
        ready = max(need, spec_s + p.decode_s)
        if p.length_s >= ready and not p.last:
            mid += 0 if p.true_end else 1  # finishing at a pause that is not the end = a split
        if p.last:
            lat.append(p.start_s + ready - p.clip_end_s)
    return lat, mid, len(clips)


def make_rule(conf_p: float, conf_ms: int, likely_p: float, likely_ms: int, hang_ms: int):  # type: ignore[no-untyped-def]
    def rule(text: str, p: float | None) -> float:
        if text.rstrip().endswith((".", "?", "!")) and p is not None:
            if p >= conf_p:
                return conf_ms / 1000
            if p >= likely_p:
                return likely_ms / 1000
        return hang_ms / 1000
    return rule


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["librispeech", "all"], default="librispeech")
    ap.add_argument("--vad", default=None, help="vad.engine override (webrtc | silero)")
    ap.add_argument("--cache", type=Path, help="save the collected pauses here, or load them if it exists")
    args = ap.parse_args()
    overrides: dict[str, object] = {"vad.engine": args.vad} if args.vad else {}
    if args.cache and args.cache.exists():
        pauses = [Pause(**d) for d in json.loads(args.cache.read_text())]
    else:
        pauses = asyncio.run(collect(args.set, overrides))
        if args.cache:
            args.cache.write_text(json.dumps([asdict(p) for p in pauses]))
    print("clip                pause@   len    p      end?  text tail")
    for p in pauses:
        pp = f"{p.p:.2f}" if p.p is not None else "  - "
        print(f"{Path(p.clip).stem:<18} {p.start_s:6.2f} {p.length_s:5.2f}  {pp}  {'END ' if p.true_end else 'mid '}"
              f"{'last' if p.last else '    '} …{p.text[-40:]}")
    spec_s = 0.15
    rows = []
    for conf_p, conf_ms, likely_p, likely_ms, hang_ms in itertools.product(
            (0.7, 0.8, 0.85, 0.9, 0.95), (150, 200, 250, 300), (0.3, 0.5, 0.6, 0.7),
            (350, 400, 450, 500, 550, 600, 650), (600, 700, 800, 1000)):
        if likely_p >= conf_p or likely_ms <= conf_ms or hang_ms <= likely_ms:
            continue
        lat, mid, n = simulate(pauses, make_rule(conf_p, conf_ms, likely_p, likely_ms, hang_ms), spec_s)
        s = sorted(lat)
        p50 = s[int(np.ceil(0.5 * len(s))) - 1]
        p95 = s[int(np.ceil(0.95 * len(s))) - 1]
        rows.append((mid / n, p95, p50, conf_p, conf_ms, likely_p, likely_ms, hang_ms))
    rows.sort(key=lambda r: (r[0] > 0.2, r[1] > 0.8, r[2], r[1], r[0]))
    print("\nmid/utt  p95    p50    rule (confident p, pause ms; likely p, pause ms; hangover ms)")
    for r in rows[:25]:
        print(f"{r[0]:.2f}     {r[1]:.2f}   {r[2]:.2f}   p>={r[3]} {r[4]}ms; p>={r[5]} {r[6]}ms; {r[7]}ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
