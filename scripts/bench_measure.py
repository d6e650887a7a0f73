"""What bench.py and bench_relays.py measure with: the clips, a run's JSONL records analysed against them
(latency, WER, splits), peak memory, and a run's configuration (bench.py's docstring gives the method).

Both scripts use it; bench.py's `--relays` calls bench_relays.py, which never imports bench.py.
"""

from __future__ import annotations

import csv
import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SPEECH = REPO / "tests" / "data" / "speech"
SR = 16_000
SENTENCE_END = re.compile(r"[.?!][\"')\]]*$")

sys.path.insert(0, str(REPO))
from pipeline.dsp import speech_bounds  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402


@dataclass
class Clip:
    name: str
    ref: str
    audio: np.ndarray
    offset_s: float = 0.0  # position of the clip's first sample in the stream
    speech_start_s: float = 0.0  # true bounds, from the clip's own envelope (clip time)
    speech_end_s: float = 0.0
    offline_text: str = ""
    offline_decode_s: float = 0.0
    raw_fw_s: float = 0.0  # plain faster-whisper (defaults: beam 5, 30 s window) on the clip

    @property
    def true_end_s(self) -> float:
        return self.offset_s + self.speech_end_s


@dataclass
class Result:
    label: str
    latencies: list[float] = field(default_factory=list)
    wers: list[float] = field(default_factory=list)
    offline_wers: list[float] = field(default_factory=list)
    splits: int = 0
    mid_splits: int = 0
    missing: int = 0
    extra_echoes: int = 0
    cpu_silence_pct: float | None = None
    peak_rss_mb: float = 0.0
    per_clip: list[dict[str, object]] = field(default_factory=list)


def load_clips(which: str) -> list[Clip]:
    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if which == "librispeech":
        rows = [r for r in rows if r["file"].startswith("clapclap/librispeech_dev_clean/")]
    clips = []
    for r in rows:
        audio = decode_file(SPEECH / r["file"])
        c = Clip(r["file"], r["reference_transcript"], audio)
        c.speech_start_s, c.speech_end_s = speech_bounds(audio)
        clips.append(c)
    return clips


def normalizer() -> Callable[[str], str]:
    """whisper_normalizer's EnglishTextNormalizer, white space collapsed, and without the tokens it leaves that
    hold no letter or digit: it turns a closing ellipsis ("Align...", Whisper's drawn-out word) into "align ." and
    jiwer would score that "." as an inserted word."""
    from whisper_normalizer.english import EnglishTextNormalizer

    english = EnglishTextNormalizer()

    def norm(text: str) -> str:
        return " ".join(w for w in english(text).split() if any(c.isalnum() for c in w))

    return norm


def wer(norm: Callable[[str], str], ref: str, hyp: str) -> float:
    """`norm`: `normalizer()`'s function (it collapses white space itself)."""
    import jiwer
    r, h = norm(ref), norm(hyp)
    return float(jiwer.wer(r, h)) if r else float(bool(h))


def read_hwm(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_overrides(path: Path, overrides: list[str]) -> None:
    """Turn key=value pairs into a YAML config layered on the shipped config.yaml."""
    import yaml

    from pipeline.config import set_dotted
    tree = yaml.safe_load((REPO / "config.yaml").read_text())
    tree["source"]["spec"] = "file:" + str(REPO / "pipeline/assets/jfk.wav")
    tree["asr"]["models_dir"] = str(REPO / "models")
    for kv in overrides:
        key, _, value = kv.partition("=")
        set_dotted(tree, key, yaml.safe_load(value))
    path.write_text(yaml.safe_dump(tree))


def analyse(label: str, clips: list[Clip], records: list[dict[str, object]], norm) -> Result:  # type: ignore[no-untyped-def]
    res = Result(label)
    echoes = [r for r in records if r["event"] == "echo"]
    used: set[int] = set()
    for c in clips:
        lo, hi = c.offset_s - 0.5, c.offset_s + len(c.audio) / SR + 0.5
        mine = [i for i, r in enumerate(echoes) if lo <= float(r["audio_end_s"]) <= hi + 0.5
                and float(r["audio_start_s"]) >= lo]  # type: ignore[arg-type]
        used.update(mine)
        # One utterance may be several messages (long text split); group by utterance_id.
        utts: dict[str, list[dict[str, object]]] = {}
        for i in mine:
            utts.setdefault(str(echoes[i]["utterance_id"]), []).append(echoes[i])
        parts = [" ".join(str(m["text"]) for m in msgs) for msgs in utts.values()]
        hyp = " ".join(parts)
        row: dict[str, object] = {"clip": Path(c.name).stem, "echoes": len(utts), "text": hyp,
                                  "offline_text": c.offline_text}
        if not utts:
            res.missing += 1
            res.wers.append(1.0)
            row["latency_s"] = None
        else:
            last = max((msgs[-1] for msgs in utts.values()), key=lambda m: float(m["emitted_at_s"]))  # type: ignore[arg-type]
            lat = float(last["emitted_at_s"]) - c.true_end_s  # type: ignore[arg-type]
            res.latencies.append(lat)
            row["latency_s"] = round(lat, 3)
            res.wers.append(wer(norm, c.ref, hyp))
            n_split = len(utts) - 1
            mid = count_mid_sentence_splits(parts, c.offline_text, norm)
            res.splits += n_split
            res.mid_splits += mid
            row["splits"], row["mid_sentence"] = n_split, mid
        res.offline_wers.append(wer(norm, c.ref, c.offline_text))
        row["wer"], row["offline_wer"] = round(res.wers[-1], 3), round(res.offline_wers[-1], 3)
        row["decode_s"], row["raw_fw_s"] = round(c.offline_decode_s, 3), round(c.raw_fw_s, 3)
        res.per_clip.append(row)
    res.extra_echoes = len(echoes) - len(used)
    return res


def count_mid_sentence_splits(parts: list[str], offline: str, norm: Callable[[str], str]) -> int:
    """Splits whose position in the offline transcript is not right after a . ? !"""
    off_words = offline.split()
    off_norm = [norm(w) for w in off_words]
    streamed: list[str] = []
    boundaries: list[int] = []
    for p in parts[:-1]:
        streamed += [norm(w) for w in p.split()]
        boundaries.append(len(streamed))
    streamed += [norm(w) for w in parts[-1].split()] if parts else []
    sm = difflib.SequenceMatcher(a=streamed, b=off_norm, autojunk=False)
    mapping: dict[int, int] = {}
    for a, b, size in sm.get_matching_blocks():
        for k in range(size):
            mapping[a + k] = b + k
    mid = 0
    for b in boundaries:
        # the last streamed word before the split, mapped into the offline transcript
        j = next((mapping[i] for i in range(b - 1, -1, -1) if i in mapping), None)
        if j is None or not SENTENCE_END.search(off_words[j]):
            mid += 1
    return mid
