"""Hard-audio stream for scripts/bench.py (`--stream hard`): construction and analysis.

The stream is built deterministically (fixed RNG seed) from tests/data/speech, as a list of pieces
(`Item`s) laid end to end. Every piece has a category; speech pieces also carry a reference
transcript and reference speech regions. Categories, in stream order:

- noisy 0/5/10 dB: each LibriSpeech dev-clean clip mixed with a dcase_noise recording at 0, 5 and
  10 dB SNR. The SNR is computed on the speech's active region (the samples of its reference regions,
  noise measured on the same samples). The dcase recordings are 4 s long, so the noise is looped with
  50 ms cross-fades; it starts 1 s before the speech and runs 1 s after it.
- music: the three clapclap/noisy_music mixes (the two 120 s ones are music-only after the speech).
  Their speech is the LibriSpeech clip named in the file name, at sample 0 of the mix (checked by
  cross-correlation), so their regions are that clean clip's.
- spontaneous: mfa/acoustic_corpus.wav, mfa/mfa_um.flac, mfa/mfa_internalsil.flac.
- whisper: mfa/whisper.flac.
- level change: a clip at its normal level, 2.5 s of digital silence, then the same or another clip
  20-25 dB quieter; and 174-168635-0007 at 0 dB SNR under dev_011, zeros, mfa_internalsil at -25 dB.
- noise only: each dcase_noise recording alone (nothing should be echoed).
- long session: at least N minutes of read-speech clips (level +-10 dB, clean or at 0-20 dB SNR)
  alternating with noise-only stretches (-45..-20 dBFS) and digital silence.
- gap: what separates the items above (3 s of digital silence or of noise at -55..-45 dBFS).

Mixed pieces are scaled down as a whole when their peak would clip (the SNR is kept).

Reference speech regions: 32 ms frames of the CLEAN clip whose energy is within 35 dB of the clip's
loudest frame, merged across gaps < 300 ms (lone regions < 0.1 s dropped), shifted to stream time.
Independent of any VAD. On clips with audible hiss (jfk, acoustic_corpus, some LJ Speech and
LibriSpeech lead-ins) peak - 35 dB lies in the hiss, so a frame must also be 6 dB above the clip's
floor (10th-percentile frame), the low threshold of pipeline.dsp.speech_bounds.
The true speech end used for latency is the clean clip's `speech_bounds` end, as in bench.py.

Analysis of the relay's JSONL echoes:
- Each echo goes to the speech item whose speech span (first region start .. last region end) its
  audio window [audio_start_s, audio_end_s] overlaps most. An echo that overlaps no speech span is a
  hallucination, filed under the category of the piece its window overlaps most (noise only, music
  tail, gap, long session), unless it overlaps speech no reference covers (UNREFERENCED_SPEECH: the
  spoken guitar lesson in mix_02's music tail), which is listed apart.
- Streamed WER: an item's echoes (grouped by utterance_id, in order) against its reference; offline
  WER: the relay's ASR engine on the item's audio (speech span +-1 s: the whole item for noisy
  mixes; the 120 s music mixes are not decoded past 1 s after the speech). References have
  annotation tokens removed: <hes-word> -> word, other <...> and [...] dropped. A missed item
  (no echo) counts as WER 1, as in bench.py.
- Speech lost: reference regions covered by no echo window at all (any echo), summed. An echo's
  window is the audio Whisper decoded for it: its JSONL bounds are the VAD's speech bounds, so they
  are widened by the run's vad.pre_roll_ms before and vad.speech_pad_ms after. A lost
  stretch is a run of uncovered speech inside one item, pauses between regions included when no
  covered speech lies between; its length is from its first to its last lost sample.
- Lost stretches of 1 s or more are also decoded alone, offline: the count in brackets is of those in
  which that decode finds at least two words of the item's reference (speech the model can hear).
- WER per category two ways: the mean of the items' WERs (a 3-word clip weighs as much as a 60-word
  one), and by words (errors over reference words, each item's WER weighted by its reference length).
- Latency: emitted_at_s of the item's last echo minus its true speech end (stream time).
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from pipeline.dsp import speech_bounds  # noqa: E402

SR = 16_000
SPEECH = REPO / "tests" / "data" / "speech"
LIBRI = "clapclap/librispeech_dev_clean/"
MUSIC = "clapclap/noisy_music/"
NOISE_DIR = SPEECH / "clapclap" / "dcase_noise"
SEED = 20_240_611

FRAME = 512  # 32 ms
REGION_BELOW_PEAK_DB = 35.0
REGION_MERGE_GAP_S = 0.3
MIN_REGION_S = 0.1  # a lone loud frame is a click, not speech
FLOOR_MARGIN_DB = 6.0  # hiss of old or noisy recordings (jfk, acoustic_corpus) is not speech
NOISE_MARGIN_S = 1.0  # noise before and after the speech of a mix
CROSSFADE_S = 0.05  # when looping a noise recording
GAP_S = 3.0
LEVEL_GAP_S = 2.5
PEAK_LIMIT = 0.97  # of full scale
LONG_STRETCH_S = 1.0
# Speech in the audio that no reference covers (item time): echoes there are neither hallucinations nor
# counted in WER. mix_02's "music-only" tail holds a spoken guitar lesson ("Hey everyone, this is Brian
# from ... activemelody.com. This week's guitar lesson ..."): offline decodes of 95-100 s and 99-120 s.
UNREFERENCED_SPEECH: dict[str, list[Interval]] = {"mix_02_2428-83705-0024_-0SdAVK79lg": [(95.0, 120.0)]}

SNRS = (0.0, 5.0, 10.0)
SPONTANEOUS = ("mfa/acoustic_corpus.wav", "mfa/mfa_um.flac", "mfa/mfa_internalsil.flac")
WHISPER = "mfa/whisper.flac"
LONG_POOL_PREFIXES = (LIBRI, "deepspeech-examples/", "mfa/61-70968-0000", "realtimestt_ljspeech/", "whisper.cpp/")
CATEGORIES = ("noisy 0 dB", "noisy 5 dB", "noisy 10 dB", "music", "spontaneous", "whisper", "level change",
              "noise only", "long session", "gap")

Audio = npt.NDArray[np.int16]
Floats = npt.NDArray[np.float64]
Interval = tuple[float, float]
WerFn = Callable[[str, str], float]


# ----------------------------------------------------------------------------------------- data
@dataclass
class Sources:
    """Decoded audio (16 kHz mono int16) and references, keyed by path under tests/data/speech."""

    clips: dict[str, Audio]
    refs: dict[str, str]
    noises: dict[str, Audio]


@dataclass
class Item:
    """One piece of the stream. Speech pieces have regions (item time) and a reference."""

    name: str
    category: str
    audio: Audio
    ref: str = ""
    regions: list[Interval] = field(default_factory=list)
    true_end_s: float = 0.0  # item time
    decode_window: Interval | None = None  # item time; None = the whole item
    offset_s: float = 0.0  # set by assemble()
    offline_text: str = ""
    unreferenced: list[Interval] = field(default_factory=list)  # item time: speech no reference covers

    @property
    def is_speech(self) -> bool:
        return bool(self.regions)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SR

    @property
    def extent(self) -> Interval:
        return self.offset_s, self.offset_s + self.duration_s

    @property
    def stream_regions(self) -> list[Interval]:
        return [(self.offset_s + a, self.offset_s + b) for a, b in self.regions]

    @property
    def speech_span(self) -> Interval:
        return self.offset_s + self.regions[0][0], self.offset_s + self.regions[-1][1]

    def decode_audio(self) -> Audio:
        """The audio decoded offline: speech span +-1 s of this item's own audio."""
        lo, hi = self.decode_window or (0.0, self.duration_s)
        return self.audio[int(lo * SR):int(hi * SR)]


def load_sources() -> Sources:
    from pipeline.source.file import decode_file

    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    refs = {r["file"]: clean_reference(r["reference_transcript"]) for r in rows}
    wanted = [f for f in refs if f.startswith((LIBRI, MUSIC, *LONG_POOL_PREFIXES)) or f in (*SPONTANEOUS, WHISPER)]
    clips = {f: decode_file(SPEECH / f) for f in wanted}
    noises = {p.stem: decode_file(p) for p in sorted(NOISE_DIR.glob("*.wav"))}
    return Sources(clips, {f: refs[f] for f in wanted}, noises)


def clean_reference(text: str) -> str:
    """Drop annotation tokens: <hes-word> (a hesitated word) -> word; other <...> and [...] removed."""
    text = re.sub(r"<hes-([^>]*)>", r"\1", text)
    text = re.sub(r"<[^>]*>|\[[^\]]*\]", " ", text)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------ pure DSP
def frame_db(audio: npt.NDArray[np.generic], frame: int = FRAME) -> Floats:
    """Energy of consecutive `frame`-sample frames, dBFS (int16 scale)."""
    n = len(audio) // frame
    x = np.asarray(audio[:n * frame], np.float64).reshape(n, frame) / 32768.0
    out: Floats = 10 * np.log10(np.mean(x * x, axis=1) + 1e-12)
    return out


def merge_intervals(intervals: Iterable[Interval], max_gap: float = 0.0) -> list[Interval]:
    """Sort and merge intervals whose gap is < max_gap (overlapping or touching ones always)."""
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a - out[-1][1] < max(max_gap, 1e-9):
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def speech_regions(clean: Audio, below_peak_db: float = REGION_BELOW_PEAK_DB,
                   merge_gap_s: float = REGION_MERGE_GAP_S, frame: int = FRAME) -> list[Interval]:
    """Reference speech regions (s) of a clean clip: frames within `below_peak_db` of its loudest frame
    and at least FLOOR_MARGIN_DB above its noise floor (10th percentile frame), merged across short gaps."""
    db = frame_db(clean, frame)
    if len(db) == 0:
        return []
    threshold = max(db.max() - below_peak_db, np.percentile(db, 10) + FLOOR_MARGIN_DB)
    hot = np.flatnonzero(db >= threshold)
    merged = merge_intervals(((i * frame / SR, (i + 1) * frame / SR) for i in hot), merge_gap_s)
    return [(a, b) for a, b in merged if b - a >= MIN_REGION_S]


def shift(intervals: Iterable[Interval], by: float) -> list[Interval]:
    return [(a + by, b + by) for a, b in intervals]


def active_power(audio: npt.NDArray[np.generic], regions: Sequence[Interval]) -> float:
    """Mean square (full scale = 1) over the samples inside `regions` (s, audio time)."""
    x = np.concatenate([np.asarray(audio[int(a * SR):int(b * SR)], np.float64) for a, b in regions])
    return float(np.mean((x / 32768.0) ** 2)) if len(x) else 0.0


def gain_db(audio: npt.NDArray[np.generic], db: float) -> Floats:
    return np.asarray(audio, np.float64) * 10 ** (db / 20)


def loop_to_length(noise: npt.NDArray[np.generic], n: int, start: int = 0, crossfade_s: float = CROSSFADE_S) -> Floats:
    """`n` samples of a noise recording from sample `start`, looped with linear cross-fades."""
    x = np.asarray(noise, np.float64)
    fade = min(int(crossfade_s * SR), len(x) // 4)
    x = np.roll(x, -(start % len(x)))
    out = x.copy()
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False) if fade else np.zeros(0)
    while len(out) < n:
        nxt = x.copy()
        if fade:
            nxt[:fade] = nxt[:fade] * ramp + out[-fade:] * (1 - ramp)
            out = np.concatenate([out[:-fade], nxt])
        else:
            out = np.concatenate([out, nxt])
    return out[:n]


def at_level(audio: npt.NDArray[np.generic], dbfs: float) -> Floats:
    """Scale so the RMS of the whole signal is `dbfs`."""
    x = np.asarray(audio, np.float64)
    ms = float(np.mean((x / 32768.0) ** 2)) if len(x) else 0.0
    return x if ms <= 0 else x * 10 ** ((dbfs - 10 * np.log10(ms)) / 20)


def limiter_scale(x: Floats, peak_limit: float = PEAK_LIMIT) -> float:
    """The factor (<= 1) that keeps the peak of `x` (int16 scale) at most `peak_limit` of full scale."""
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return min(1.0, peak_limit * 32767 / peak) if peak > 0 else 1.0


def to_int16(x: Floats, peak_limit: float = PEAK_LIMIT) -> Audio:
    """float (int16 scale) -> int16, scaled down as a whole when its peak would exceed `peak_limit`."""
    return np.rint(x * limiter_scale(x, peak_limit)).astype(np.int16)


def mix_at_snr(speech: Floats, regions: Sequence[Interval], noise: npt.NDArray[np.generic], snr_db: float,
               margin_s: float = NOISE_MARGIN_S, noise_start: int = 0) -> Floats:
    """Speech with `margin_s` of noise before and after, noise scaled to `snr_db` on the active region.

    Returned in int16 scale; the speech starts at `margin_s` in the result."""
    pad = int(margin_s * SR)
    bed = loop_to_length(noise, len(speech) + 2 * pad, noise_start)
    ps = active_power(speech, regions)
    pn = active_power(bed[pad:pad + len(speech)], regions)
    g = np.sqrt(ps / (pn * 10 ** (snr_db / 10))) if pn > 0 else 0.0
    out = bed * g
    out[pad:pad + len(speech)] += speech
    return out


# ------------------------------------------------------------------------------------ items
def speech_item(name: str, category: str, clean: Audio, ref: str, level_db: float = 0.0,
                noise: Audio | None = None, snr_db: float | None = None, noise_start: int = 0) -> Item:
    """A clean clip at `level_db` relative to its own level, optionally mixed with noise at `snr_db`."""
    regions = speech_regions(clean)
    end = speech_bounds(clean)[1]
    speech = gain_db(clean, level_db)
    if noise is None or snr_db is None:
        return Item(name, category, to_int16(speech), ref, regions, end)
    mixed = mix_at_snr(speech, regions, noise, snr_db, noise_start=noise_start)
    return Item(name, category, to_int16(mixed), ref, shift(regions, NOISE_MARGIN_S), end + NOISE_MARGIN_S)


def silence(seconds: float, category: str = "gap", name: str = "silence") -> Item:
    return Item(name, category, np.zeros(int(seconds * SR), np.int16))


def noise_piece(noise: Audio, seconds: float, dbfs: float, start: int, category: str, name: str) -> Item:
    return Item(name, category, to_int16(at_level(loop_to_length(noise, int(seconds * SR), start), dbfs)))


def gap(rng: np.random.Generator, noises: dict[str, Audio], seconds: float = GAP_S) -> Item:
    """Between items: digital silence or quiet noise (-55..-45 dBFS), half and half."""
    if rng.random() < 0.5:
        return silence(seconds)
    key = str(rng.choice(sorted(noises)))
    return noise_piece(noises[key], seconds, float(rng.uniform(-55, -45)),
                       int(rng.integers(len(noises[key]))), "gap", f"noise {key}")


def noisy_items(src: Sources, rng: np.random.Generator) -> list[Item]:
    keys = sorted(k for k in src.clips if k.startswith(LIBRI))
    noise_keys = sorted(src.noises)
    items = []
    for k in keys:
        for snr in SNRS:
            nk = str(rng.choice(noise_keys))
            items.append(speech_item(f"{Path(k).stem} @{snr:g} dB ({nk})", f"noisy {snr:g} dB", src.clips[k],
                                     src.refs[k], noise=src.noises[nk], snr_db=snr,
                                     noise_start=int(rng.integers(len(src.noises[nk])))))
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def music_items(src: Sources) -> list[Item]:
    items = []
    for k in sorted(x for x in src.clips if x.startswith(MUSIC)):
        m = re.search(r"mix_\d+_(\d+-\d+-\d+)_", k)
        if m is None:
            continue
        clean = src.clips[LIBRI + m.group(1) + ".flac"]
        regions = speech_regions(clean)
        audio = src.clips[k]
        window = (0.0, min(len(audio) / SR, regions[-1][1] + NOISE_MARGIN_S))
        item = Item(Path(k).stem, "music", audio, src.refs[k], regions, speech_bounds(clean)[1], window)
        item.unreferenced = UNREFERENCED_SPEECH.get(item.name, [])
        items.append(item)
    return items


def level_change_pairs(src: Sources) -> list[list[Item]]:
    """Loud speaker, 2.5 s digital silence, quiet speaker (20-25 dB down)."""
    def clip(stem: str) -> str:
        return next(k for k in src.clips if Path(k).stem == stem)

    pairs: list[list[Item]] = []
    for loud, quiet, db in (("2086-149220-0000", "2086-149220-0000", -20.0),
                            ("2035-152373-0014", "3170-137482-0019", -25.0)):
        a, b = clip(loud), clip(quiet)
        pairs.append([speech_item(f"{loud} loud", "level change", src.clips[a], src.refs[a]),
                      silence(LEVEL_GAP_S, "level change", "digital silence"),
                      speech_item(f"{quiet} {db:g} dB after loud", "level change", src.clips[b], src.refs[b], db)])
    a, b = clip("174-168635-0007"), "mfa/mfa_internalsil.flac"
    pairs.append([speech_item("174-168635-0007 @0 dB (dev_011)", "level change", src.clips[a], src.refs[a],
                              noise=src.noises["dev_011"], snr_db=0.0),
                  silence(LEVEL_GAP_S, "level change", "digital silence"),
                  speech_item("mfa_internalsil -25 dB after noisy", "level change", src.clips[b], src.refs[b], -25.0)])
    return pairs


def long_session(src: Sources, rng: np.random.Generator, minutes: float) -> list[Item]:
    """>= `minutes` of read speech (+-10 dB, clean or 0-20 dB SNR) alternating with noise and silence."""
    pool = sorted(k for k in src.clips if k.startswith(LONG_POOL_PREFIXES))
    noise_keys = sorted(src.noises)
    items: list[Item] = []
    total = 0.0
    while total < minutes * 60:
        k = str(rng.choice(pool))
        level = float(rng.uniform(-10, 10))
        nk = str(rng.choice(noise_keys))
        snr = None if rng.random() < 1 / 3 else float(rng.uniform(0, 20))
        desc = "clean" if snr is None else f"@{snr:.0f} dB ({nk})"
        items.append(speech_item(f"{Path(k).stem} {level:+.0f} dB {desc}", "long session", src.clips[k],
                                 src.refs[k], level, src.noises[nk], snr, int(rng.integers(len(src.noises[nk])))))
        if rng.random() < 0.5:
            items.append(silence(float(rng.uniform(1.5, 4.0)), "long session"))
        else:
            nk = str(rng.choice(noise_keys))
            items.append(noise_piece(src.noises[nk], float(rng.uniform(2.0, 6.0)), float(rng.uniform(-45, -20)),
                                     int(rng.integers(len(src.noises[nk]))), "long session", f"noise {nk}"))
        total += items[-2].duration_s + items[-1].duration_s
    return items


def build_hard_stream(src: Sources, long_minutes: float, seed: int = SEED) -> list[Item]:
    """All pieces in stream order (offsets not yet set: see `assemble`)."""
    rng = np.random.default_rng(seed)
    groups: list[list[Item]] = [[it] for it in noisy_items(src, rng)]
    groups += [[it] for it in music_items(src)]
    groups += [[speech_item(Path(k).stem, "spontaneous", src.clips[k], src.refs[k])] for k in SPONTANEOUS]
    groups.append([speech_item(Path(WHISPER).stem, "whisper", src.clips[WHISPER], src.refs[WHISPER])])
    groups += level_change_pairs(src)
    groups += [[Item(k, "noise only", a)] for k, a in sorted(src.noises.items())]
    if long_minutes > 0:
        groups.append(long_session(src, rng, long_minutes))
    pieces: list[Item] = [silence(2.0)]
    for g in groups:
        pieces += [*g, gap(rng, src.noises)]
    return pieces


def assemble(pieces: list[Item]) -> Audio:
    """Set each piece's offset_s and return the whole stream."""
    pos = 0
    for p in pieces:
        p.offset_s = pos / SR
        pos += len(p.audio)
    return np.concatenate([p.audio for p in pieces])


# ------------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class Echo:
    utterance_id: str
    start: float
    end: float
    emitted: float
    text: str


@dataclass
class ItemOutcome:
    name: str
    category: str
    echoes: int
    wer: float
    offline_wer: float
    latency_s: float | None
    speech_s: float
    lost_s: float
    stretches: list[Interval]
    text: str
    ref_words: int = 0  # words of the (cleaned) reference, for the word-weighted WER
    heard_offline: int = 0  # lost stretches >= LONG_STRETCH_S in which the offline decode finds words


@dataclass
class HardResult:
    label: str
    items: list[ItemOutcome]
    hallucinations: list[tuple[str, Echo]]  # (category, echo)
    unreferenced: list[Echo] = field(default_factory=list)  # echoes of speech no reference covers
    categories: list[str] = field(default_factory=list)  # those present in the stream
    peak_rss_mb: float = 0.0
    lost_lines: list[str] = field(default_factory=list)


def parse_echoes(records: Iterable[dict[str, object]]) -> list[Echo]:
    return [Echo(str(r["utterance_id"]), float(r["audio_start_s"]), float(r["audio_end_s"]),  # type: ignore[arg-type]
                 float(r["emitted_at_s"]), str(r["text"]))  # type: ignore[arg-type]
            for r in records if r.get("event") == "echo"]


def overlap(a: Interval, b: Interval) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def best_match(window: Interval, candidates: Sequence[tuple[int, Interval]]) -> int | None:
    """Index of the candidate interval overlapping `window` most (None when none overlaps)."""
    best, score = None, 0.0
    for i, iv in candidates:
        o = overlap(window, iv)
        if o > score:
            best, score = i, o
    return best


def subtract(region: Interval, covers: Sequence[Interval]) -> list[Interval]:
    """Parts of `region` outside every interval of `covers` (merged, sorted)."""
    out, lo = [], region[0]
    for a, b in covers:
        if b <= lo or a >= region[1]:
            continue
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    if lo < region[1]:
        out.append((lo, region[1]))
    return out


def lost_stretches(regions: Sequence[Interval], covers: Sequence[Interval]) -> tuple[float, list[Interval]]:
    """(uncovered speech seconds, lost stretches) of one item; pauses join stretches when nothing
    covered lies between them."""
    lost, open_ = 0.0, False
    stretches: list[Interval] = []
    for r in regions:
        pieces = subtract(r, covers)
        for p in pieces:
            lost += p[1] - p[0]
            if open_ and p[0] == r[0] and stretches:
                stretches[-1] = (stretches[-1][0], p[1])
            else:
                stretches.append(p)
            open_ = p[1] == r[1]
        if not pieces:
            open_ = False
    return lost, stretches


def join_text(echoes: Sequence[Echo]) -> str:
    """An item's echoes as one hypothesis: messages of one utterance joined, utterances in order."""
    utts: dict[str, list[Echo]] = {}
    for e in sorted(echoes, key=lambda e: (e.start, e.emitted)):
        utts.setdefault(e.utterance_id, []).append(e)
    return " ".join(" ".join(e.text for e in msgs) for msgs in utts.values())


def analyse_hard(label: str, pieces: Sequence[Item], records: Iterable[dict[str, object]], wer_fn: WerFn,
                 margins: Interval = (0.0, 0.0)) -> HardResult:
    """`margins`: (before, after) seconds of audio the ASR got around each echo's speech bounds."""
    echoes = parse_echoes(records)
    speech = [(i, p.speech_span) for i, p in enumerate(pieces) if p.is_speech]
    extents = [(i, p.extent) for i, p in enumerate(pieces)]
    covers = merge_intervals((e.start - margins[0], e.end + margins[1]) for e in echoes)
    unreferenced = [(p.offset_s + a, p.offset_s + b) for p in pieces for a, b in p.unreferenced]
    mine: dict[int, list[Echo]] = {}
    halluc: list[tuple[str, Echo]] = []
    heard_unreferenced: list[Echo] = []
    for e in echoes:
        i = best_match((e.start, e.end), speech)
        if i is not None:
            mine.setdefault(i, []).append(e)
        elif any(overlap((e.start, e.end), u) > 0 for u in unreferenced):
            heard_unreferenced.append(e)
        else:
            j = best_match((e.start, e.end), extents)
            halluc.append((pieces[j].category if j is not None else "gap", e))
    outcomes = []
    for i, p in enumerate(pieces):
        if not p.is_speech:
            continue
        got = mine.get(i, [])
        hyp = join_text(got)
        lost, stretches = lost_stretches(p.stream_regions, covers)
        latency = max(e.emitted for e in got) - (p.offset_s + p.true_end_s) if got else None
        outcomes.append(ItemOutcome(
            p.name, p.category, len({e.utterance_id for e in got}), wer_fn(p.ref, hyp) if got else 1.0,
            wer_fn(p.ref, p.offline_text), latency, sum(b - a for a, b in p.regions), lost, stretches, hyp,
            len(p.ref.split())))
    return HardResult(label, outcomes, halluc, heard_unreferenced,
                      [c for c in CATEGORIES if any(p.category == c for p in pieces)])


def long_lost_audio(pieces: Sequence[Item], r: HardResult) -> list[tuple[ItemOutcome, Audio]]:
    """The audio of every lost stretch of LONG_STRETCH_S or more (with 0.2 s either side), per outcome."""
    speech = [p for p in pieces if p.is_speech]
    out = []
    for p, o in zip(speech, r.items, strict=True):
        for a, b in o.stretches:
            if b - a >= LONG_STRETCH_S:
                lo, hi = max(0.0, a - p.offset_s - 0.2), b - p.offset_s + 0.2
                out.append((o, p.audio[int(lo * SR):int(hi * SR)]))
    return out


def count_heard_offline(pieces: Sequence[Item], r: HardResult, decode: Callable[[list[Audio]], list[str]],
                        normalize: Callable[[str], str], min_words: int = 2) -> None:
    """Set `heard_offline`: lost stretches in which the offline decode (same engine, gate off) of that
    stretch alone finds at least `min_words` words of the item's reference, and mostly such words (at
    least half of what it wrote: a garbled decode of noise-masked speech matches "the", "of", "in" by
    chance). The issue's target counts only speech "that the offline decode transcribes"; speech the
    model cannot hear in the noise is not a loss of the relay's."""
    found = long_lost_audio(pieces, r)
    texts = decode([audio for _, audio in found]) if found else []
    for (o, _), text in zip(found, texts, strict=True):
        ref = set(normalize(next(p.ref for p in pieces if p.name == o.name)).split())
        words = normalize(text).split()
        hits = sum(w in ref for w in words)
        if hits >= min_words and hits >= len(words) / 2:
            o.heard_offline += 1


# ------------------------------------------------------------------------------------ report
def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (with 10 values, p95 is the worst one)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(np.ceil(q / 100 * len(s))) - 1))]


def summary_cells(items: Sequence[ItemOutcome], halluc: int) -> list[str]:
    """Cells: items, streamed WER, offline WER (each: mean over items, then over words), missed, speech
    lost, longest lost, lost >= 1 s, hallucinated echoes, latency p50, p95."""
    if not items:
        return ["0", "–", "–", "–", "–", "–", "–", "–", "–", str(halluc), "–", "–"]
    words = sum(o.ref_words for o in items) or 1
    lat = [o.latency_s for o in items if o.latency_s is not None]
    stretches = [b - a for o in items for a, b in o.stretches]
    lost, total = sum(o.lost_s for o in items), sum(o.speech_s for o in items)
    return [str(len(items)), f"{100 * statistics.mean(o.wer for o in items):.1f} %",
            f"{100 * statistics.mean(o.offline_wer for o in items):.1f} %",
            f"{100 * sum(o.wer * o.ref_words for o in items) / words:.1f} %",
            f"{100 * sum(o.offline_wer * o.ref_words for o in items) / words:.1f} %",
            str(sum(o.echoes == 0 for o in items)),
            f"{lost:.1f} s of {total:.0f} s ({100 * lost / total:.1f} %)" if total else "–",
            f"{max(stretches, default=0.0):.2f} s",
            f"{sum(s >= LONG_STRETCH_S for s in stretches)} ({sum(o.heard_offline for o in items)})", str(halluc),
            f"{pct(lat, 50):.2f} s" if lat else "–", f"{pct(lat, 95):.2f} s" if lat else "–"]


HEAD = ("| {first} | items | streamed WER, mean of items | offline WER, mean of items | streamed WER, by words "
        "| offline WER, by words | missed | speech lost | longest lost | lost ≥ 1 s (offline hears words in it) "
        "| hallucinated echoes | p50 | p95 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def summary_table(results: Sequence[HardResult]) -> str:
    """One row per variant: the whole hard stream."""
    rows = [f"| {r.label} | " + " | ".join(summary_cells(r.items, len(r.hallucinations))) + " |" for r in results]
    return HEAD.format(first="variant") + "\n" + "\n".join(rows)


def category_table(r: HardResult) -> str:
    rows = []
    for cat in CATEGORIES:
        items = [o for o in r.items if o.category == cat]
        halluc = sum(c == cat for c, _ in r.hallucinations)
        if cat in r.categories or items or halluc:
            rows.append(f"| {cat} | " + " | ".join(summary_cells(items, halluc)) + " |")
    rows.append("| **all** | " + " | ".join(summary_cells(r.items, len(r.hallucinations))) + " |")
    return HEAD.format(first="category") + "\n" + "\n".join(rows)


def item_table(r: HardResult) -> str:
    head = ("| item | category | echoes | WER | offline WER | speech lost | longest lost | latency | streamed text |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {o.name} | {o.category} | {o.echoes} | {100 * o.wer:.1f} % | {100 * o.offline_wer:.1f} % "
            f"| {o.lost_s:.2f} / {o.speech_s:.2f} s | {max((b - a for a, b in o.stretches), default=0.0):.2f} s "
            f"| {'–' if o.latency_s is None else f'{o.latency_s:.2f} s'} | {md_cell(o.text)} |" for o in r.items]
    return head + "\n" + "\n".join(rows)


def unreferenced_table(r: HardResult) -> str:
    if not r.unreferenced:
        return "No echoes of unreferenced speech."
    head = "| audio window | text |\n|---|---|"
    return head + "\n" + "\n".join(f"| {e.start:.2f}–{e.end:.2f} s | {md_cell(e.text)} |" for e in r.unreferenced)


def hallucination_table(r: HardResult) -> str:
    if not r.hallucinations:
        return "No hallucinated echoes."
    head = "| audio window | category | text |\n|---|---|---|"
    rows = [f"| {e.start:.2f}–{e.end:.2f} s | {cat} | {md_cell(e.text)} |" for cat, e in r.hallucinations]
    return head + "\n" + "\n".join(rows)


def md_cell(text: str, limit: int = 120) -> str:
    t = text.replace("|", "\\|").replace("\n", " ")
    return t if len(t) <= limit else t[:limit - 1] + "…"


# "lost ..." and the relay's end-of-run "unheard speech: N region(s), X s" (not its per-region lines)
LOST_LINE = re.compile(r"lost|unheard speech:|left out by the decoder:", re.IGNORECASE)


def lost_lines(log_text: str) -> list[str]:
    """Lines of the relay's log that report lost or unheard speech (reported verbatim)."""
    return [line for line in log_text.splitlines() if LOST_LINE.search(line)]


def describe_stream(pieces: Sequence[Item], long_minutes: float) -> str:
    total = sum(p.duration_s for p in pieces)
    speech = [p for p in pieces if p.is_speech]
    per_cat = ", ".join(f"{cat} {sum(p.category == cat for p in speech)}" for cat in CATEGORIES
                        if any(p.category == cat for p in speech))
    return (f"{total / 60:.1f} min, {len(speech)} speech items ({per_cat}), "
            f"{sum(p.category == 'noise only' for p in pieces)} noise-only recordings, long session "
            f"{long_minutes:g} min; seed {SEED}")
