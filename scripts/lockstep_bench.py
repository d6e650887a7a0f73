#!/usr/bin/env python
"""The endpointer's decisions on the clean stream, with decode time taken out: a check that needs no quiet machine.

    .venv/bin/python scripts/lockstep_bench.py                                   # default config
    .venv/bin/python scripts/lockstep_bench.py --variant "graded only=endpoint.turn_rule=false" \
        --variant "turn_prob 0.7=endpoint.turn_prob=0.7"

The stream is scripts/bench.py's (the 10 LibriSpeech clips joined by 2.5 s of silence), run through the relay in
process with the stream in lockstep with Whisper (tests/test_relay_endpointing.py's LockstepSource: the next
block is handed over only once no decode is in flight), so every speculative decode is in before the pause
goes on, as if Whisper took no time. The outcome depends only on the audio, the model and the endpoint policy.
"Latency" here is the stream time from the true speech end to the echo: the silence the endpointer waited plus
the VAD's lag, without decode time or real-time overheads; splits and WER are counted as scripts/bench.py counts
them. The real figures are scripts/bench.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

import bench  # noqa: E402
from faults import FaultyAsr, RecordingSink, real_engine, relay_settings, run_relay  # noqa: E402
from test_relay_endpointing import CountingAsr, LockstepSource  # noqa: E402

from pipeline.metrics import Metrics  # noqa: E402
from pipeline.source.file import FileSource  # noqa: E402


async def run(stream: Path, overrides: list[str]) -> list[dict[str, object]]:
    import yaml

    metrics = Metrics()
    sink = RecordingSink()
    dotted = {k.replace(".", "__"): yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in overrides)}
    settings = relay_settings(f"file:{stream}", logging__level="warning", **dotted)
    asr = CountingAsr(FaultyAsr(real_engine(), metrics=metrics))
    await run_relay(settings, sink=sink, source=LockstepSource(FileSource(stream, settings.source), asr), asr=asr,
                    metrics=metrics, timeout_s=1800)
    return [o.record() for o in sink.sent]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=key=value[,key=value]")
    ap.add_argument("--no-default", action="store_true")
    args = ap.parse_args()
    variants = [] if args.no_default else [("default config", [])]
    variants += [(v.partition("=")[0], bench.split_overrides(v.partition("=")[2])) for v in args.variant]
    clips = bench.load_clips("librispeech")
    for c, (text, decode_s) in zip(clips, bench.relay_decode([c.audio for c in clips], [c.name for c in clips], []),
                                   strict=True):
        c.offline_text, c.offline_decode_s = text, decode_s
    norm = bench.normalizer()
    print("| variant | p50 | p95 | mean | mid-sentence splits / clip | splits / clip | streamed WER | offline WER |\n"
          "|---|---|---|---|---|---|---|---|")
    per_clip = []
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "stream.wav"
        bench.build_stream(clips, 2.5, stream)
        for label, overrides in variants:
            res = bench.analyse(label, clips, asyncio.run(run(stream, overrides)), norm)
            lat = res.latencies or [float("nan")]
            print(f"| {label} | {bench.pct(lat, 50):.2f} s | {bench.pct(lat, 95):.2f} s | {statistics.mean(lat):.2f} s "
                  f"| {res.mid_splits / len(clips):.2f} | {res.splits / len(clips):.2f} "
                  f"| {100 * statistics.mean(res.wers):.1f} % | {100 * statistics.mean(res.offline_wers):.1f} % |",
                  flush=True)
            per_clip.append(res)
    print("\n| clip | " + " | ".join(r.label for r in per_clip) + " |\n|---|" + "---|" * len(per_clip))
    for i, c in enumerate(clips):
        cells = [f"{r.per_clip[i]['latency_s']} s, {r.per_clip[i].get('splits', '-')} "
                 f"({r.per_clip[i].get('mid_sentence', '-')})" for r in per_clip]
        print(f"| {Path(c.name).stem} | " + " | ".join(cells) + " |")
    print("\n(latency: stream time from the true speech end to the echo, decode time excluded; splits (mid-sentence))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
