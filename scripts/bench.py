#!/usr/bin/env python
"""End-of-speech latency, WER, splits, CPU and memory of `echo-relay run` on real speech.

    .venv/bin/python scripts/bench.py                       # default config, 10 LibriSpeech clips
    .venv/bin/python scripts/bench.py --set all             # every clip in tests/data/speech
    .venv/bin/python scripts/bench.py --variant plain=endpoint.enabled=false --write BENCHMARKS.md
    .venv/bin/python scripts/bench.py --stream hard             # noise, music, whisper, level jumps (~25 min)
    .venv/bin/python scripts/bench.py --stream both --long-minutes 0 --speed 0   # quick functional check
    .venv/bin/python scripts/bench.py --stream multilingual     # base, auto language, 11 languages + mixed (~10 min)
    .venv/bin/python scripts/bench.py --stream all --cpu --models base:en,base:auto   # all of issue 23

How it measures (nothing here trusts the relay's own VAD):
- The stream is the clips joined by --gap seconds of digital silence. Each clip's true speech end is
  taken from its own energy envelope (pipeline.dsp.speech_bounds: the two-threshold endpoint rule).
- The stream is replayed in real time through `echo-relay run --sink jsonl:...` in a subprocess,
  exactly as a user runs it. Latency of a clip = `emitted_at_s` of the clip's last echo minus the
  true speech end (both on the stream clock).
- WER: the clip's echoes joined, against the reference, both normalized with Whisper's English
  normalizer. The offline ceiling is the same model, beam and window decoding the whole clip.
- A split (one clip sent as several echoes) is mid-sentence when the offline transcript has no
  . ? ! at the word where it falls (words aligned with difflib).
- CPU: process CPU seconds over 30 s of silence after start-up; peak RSS from /proc VmHWM.

--stream hard replays a second, harder stream (built and analysed by scripts/hard_audio.py, whose
docstring gives the method): speech in noise at 0/5/10 dB SNR, music, spontaneous and whispered
speech, loud-then-quiet speakers, noise-only stretches and a long session (--long-minutes). It reports
per category streamed vs offline WER, missed items, seconds of speech no echo covers, hallucinated
echoes and latency, plus the lines of the relay's log that report lost or unheard speech.

--models NAME[:LANGUAGE],...: a model ladder in the same run, each model replayed like the default config
with asr.model=NAME (and asr.language=LANGUAGE; `auto` = null, detect). The offline ceiling (WER, and the
transcript the splits are judged on) is decoded per ASR configuration: each model against its own offline
decode; the table also gives the streamed text's WER against that decode itself.

--stream multilingual replays one stream per language of tests/data/speech/multilingual and a mixed one
(a speaker changing language between turns) with --ml-model (base) and auto language (built and
analysed by scripts/multilingual_audio.py, whose docstring gives the method): WER/CER streamed vs the
offline whole-clip decode with the language given, latency, utterances in the wrong language and time
to lock. --stream all runs clean, hard and multilingual; the issue-23 targets are printed at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import hard_audio
import multilingual_audio
import numpy as np
import relay_events
from bench_measure import (
    REPO,
    SR,
    Clip,
    Result,
    analyse,
    load_clips,
    normalizer,
    read_hwm,
    wer,
    write_overrides,
)
from hard_audio import pct

# The checkout's package: bench_measure puts the checkout first on sys.path.
from pipeline.config import AsrSettings, Settings
from pipeline.dsp import wav_bytes
from pipeline.source.file import decode_file


def build_stream(clips: list[Clip], gap_s: float, path: Path) -> None:
    gap = np.zeros(int(gap_s * SR), np.int16)
    parts = [gap]
    pos = len(gap)
    for c in clips:
        c.offset_s = pos / SR
        parts += [c.audio, gap]
        pos += len(c.audio) + len(gap)
    write_wav(path, np.concatenate(parts))


def write_wav(path: Path, audio: np.ndarray) -> None:
    path.write_bytes(wav_bytes(audio, SR))


def bench_settings(settings_overrides: list[str]) -> Settings:
    """The settings a run with these key=value overrides gets: the config file write_overrides writes for
    it, loaded as the relay loads it (so `vad.weak_prob=null` is None, as in the run)."""
    from pipeline.config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        write_overrides(path, settings_overrides)
        return load_settings(path)


def asr_margins(settings_overrides: list[str]) -> tuple[float, float]:
    """Audio the ASR gets around an utterance's speech bounds: (vad.pre_roll_ms, vad.speech_pad_ms) in s."""
    vad = bench_settings(settings_overrides).vad
    return vad.pre_roll_ms / 1000, vad.speech_pad_ms / 1000


def offline_asr_settings(settings_overrides: list[str]) -> AsrSettings:
    """The relay's ASR settings with the hallucination gate disabled (the offline ceiling keeps all text)."""
    settings = bench_settings(settings_overrides)
    gate_off = settings.asr.gate.model_copy(update={"min_avg_logprob": -100.0, "no_speech_prob": 1.0})
    return settings.asr.model_copy(update={"gate": gate_off})


def relay_decode(audios: list[np.ndarray], names: list[str], settings_overrides: list[str]) -> list[tuple[str, float]]:
    """(text, decode seconds) of the relay's own ASR engine on each whole audio, gate disabled."""
    import asyncio

    from pipeline.asr import make_asr_engine
    from pipeline.frames import UtteranceMeta
    from pipeline.metrics import Metrics

    asr_settings = offline_asr_settings(settings_overrides)

    async def run() -> list[tuple[str, float]]:
        engine = make_asr_engine(asr_settings, Metrics())
        await engine.load()
        out = []
        for name, audio in zip(names, audios, strict=True):
            tr = await engine.transcribe(audio, UtteranceMeta(name, 0.0, len(audio) / SR))
            out.append((tr.text, tr.decode_s))
        await engine.close()
        return out
    return asyncio.run(run())


def raw_decode_times(audios: list[np.ndarray], settings_overrides: list[str]) -> list[float]:
    """Seconds plain faster-whisper (its defaults: beam 5, 30 s window) takes on each audio."""
    from faster_whisper import WhisperModel

    from pipeline.asr.models import load_files, resolve_model

    asr_settings = offline_asr_settings(settings_overrides)
    location = resolve_model(asr_settings.model, asr_settings.models_dir)
    raw = WhisperModel(str(location.path), device="cpu", compute_type=asr_settings.compute_type,
                       cpu_threads=asr_settings.cpu_threads, files=load_files(location))  # a packaged model's parts
    list(raw.transcribe(np.zeros(SR, np.float32))[0])  # warm-up
    times = []
    for audio in audios:
        t0 = time.perf_counter()
        list(raw.transcribe(audio.astype(np.float32) / 32768, language=asr_settings.language)[0])
        times.append(time.perf_counter() - t0)
    return times


def offline_pass(clips: list[Clip], settings_overrides: list[str]) -> None:
    """The accuracy ceiling: the relay's own ASR engine on each whole clip, plus raw faster-whisper."""
    audios = [c.audio for c in clips]
    for c, (text, decode_s) in zip(clips, relay_decode(audios, [c.name for c in clips], settings_overrides),
                                   strict=True):
        c.offline_text, c.offline_decode_s = text, decode_s
    for c, raw_s in zip(clips, raw_decode_times(audios, settings_overrides), strict=True):
        c.raw_fw_s = raw_s


def run_relay(stream: Path, out: Path, overrides: list[str], speed: float, log: Path,
              control_port: int | None = None) -> tuple[float, int]:
    """Replay the stream through `echo-relay run`; return (peak RSS MB, exit status). The control API is off
    unless `control_port` is given (scripts/relay_events.py follows the event stream on it).

    Faster than real time the ASR queue grows, so the shutdown drain (sink.drain_timeout_s) is
    lengthened unless the overrides set it: otherwise the backlog would be dropped as undeliverable."""
    cfg = out.with_suffix(".yaml")
    drain = [] if speed == 1.0 or any(kv.startswith("sink.drain_timeout_s=") for kv in overrides) \
        else ["sink.drain_timeout_s=3600"]
    write_overrides(cfg, drain + overrides)
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(cfg), "--source", f"file:{stream}",
           "--sink", f"jsonl:{out}", "--speed", str(speed),
           *(["--no-control"] if control_port is None else ["--control-port", str(control_port)])]
    with log.open("w") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=lf, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, read_hwm(proc.pid))
            time.sleep(0.2)
    return peak, proc.returncode


def cpu_during_silence(overrides: list[str], workdir: Path, seconds: float = 30.0,
                       noise_dbfs: float | None = None) -> float:
    """Process CPU (% of one core) over `seconds` of digital silence, or of white noise at `noise_dbfs`
    (a room's noise floor: the VAD classifies every frame of it)."""
    silence = workdir / "silence.wav"
    n = int((seconds + 15) * SR)
    if noise_dbfs is None:
        write_wav(silence, np.zeros(n, np.int16))
    else:
        noise = np.random.default_rng(0).standard_normal(n) * 32768 * 10 ** (noise_dbfs / 20)
        write_wav(silence, np.clip(noise, -32768, 32767).astype(np.int16))
    cfg = workdir / "silence.yaml"
    write_overrides(cfg, overrides)
    import psutil
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(cfg), "--source", f"file:{silence}",
           "--sink", f"jsonl:{workdir / 'silence.jsonl'}", "--no-control"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = psutil.Process(proc.pid)
    time.sleep(10.0)  # start-up (model load, warm-up) is not "silence"
    c0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    c1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
    proc.terminate()
    proc.wait(30)
    return 100.0 * (c1 - c0) / (t1 - t0)


def table(results: list[Result], n_clips: int) -> str:
    head = ("| variant | p50 | p95 | max | mid-sentence splits / utt | splits / utt | streamed WER | offline WER "
            "| missing | CPU in silence | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        lat = r.latencies or [float("nan")]
        cpu = f"{r.cpu_silence_pct:.2f} %" if r.cpu_silence_pct is not None else "–"
        rows.append(f"| {r.label} | {pct(lat, 50):.2f} s | {pct(lat, 95):.2f} s | {max(lat):.2f} s "
                    f"| {r.mid_splits / n_clips:.2f} | {r.splits / n_clips:.2f} "
                    f"| {100 * statistics.mean(r.wers):.1f} % | {100 * statistics.mean(r.offline_wers):.1f} % "
                    f"| {r.missing} | {cpu} | {r.peak_rss_mb:.0f} MB |")
    return head + "\n" + "\n".join(rows)


def clip_table(r: Result) -> str:
    head = ("| clip | echoes | latency | splits (mid-sentence) | WER | offline WER | decode (relay engine, whole clip) "
            "| raw faster-whisper decode |\n|---|---|---|---|---|---|---|---|")
    rows = [f"| {c['clip']} | {c['echoes']} | {c['latency_s']} s "
            f"| {c.get('splits', '–')} ({c.get('mid_sentence', '–')}) "
            f"| {100 * float(c['wer']):.1f} % | {100 * float(c['offline_wer']):.1f} % | {c['decode_s']} s "  # type: ignore[arg-type]
            f"| {c['raw_fw_s']} s |" for c in r.per_clip]
    return head + "\n" + "\n".join(rows)


def model_available(name: str) -> bool:
    from pipeline.asr.base import AsrError
    from pipeline.asr.models import resolve_model
    try:
        resolve_model(name, REPO / "models", download=False)
    except AsrError:
        return False
    return True


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ctranslate2
    import faster_whisper
    return (f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.machine()}, Python "
            f"{platform.python_version()}, faster-whisper {faster_whisper.__version__}, "
            f"CTranslate2 {ctranslate2.__version__}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", choices=["clean", "hard", "both", "multilingual", "all"], default="clean",
                    help="clean: the --set clips joined by silence; hard: scripts/hard_audio.py's stream; both; "
                         "multilingual: scripts/multilingual_audio.py's streams; all: the three")
    ap.add_argument("--set", choices=["librispeech", "all"], default="librispeech")
    ap.add_argument("--gap", type=float, default=2.5, help="silence between clips, s")
    ap.add_argument("--long-minutes", type=float, default=10.0,
                    help="length of the hard stream's long session, minutes (0 = none)")
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time; latency needs 1)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=key=value[,key=value]",
                    help="extra runs with config overrides, e.g. plain=endpoint.enabled=false")
    ap.add_argument("--no-default", action="store_true", help="skip the default-config run")
    ap.add_argument("--cpu", action="store_true",
                    help="also measure CPU during 30 s of silence (+45 s); reported with the clean stream only")
    ap.add_argument("--models", default="base.en,small.en,distil-small.en",
                    help="other models to run with the default config when they are available locally: "
                         "NAME[:LANGUAGE] (a code, or auto = detect), e.g. base:en,base:auto")
    ap.add_argument("--ml-model", default="base", help="--stream multilingual: the model (asr.language: null)")
    ap.add_argument("--ml-languages", default="",
                    help="--stream multilingual: single-language streams of these languages (default: every "
                         "language of tests/data/speech/multilingual; '-' = none)")
    ap.add_argument("--ml-mix", default="es,en",
                    help="--stream multilingual: the two languages of the mixed stream, turn by turn ('' = none; "
                         "en = the LibriSpeech clips)")
    ap.add_argument("--ml-set", default="", metavar="key=value[,key=value]",
                    help="--stream multilingual: config overrides on top of the model and auto language, "
                         "e.g. asr.languages=[es,en]")
    ap.add_argument("--relays", metavar="N[,N...]",
                    help="instead: N relays replaying the clean stream in one `echo-relay serve` against N "
                         "`echo-relay run` processes (scripts/bench_relays.py), e.g. 1,2,4,8,16")
    ap.add_argument("--relay-modes", default="sync,staggered", help="--relays start patterns: sync, staggered")
    ap.add_argument("--relay-processes", default="1,4,8",
                    help="--relays: the N for which separate run processes are measured too ('' = none)")
    ap.add_argument("--stagger-s", type=float, default=20.0, help="--relays staggered: offsets in [0, this) s")
    ap.add_argument("--write", type=Path, help="write the report (markdown) to this file")
    ap.add_argument("--keep", type=Path, help="keep the stream, configs and jsonl here")
    return ap.parse_args()


def split_overrides(text: str) -> list[str]:
    """"a=1,b=[{x: 1}, {x: 2}]" -> ["a=1", "b=[{x: 1}, {x: 2}]"]: commas inside YAML brackets stay with
    their value (perception.analyzers=[{analyzer: loudness}, {analyzer: pitch}])."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def variant_list(args: argparse.Namespace) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(label, overrides) of every run, and the --models that have no local copy."""
    variants: list[tuple[str, list[str]]] = [] if args.no_default else [("default config", [])]
    for v in args.variant:
        label, _, rest = v.partition("=")
        variants.append((label, split_overrides(rest)))
    unavailable: list[str] = []
    for spec in [m for m in args.models.split(",") if m]:
        name, label, overrides = model_variant(spec)
        if model_available(name):
            variants.append((label, overrides))
        else:
            unavailable.append(name)
            print(f"model {name}: not available offline (echo-relay models pull {name}); skipped", file=sys.stderr)
    return variants, unavailable


def model_variant(spec: str) -> tuple[str, str, list[str]]:
    """"base:auto" -> ("base", "model base (auto language)", ["asr.model=base", "asr.language=null"])."""
    name, _, language = spec.partition(":")
    if not language:
        return name, f"model {name}", [f"asr.model={name}"]
    if language == "auto":
        return name, f"model {name} (auto language)", [f"asr.model={name}", "asr.language=null"]
    return name, f"model {name} (language {language})", [f"asr.model={name}", f"asr.language={language}"]


def decode_lost(asr_overrides: list[str], audios: list[np.ndarray]) -> list[str]:
    """The relay engine's texts of lost stretches (hard_audio.count_heard_offline), gate off."""
    return [t for t, _ in relay_decode(audios, [f"lost{i}" for i in range(len(audios))], asr_overrides)]


def asr_key(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that change what the ASR writes (asr.*): runs with the same key share an offline decode."""
    return tuple(kv for kv in overrides if kv.startswith("asr."))


def set_offline(clips: list[Clip], overrides: list[str],
                cache: dict[tuple[str, ...], list[tuple[str, float, float]]]) -> None:
    """The clips' offline ceiling for this run's ASR settings (decoded once per asr_key)."""
    key = asr_key(overrides)
    if key not in cache:
        print(f"offline pass ({', '.join(key) or 'default ASR settings'}) ...", file=sys.stderr)
        offline_pass(clips, list(key))
        cache[key] = [(c.offline_text, c.offline_decode_s, c.raw_fw_s) for c in clips]
    for c, (text, decode_s, raw_s) in zip(clips, cache[key], strict=True):
        c.offline_text, c.offline_decode_s, c.raw_fw_s = text, decode_s, raw_s


def set_hard_offline(pieces: list[hard_audio.Item], overrides: list[str],
                     cache: dict[tuple[str, ...], list[str]]) -> None:
    """The hard stream's offline texts for this run's ASR settings (decoded once per asr_key)."""
    speech = [p for p in pieces if p.is_speech]
    key = asr_key(overrides)
    if key not in cache:
        print(f"hard stream offline pass ({', '.join(key)}) ...", file=sys.stderr)
        cache[key] = [t for t, _ in relay_decode([p.decode_audio() for p in speech], [p.name for p in speech],
                                                 list(key))]
    for p, text in zip(speech, cache[key], strict=True):
        p.offline_text = text


def replay(stream: Path, work: Path, slug: str, overrides: list[str], speed: float, control_port: int | None = None
           ) -> tuple[list[dict[str, object]], float, Path] | None:
    """Run the relay over one stream: (JSONL records, peak RSS MB, log path), or None when it failed."""
    out, log = work / f"{slug}.jsonl", work / f"{slug}.log"
    out.unlink(missing_ok=True)
    print(f"replaying {stream.name} through echo-relay run ({slug}) ...", file=sys.stderr)
    peak, rc = run_relay(stream, out, overrides, speed, log, control_port)
    if rc != 0:
        print(f"echo-relay exited {rc}; see {log}", file=sys.stderr)
        return None
    return [json.loads(x) for x in out.read_text().splitlines() if x.strip()], peak, log


def prepare_hard(path: Path, long_minutes: float) -> list[hard_audio.Item]:
    """Build the hard stream into `path` and decode each speech item offline (the WER ceiling)."""
    pieces = hard_audio.build_hard_stream(hard_audio.load_sources(), long_minutes)
    write_wav(path, hard_audio.assemble(pieces))
    speech = [p for p in pieces if p.is_speech]
    print(f"hard stream: {hard_audio.describe_stream(pieces, long_minutes)}; offline pass ...", file=sys.stderr)
    decoded = relay_decode([p.decode_audio() for p in speech], [p.name for p in speech], [])
    for p, (text, _) in zip(speech, decoded, strict=True):
        p.offline_text = text
    return pieces


def main() -> int:
    args = parse_args()
    norm = normalizer()
    work = args.keep or Path(tempfile.mkdtemp(prefix="echo-relay-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    clips: list[Clip] = []
    pieces: list[hard_audio.Item] = []
    stream, hard_stream = work / "stream.wav", work / "hard.wav"
    if args.relays:
        return relays_main(args, norm, work)
    clean_offline: dict[tuple[str, ...], list[tuple[str, float, float]]] = {}
    hard_offline: dict[tuple[str, ...], list[str]] = {}
    if args.stream in ("clean", "both", "all"):
        clips = load_clips(args.set)
        print(f"{len(clips)} clips, {sum(len(c.audio) for c in clips) / SR:.1f} s of speech; offline pass ...",
              file=sys.stderr)
        set_offline(clips, [], clean_offline)
        build_stream(clips, args.gap, stream)
    if args.stream in ("hard", "both", "all"):
        pieces = prepare_hard(hard_stream, args.long_minutes)
        hard_offline[()] = [p.offline_text for p in pieces if p.is_speech]
    variants, args.unavailable = variant_list(args)
    results: list[Result] = []
    hard_results: list[hard_audio.HardResult] = []
    for label, overrides in variants:
        slug = re.sub(r"\W+", "_", label)
        if clips:
            run = replay(stream, work, slug, overrides, args.speed)
            if run is None:
                return 1
            set_offline(clips, overrides, clean_offline)
            res = analyse(label, clips, run[0], norm)
            res.peak_rss_mb = run[1]
            if args.cpu:
                print("measuring CPU during silence ...", file=sys.stderr)
                res.cpu_silence_pct = cpu_during_silence(overrides, work)
            results.append(res)
        if pieces:
            run = replay(hard_stream, work, f"{slug}_hard", overrides, args.speed)
            if run is None:
                return 1
            set_hard_offline(pieces, overrides, hard_offline)
            hres = hard_audio.analyse_hard(label, pieces, run[0], lambda ref, hyp: wer(norm, ref, hyp),
                                           asr_margins(overrides))
            hard_audio.count_heard_offline(pieces, hres, functools.partial(decode_lost, list(asr_key(overrides))),
                                           norm)
            hres.peak_rss_mb = run[1]
            hres.lost_lines = hard_audio.lost_lines(run[2].read_text(errors="replace"))
            hard_results.append(hres)
    ml_results: list[multilingual_audio.MlResult] = []
    if args.stream in ("multilingual", "all"):
        ml = multilingual_runs(args, work)
        if ml is None:
            return 1
        ml_results = ml
    ladder = ladder_section(results, hard_results, dict(variants), norm) \
        if len(variants) > 1 and (results or hard_results) else []
    targets = issue23_targets(results, hard_results, ml_results, dict(variants), args.speed)
    if results:
        print(table(results, len(clips)))
        for r in results:
            print(f"\n{r.label}:\n{clip_table(r)}")
    if hard_results:
        print("\nHard stream:\n" + hard_audio.summary_table(hard_results))
        for h in hard_results:
            print(f"\n{h.label} (hard stream, per category):\n{hard_audio.category_table(h)}")
            print("\n".join(f"relay log: {line}" for line in h.lost_lines))
    if ladder:
        print("\n" + "\n".join(ladder))
    if ml_results:
        print("\n" + "\n".join(multilingual_section(ml_results, args)))
    if targets:
        print("\n" + targets_table(targets))
    if args.write:
        cmd = "python scripts/bench.py " + shlex.join(sys.argv[1:])
        text = render_markdown(results, clips, hard_results, pieces, cmd, args)
        extra = [*ladder, *multilingual_section(ml_results, args)] if ml_results else ladder
        args.write.write_text("\n".join([text, *extra, *(["## Targets (issue 23)\n", targets_table(targets), ""]
                                                          if targets else [])]))
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def relays_main(args: argparse.Namespace, norm, work: Path) -> int:  # type: ignore[no-untyped-def]
    """--relays: scripts/bench_relays.py's serve-against-processes comparison on the clean stream."""
    import bench_relays

    clips = load_clips(args.set)
    stream = work / "stream.wav"
    build_stream(clips, args.gap, stream)
    stream_s = len(decode_file(stream)) / SR
    ns = [int(x) for x in args.relays.split(",") if x]
    process_ns = [int(x) for x in args.relay_processes.split(",") if x]
    modes = [m for m in args.relay_modes.split(",") if m]
    overrides = [kv for v in args.variant for kv in split_overrides(v.partition("=")[2])]
    runs = bench_relays.bench_relays(clips, stream, work, norm, ns, modes, process_ns, args.stagger_s, overrides)
    text = bench_relays.report(runs, len(clips), stream_s, args.stagger_s)
    print(text)
    if args.write:
        cmd = "python scripts/bench.py " + shlex.join(sys.argv[1:])
        args.write.write_text(f"# Relays\n\nMeasured {date.today().isoformat()} on {machine()}.\n\n"
                              f"Command: `{cmd}`\n\n{text}\n")
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def render_markdown(results: list[Result], clips: list[Clip], hard_results: list[hard_audio.HardResult],
                    pieces: list[hard_audio.Item], cmd: str, args: argparse.Namespace) -> str:
    out = [f"# Benchmarks\n\nMeasured {date.today().isoformat()} on {machine()}.\n", f"Command: `{cmd}`\n"]
    if results:
        out += clean_section(results, clips, args)
    if getattr(args, "unavailable", None):
        out.append(f"Not measured (no copy on this machine, which has no internet): {', '.join(args.unavailable)}. "
                   "Run `echo-relay models pull NAME` online, then this script again.\n")
    if hard_results:
        out += hard_section(hard_results, pieces, args)
    return "\n".join(out)


def clean_section(results: list[Result], clips: list[Clip], args: argparse.Namespace) -> list[str]:
    mean_decode = statistics.mean(c.offline_decode_s for c in clips)
    mean_raw = statistics.mean(c.raw_fw_s for c in clips)
    out = [f"Stream: {len(clips)} clips ({args.set}) joined by {args.gap} s of silence, replayed at speed {args.speed} "
           "through `echo-relay run --sink jsonl:` in a subprocess. Model tiny.en int8 unless the variant "
           "says otherwise.\n",
           table(results, len(clips)), "",
           f"Whole-clip decode time, mean over clips: relay engine {mean_decode:.3f} s; plain faster-whisper "
           f"(its defaults: beam 5, 30 s window) {mean_raw:.3f} s.\n"]
    for r in results:
        out += [f"## {r.label}\n", clip_table(r), ""]
    return out


def hard_section(hard_results: list[hard_audio.HardResult], pieces: list[hard_audio.Item],
                 args: argparse.Namespace) -> list[str]:
    out = ["# Hard audio\n",
           f"Stream: {hard_audio.describe_stream(pieces, args.long_minutes)}; built by scripts/hard_audio.py "
           f"(method in its docstring), replayed at speed {args.speed} through `echo-relay run --sink jsonl:`. "
           "Speech lost = reference speech regions covered by no echo's audio window; hallucinated echoes = "
           "echoes whose audio window overlaps no speech item; latency = last echo's emitted_at_s minus the "
           "item's true speech end.\n"]
    if args.speed != 1.0:
        out.append(f"Replayed at speed {args.speed}, not in real time: latencies are meaningless.\n")
    out += [hard_audio.summary_table(hard_results), ""]
    for h in hard_results:
        out += [f"## {h.label} (hard stream)\n", hard_audio.category_table(h), ""]
        if h.lost_lines:
            out += ["Relay log lines about lost or unheard speech:\n", "```", *h.lost_lines, "```", ""]
        out += ["Hallucinated echoes:\n", hard_audio.hallucination_table(h), "",
                "Echoes of speech no reference covers (not hallucinations):\n", hard_audio.unreferenced_table(h), "",
                "Per item:\n", hard_audio.item_table(h), ""]
    return out


# ------------------------------------------------------------------ issue 23: model ladder, multilingual streams
LATENCY_MARGIN_S = 0.05  # issue 23: base's p50 and p95 within this of tiny.en's on the clean stream
NO_ECHO_CATEGORIES = ("noise only", "music")  # hard-stream pieces where base must echo nothing (music: its tails)
LANGUAGE_ANALYZER = "perception.analyzers=[{analyzer: language}]"


def jsonl_has_language() -> bool:
    """Whether the relay's JSONL record carries the echo's `language` (pipeline/sink/base.py Outgoing)."""
    import dataclasses

    from pipeline.sink.base import Outgoing
    return any(f.name == "language" for f in dataclasses.fields(Outgoing))


def multilingual_runs(args: argparse.Namespace, work: Path) -> list[multilingual_audio.MlResult] | None:
    """Build the multilingual streams, decode every clip offline with its language given, replay each stream in
    its own `echo-relay run` (one conversation each) with the model and auto language, following its events."""
    mla = multilingual_audio
    overrides = [f"asr.model={args.ml_model}", "asr.language=null", *split_overrides(args.ml_set)]
    if not model_available(args.ml_model):
        print(f"--stream multilingual: model {args.ml_model} is not available offline "
              "(scripts/install.sh --dev installs base)", file=sys.stderr)
        return None
    langs = [] if args.ml_languages == "-" else [x for x in args.ml_languages.split(",") if x] or mla.languages()
    streams = mla.single_streams(langs, args.gap)
    pair = [x for x in args.ml_mix.split(",") if x]
    if pair:
        streams.append(mla.mixed_stream(pair, args.gap))
    print(f"multilingual streams: {mla.describe(streams)}; offline pass, language given ...", file=sys.stderr)
    by_lang: dict[str, dict[str, hard_audio.Item]] = {}
    for st in streams:
        for it in st.speech:
            by_lang.setdefault(it.category, {}).setdefault(it.name, it)
    offline: dict[str, str] = {}
    for lang, items in by_lang.items():
        decoded = relay_decode([it.audio for it in items.values()], list(items),
                               [*overrides, f"asr.language={lang}"])
        offline.update((name, text) for name, (text, _) in zip(items, decoded, strict=True))
    run_overrides = overrides if jsonl_has_language() else [*overrides, LANGUAGE_ANALYZER]
    results = []
    for st in streams:
        for it in st.speech:
            it.offline_text = offline[it.name]
        path = work / f"{st.slug}.wav"
        write_wav(path, hard_audio.assemble(st.pieces))
        port = relay_events.free_port()
        collector = relay_events.EventCollector(port, ("language", "perception")).start()
        run = replay(path, work, st.slug, run_overrides, args.speed, control_port=port)
        events = collector.stop()
        if run is None:
            return None
        if not collector.connected:
            print(f"{st.label}: the relay's event stream was not reachable ({collector.error or 'no connection'});"
                  " the lock is derived from the echoes", file=sys.stderr)
        res = mla.analyse_ml(st, run[0], events, asr_margins(run_overrides))
        res.peak_rss_mb = run[1]
        results.append(res)
    return results


def run_model(overrides: list[str]) -> tuple[str, str]:
    """(asr.model, asr.language or "auto") of a run."""
    asr = bench_settings(overrides).asr
    return asr.model, asr.language or "auto"


def ladder_section(results: list[Result], hard_results: list[hard_audio.HardResult],
                   overrides_of: dict[str, list[str]], norm) -> list[str]:
    """Markdown: every run side by side (the model ladder), clean and hard stream."""
    out = ["# Model ladder\n", "Each model against its own offline decode (same engine and settings, whole clip, "
           "gate off). \"vs own offline\" is the streamed text's WER with that decode as the reference: what "
           "streaming costs the model.\n"]
    if results:
        out += ["| run | model | language | p50 | p95 | mid-sentence splits / utt | splits / utt | streamed WER "
                "| offline WER | vs own offline | missing | CPU in silence | peak RSS |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            model, language = run_model(overrides_of.get(r.label, []))
            lat = r.latencies or [float("nan")]
            own = [wer(norm, str(c["offline_text"]), str(c["text"])) for c in r.per_clip]
            cpu = f"{r.cpu_silence_pct:.2f} %" if r.cpu_silence_pct is not None else "–"
            n = len(r.per_clip) or 1
            out.append(f"| {r.label} | {model} | {language} | {pct(lat, 50):.2f} s | {pct(lat, 95):.2f} s "
                       f"| {r.mid_splits / n:.2f} | {r.splits / n:.2f} | {100 * statistics.mean(r.wers):.1f} % "
                       f"| {100 * statistics.mean(r.offline_wers):.1f} % | {100 * statistics.mean(own):.1f} % "
                       f"| {r.missing} | {cpu} | {r.peak_rss_mb:.0f} MB |")
        out.append("")
    if hard_results:
        out += ["| run (hard stream) | streamed WER, mean of items | offline WER, mean of items "
                "| streamed WER, by words | offline WER, by words | "
                + " | ".join(f"echoes in {c}" for c in NO_ECHO_CATEGORIES) + " | other hallucinated echoes "
                "| p50 | p95 | peak RSS |", "|" + "---|" * (9 + len(NO_ECHO_CATEGORIES))]
        for h in hard_results:
            cells = hard_audio.summary_cells(h.items, len(h.hallucinations))
            per_cat = [sum(c == cat for c, _ in h.hallucinations) for cat in NO_ECHO_CATEGORIES]
            out.append(f"| {h.label} | {' | '.join(cells[1:5])} | {' | '.join(map(str, per_cat))} "
                       f"| {len(h.hallucinations) - sum(per_cat)} | {cells[10]} | {cells[11]} "
                       f"| {h.peak_rss_mb:.0f} MB |")
        out.append("")
    return out


Target = tuple[str, str, bool | None]


def issue23_targets(results: list[Result], hard_results: list[hard_audio.HardResult],
                    ml_results: list[multilingual_audio.MlResult], overrides_of: dict[str, list[str]],
                    speed: float = 1.0) -> list[Target]:
    """(target, figure, met) of issue 23's targets this run measured."""
    rows: list[Target] = []
    default_model = run_model([])[0]
    base = next((r for r in results if run_model(overrides_of.get(r.label, []))[0] == default_model), None)
    for r in results:
        model = run_model(overrides_of.get(r.label, []))[0]
        if base is None or model == default_model or not r.latencies or not base.latencies:
            continue
        d50 = pct(r.latencies, 50) - pct(base.latencies, 50)
        d95 = pct(r.latencies, 95) - pct(base.latencies, 95)
        rows.append((f"clean stream, {r.label}: p50 and p95 within {LATENCY_MARGIN_S} s of {base.label} "
                     f"({default_model})",
                     f"p50 {pct(r.latencies, 50):.2f} s ({d50:+.2f}), p95 {pct(r.latencies, 95):.2f} s ({d95:+.2f})",
                     None if speed != 1.0 else d50 <= LATENCY_MARGIN_S + 1e-9 and d95 <= LATENCY_MARGIN_S + 1e-9))
    for h in hard_results:
        n = sum(c in NO_ECHO_CATEGORIES for c, _ in h.hallucinations)
        rows.append((f"hard stream, {h.label}: 0 echoes on noise-only and music-only audio", f"{n} echoes", n == 0))
    if ml_results:
        rows += multilingual_audio.target_rows(ml_results)
    return rows


def targets_table(rows: list[Target]) -> str:
    verdict = {True: "yes", False: "**no**", None: "n/a"}
    return "| target | figure | met |\n|---|---|---|\n" + "\n".join(
        f"| {t} | {f} | {verdict[ok]} |" for t, f, ok in rows)


def multilingual_section(ml_results: list[multilingual_audio.MlResult], args: argparse.Namespace) -> list[str]:
    mla = multilingual_audio
    if not ml_results:
        return []
    sources = sorted({r.language_source for r in ml_results})
    out = ["# Multilingual streams\n",
           f"Streams: {mla.describe([r.stream for r in ml_results])}; clips of tests/data/speech/multilingual "
           f"(English: LibriSpeech dev-clean) joined by {args.gap} s of digital silence, built and analysed by "
           "scripts/multilingual_audio.py (method in its docstring). Each stream replayed at speed "
           f"{args.speed} through its own `echo-relay run --sink jsonl:` (one conversation, one lock) with "
           f"asr.model={args.ml_model}, asr.language=null{', ' + args.ml_set if args.ml_set else ''}, the "
           "benchmark following its event stream (GET /events) for the `language` events. Offline: the same "
           "engine on each whole clip with the language given. Utterance languages from: "
           f"{', '.join(sources)} (record = the JSONL record's `language`; perception = the `language` "
           "analyzer's result in the record, for a relay that does not write the field).\n"]
    if args.speed != 1.0:
        out.append(f"Replayed at speed {args.speed}, not in real time: latencies are meaningless.\n")
    out.append("Latencies on these clips are indicative (some end at their last word, some with a breath after it: "
               "scripts/multilingual_audio.py); the latency target is on the clean stream.\n")
    out += [mla.single_table(ml_results), ""]
    for r in ml_results:
        if r.stream.mixed:
            out += [f"## {r.stream.label}\n", mla.mixed_summary(r) + "\n", mla.mixed_table(r), "",
                    mla.events_table(r), ""]
    out += ["## Language events, single-language streams\n"]
    for r in ml_results:
        if not r.stream.mixed and r.events:
            out += [f"{r.stream.label}:\n", mla.events_table(r), ""]
    if not any(r.events for r in ml_results if not r.stream.mixed):
        out += ["None received: the lock is derived from the echoes (scripts/multilingual_audio.py).\n"]
    out += ["## Per clip\n", mla.clip_table(ml_results), "", "## Echoes outside speech\n",
            mla.hallucination_table(ml_results), ""]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
