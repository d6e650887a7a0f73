#!/usr/bin/env python
"""VAD recall in context: does the engine detect speech inside a long stream as well as it does fresh?

    .venv/bin/python scripts/vad_recall.py                                  # 200 sequences, config.yaml
    .venv/bin/python scripts/vad_recall.py --n 20 --set vad.threshold=0.4
    .venv/bin/python scripts/vad_recall.py --variant t035=vad.threshold=0.35 --variant webrtc=vad.engine=webrtc

How it measures:
- --n random sequences (fixed --seed), each 20-40 s, of segments drawn at random:
  speech (40 %): a clip of tests/data/speech (manifest, <= 15 s, not the music mixes), gain so its
    active level (RMS over its reference regions, scripts/hard_audio.speech_regions) is -45..-15 dBFS;
    40 % of them mixed with a dcase_noise recording at 0-15 dB SNR (on the active region) over the whole
    segment;
  noise (25 %): a dcase_noise excerpt (looped), 1-4 s, -50..-15 dBFS;
  low noise (20 %): white noise, 1-4 s, -75..-55 dBFS (a microphone's self-noise);
  silence (15 %): digital zeros, 0.5-3 s.
  Every segment is padded to a multiple of 7680 samples (480 ms, a multiple of both Silero's 512 and
  WebRTC's 480-sample frames), so segments start on a frame boundary for either engine.
- In sequence: an engine from pipeline.vad.make_vad_engine(settings.vad), reset at the start of each
  sequence only, fed the whole sequence frame by frame (engine.frame_samples each).
- Reference: the same engine, reset, fed one speech segment alone (the same samples, noise included).
- A frame is detected when speech_prob >= the engine's threshold (settings.vad.threshold if it has none).
  Recall = frames detected inside speech segments in sequence / frames the reference detects there,
  pooled over all segments. "< 50 %" = share of speech segments (those the reference detects at all)
  where the sequence detects less than half of the reference's frames.
- False positives: frames detected inside non-speech segments, per minute of such audio (frames right
  after a speech segment included: a VAD whose probability lags counts them).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hard_audio
import numpy as np
from hard_audio import SPEECH, SR, Audio, Interval

from pipeline.config import Settings
from pipeline.dsp import SILENCE_DBFS

ALIGN = 7680  # samples: lcm(512, 480); every segment is a multiple of it
MAX_CLIP_S = 15.0
SEQ_S = (20.0, 40.0)
KINDS = ("speech", "noise", "low noise", "silence")
KIND_P = (0.40, 0.25, 0.20, 0.15)
SPEECH_DBFS = (-45.0, -15.0)
NOISY_SHARE = 0.4
SNR_DB = (0.0, 15.0)
NOISE_DBFS = (-50.0, -15.0)
LOW_NOISE_DBFS = (-75.0, -55.0)
LEVEL_BANDS = ((-45.0, -35.0), (-35.0, -25.0), (-25.0, -15.0))


@dataclass(frozen=True)
class Clip:
    name: str
    audio: Audio
    regions: list[Interval]


@dataclass(frozen=True)
class Segment:
    kind: str
    start: int  # samples, in the sequence
    audio: Audio
    clip: str = ""
    level_dbfs: float = 0.0  # speech: active level; noise: RMS
    snr_db: float | None = None  # speech mixed with noise
    after: str = "start"  # kind of the previous segment ("start" for the first)

    @property
    def end(self) -> int:
        return self.start + len(self.audio)


@dataclass
class Counts:
    """Frame counts of one variant."""

    seq: list[int]  # per speech segment: frames detected in sequence
    ref: list[int]  # per speech segment: frames detected by the fresh reference
    fp: dict[str, int]  # per non-speech kind: frames detected
    minutes: dict[str, float]  # per non-speech kind: minutes of audio
    seconds: float = 0.0  # wall time of the run


# ------------------------------------------------------------------------------------ audio
def load_clips(max_s: float = MAX_CLIP_S) -> list[Clip]:
    from pipeline.source.file import decode_file

    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t")
                if float(r["duration_s"]) <= max_s and not r["file"].startswith(hard_audio.MUSIC)]
    clips = []
    for r in rows:
        audio = decode_file(SPEECH / r["file"])
        clips.append(Clip(r["file"], audio, hard_audio.speech_regions(audio)))
    return clips


def load_noises() -> list[Audio]:
    from pipeline.source.file import decode_file

    return [decode_file(p) for p in sorted(hard_audio.NOISE_DIR.glob("*.wav"))]


def aligned(n: int, align: int = ALIGN) -> int:
    return max(align, -(-n // align) * align)


def speech_segment(clip: Clip, noises: Sequence[Audio], rng: np.random.Generator) -> tuple[Audio, float, float | None]:
    """(audio, speech active level dBFS, SNR or None) of one speech segment, padded to ALIGN.

    The level is the drawn one less what the peak limiter took off (loud clips with high peaks)."""
    level = float(rng.uniform(*SPEECH_DBFS))
    now = 10 * np.log10(hard_audio.active_power(clip.audio, clip.regions) + 1e-12)
    speech = np.zeros(aligned(len(clip.audio)))
    speech[:len(clip.audio)] = hard_audio.gain_db(clip.audio, level - now)
    snr = float(rng.uniform(*SNR_DB)) if rng.random() < NOISY_SHARE else None
    if snr is not None:
        noise = noises[int(rng.integers(len(noises)))]
        speech = hard_audio.mix_at_snr(speech, clip.regions, noise, snr, margin_s=0.0,
                                       noise_start=int(rng.integers(len(noise))))
    scale = hard_audio.limiter_scale(speech)
    return hard_audio.to_int16(speech), level + 20 * float(np.log10(scale)), snr


def other_segment(kind: str, noises: Sequence[Audio], rng: np.random.Generator) -> tuple[Audio, float]:
    """(audio, RMS dBFS) of a noise, low-noise or silence segment, length a multiple of ALIGN."""
    if kind == "silence":
        return np.zeros(aligned(int(rng.uniform(0.5, 3.0) * SR)), np.int16), SILENCE_DBFS
    n = aligned(int(rng.uniform(1.0, 4.0) * SR))
    if kind == "noise":
        level = float(rng.uniform(*NOISE_DBFS))
        noise = noises[int(rng.integers(len(noises)))]
        bed = hard_audio.loop_to_length(noise, n, int(rng.integers(len(noise))))
    else:
        level = float(rng.uniform(*LOW_NOISE_DBFS))
        bed = rng.standard_normal(n)
    return hard_audio.to_int16(hard_audio.at_level(bed, level)), level


def make_sequence(clips: Sequence[Clip], noises: Sequence[Audio], rng: np.random.Generator) -> list[Segment]:
    """Segments of one sequence (at least one speech segment), 20-40 s."""
    target = rng.uniform(*SEQ_S) * SR
    segments: list[Segment] = []
    pos, prev = 0, "start"
    while pos < target or not any(s.kind == "speech" for s in segments):
        kind = str(rng.choice(KINDS, p=KIND_P)) if pos < target else "speech"
        if kind == "speech":
            clip = clips[int(rng.integers(len(clips)))]
            audio, level, snr = speech_segment(clip, noises, rng)
            seg = Segment(kind, pos, audio, clip.name, level, snr, prev)
        else:
            audio, level = other_segment(kind, noises, rng)
            seg = Segment(kind, pos, audio, level_dbfs=level, after=prev)
        segments.append(seg)
        pos, prev = seg.end, kind
    return segments


# ------------------------------------------------------------------------------------ VAD
def settings_for(config: Path, overrides: Sequence[str]) -> Settings:
    import yaml

    from pipeline.config import load_settings

    values: dict[str, Any] = {}
    for kv in overrides:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"override {kv!r} is not key=value")
        values[key] = yaml.safe_load(value)
    return load_settings(config, overrides=values)


def detected(engine: Any, audio: Audio, threshold: float, reset: bool) -> np.ndarray:
    """Per frame: speech_prob >= threshold, over consecutive engine.frame_samples frames."""
    if reset:
        engine.reset()
    f = engine.frame_samples
    return np.array([engine.speech_prob(audio[i * f:(i + 1) * f]) >= threshold for i in range(len(audio) // f)],
                    dtype=bool)


def frame_slice(seg: Segment, frame: int) -> slice:
    """Frames of the sequence that lie wholly inside the segment."""
    return slice(-(-seg.start // frame), seg.end // frame)


def count(engine: Any, threshold: float, sequences: Sequence[list[Segment]]) -> Counts:
    c = Counts([], [], dict.fromkeys(KINDS[1:], 0), dict.fromkeys(KINDS[1:], 0.0))
    t0 = time.perf_counter()
    f = engine.frame_samples
    for segs in sequences:
        hits = detected(engine, np.concatenate([s.audio for s in segs]), threshold, reset=True)
        for s in segs:
            n = int(hits[frame_slice(s, f)].sum())
            if s.kind == "speech":
                c.seq.append(n)
            else:
                c.fp[s.kind] += n
                c.minutes[s.kind] += len(s.audio) / SR / 60
        for s in segs:  # after the whole sequence: the references reset the engine
            if s.kind == "speech":
                c.ref.append(int(detected(engine, s.audio, threshold, reset=True).sum()))
    c.seconds = time.perf_counter() - t0
    return c


# ------------------------------------------------------------------------------------ report
def recall(seq: Sequence[int], ref: Sequence[int]) -> str:
    total = sum(ref)
    return f"{100 * sum(seq) / total:.1f} %" if total else "–"


def share_below_half(seq: Sequence[int], ref: Sequence[int]) -> str:
    pairs = [(s, r) for s, r in zip(seq, ref, strict=True) if r > 0]
    return f"{100 * sum(s < 0.5 * r for s, r in pairs) / len(pairs):.1f} %" if pairs else "–"


def per_minute(frames: int, minutes: float) -> str:
    return f"{frames / minutes:.2f}" if minutes else "–"


def main_row(label: str, threshold: float, c: Counts, n_seq: int) -> str:
    fp_all = per_minute(sum(c.fp.values()), sum(c.minutes.values()))
    fps = " | ".join(per_minute(c.fp[k], c.minutes[k]) for k in KINDS[1:])
    return (f"| {label} | {threshold:g} | {n_seq} | {len(c.ref)} | {sum(c.ref)} | {recall(c.seq, c.ref)} "
            f"| {share_below_half(c.seq, c.ref)} | {fps} | {fp_all} | {c.seconds:.0f} s |")


MAIN_HEAD = ("| variant | threshold | sequences | speech segments | reference frames | recall in sequence "
             "| segments < 50 % | FP/min noise | FP/min low noise | FP/min silence | FP/min non-speech | time |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|")


def groups(speech: Sequence[Segment]) -> list[tuple[str, list[int]]]:
    """Column name and the indices (into the speech segments) of each breakdown group."""
    out = [("clean", [i for i, s in enumerate(speech) if s.snr_db is None]),
           ("in noise", [i for i, s in enumerate(speech) if s.snr_db is not None])]
    out += [(f"{lo:g}..{hi:g} dBFS", [i for i, s in enumerate(speech) if lo <= s.level_dbfs < hi])
            for lo, hi in LEVEL_BANDS]
    out += [(f"after {k}", [i for i, s in enumerate(speech) if s.after == k]) for k in ("start", *KINDS)]
    return out


def breakdown_table(rows: Sequence[tuple[str, Counts]], speech: Sequence[Segment]) -> str:
    g = groups(speech)
    head = ("| variant | " + " | ".join(f"{name} ({len(idx)})" for name, idx in g) + " |\n|---|"
            + "---|" * len(g))
    lines = [f"| {label} | " + " | ".join(recall([c.seq[i] for i in idx], [c.ref[i] for i in idx]) for _, idx in g)
             + " |" for label, c in rows]
    return head + "\n" + "\n".join(lines)


def parse_variants(base: list[str], variants: Sequence[str], no_default: bool) -> list[tuple[str, list[str]]]:
    out = [] if no_default else [("config" + (" " + ",".join(base) if base else ""), base)]
    for v in variants:
        label, _, rest = v.partition("=")
        out.append((label, base + [kv for kv in rest.split(",") if kv]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of random sequences")
    ap.add_argument("--seed", type=int, default=hard_audio.SEED)
    ap.add_argument("--config", type=Path, default=hard_audio.REPO / "config.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. vad.threshold=0.4 (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=key=value[,key=value]",
                    help="an extra run with these overrides (on top of --set)")
    ap.add_argument("--no-default", action="store_true", help="skip the run without variant overrides")
    args = ap.parse_args()

    from pipeline.vad import make_vad_engine

    rng = np.random.default_rng(args.seed)
    clips, noises = load_clips(), load_noises()
    sequences = [make_sequence(clips, noises, rng) for _ in range(args.n)]
    speech = [s for segs in sequences for s in segs if s.kind == "speech"]
    total_min = sum(len(s.audio) for segs in sequences for s in segs) / SR / 60
    print(f"{args.n} sequences, {total_min:.1f} min, {len(speech)} speech segments from {len(clips)} clips",
          file=sys.stderr)
    rows: list[tuple[str, Counts]] = []
    lines = []
    for label, overrides in parse_variants(args.set, args.variant, args.no_default):
        settings = settings_for(args.config, overrides)
        engine = make_vad_engine(settings.vad)
        threshold = float(getattr(engine, "threshold", settings.vad.threshold))
        print(f"{label}: {settings.vad.engine}, threshold {threshold:g} ...", file=sys.stderr)
        c = count(engine, threshold, sequences)
        rows.append((label, c))
        lines.append(main_row(label, threshold, c, args.n))
    print(MAIN_HEAD + "\n" + "\n".join(lines))
    print("\nRecall in sequence by condition (segments):\n" + breakdown_table(rows, speech))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
