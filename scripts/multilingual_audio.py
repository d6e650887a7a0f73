"""Multilingual streams for scripts/bench.py (`--stream multilingual`): construction, analysis, targets.

Speech: tests/data/speech/multilingual (real recordings, 11 languages; manifest.tsv gives each clip's `language`
and reference), and for English in the mixed stream the LibriSpeech dev-clean clips of tests/data/speech.

Streams (each replayed by bench.py in real time through its own `echo-relay run`, so each is one conversation
with its own language lock; model base, `asr.language: null`):
- one single-language stream per language: that language's clips in manifest order, each preceded by --gap s
  of digital silence (and the same after the last);
- one mixed stream: a speaker who changes language between turns. The clips of two languages (--ml-mix,
  default es,en) alternate turn by turn, A B A B ..., as many turns of each as the rarer language has clips
  (at most MIX_TURNS_PER_LANGUAGE), joined by the same silences.

Figures:
- Streamed WER (CER for ja and zh; scripts/lang_scoring.py, the tests' scoring): a clip's echoes joined
  (hard_audio.analyse_hard assigns echoes to clips by audio-window overlap), against the reference. Offline:
  the relay's own ASR engine (gate off, as bench.py's offline ceiling) on each whole clip WITH THE LANGUAGE
  GIVEN (`asr.language: <the clip's>`): what the model writes when it is told the language.
  Target: per language, the mean over its clips of the streamed error at most the offline mean + 2 points.
- Latency: the clip's last echo's emitted_at_s minus its true speech end (pipeline.dsp.speech_bounds), as in
  bench.py. Indicative only on these clips, which were not cut for it: several end at their last word (the
  relay hears the end in the silence that follows), and a breath after the last word moves the envelope's end
  (19demarzo_0008: 0.9 s after the last loud region), so a latency can come out negative. The latency target
  of issue 23 is on the clean stream.
- The language of an utterance: the JSONL record's top-level `language` (the relay's echo format from issue 23),
  or, from a relay that does not write it yet, the `language` perception analyzer's result in the record
  (`perception.language.language`, what Whisper detected for that utterance; bench.py turns the analyzer on
  for such a relay, and a result that missed the echo's budget is taken from the `perception` event that
  carries it late). An utterance is in the wrong language when that differs from its clip's manifest language;
  one whose language is unknown is counted apart.
- The lock: the relay's `language` events (GET /events; `reason` "locked" | "switched"). Time to lock = the
  first "locked" event's `t` minus the stream's first speech onset (both on the stream clock). When the relay
  sends no such event ("derived" in the tables), the lock is taken as the first echo from which every later
  echo of the stream has the same language, at its emitted_at_s. Derived, "no wrong language after the lock"
  holds by construction, so the target then also asks that this language be the stream's own.
  Target on single-language streams: no utterance in a wrong language emitted after the lock.
- Mixed stream: every turn with at least MIN_TURN_S of speech (from its first reference region to its true
  speech end) must have echoes, all in its own language.
- Echoes whose audio window overlaps no clip's speech (phantom lines in the silences) are listed per stream.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hard_audio
import lang_scoring
from hard_audio import Item, best_match, md_cell, pct, silence, speech_item

SPEECH = hard_audio.SPEECH
MULTILINGUAL = SPEECH / "multilingual"
SR = hard_audio.SR
ENGLISH = "en"  # from the LibriSpeech dev-clean clips of tests/data/speech (the multilingual set has none)
MIN_TURN_S = 2.0  # mixed-stream target: every turn of this much speech or more in its own language
POINTS = 0.02  # target: streamed error at most offline + 2 points (mean over a language's clips)
MIX_TURNS_PER_LANGUAGE = 3
LOCKED, SWITCHED = "locked", "switched"  # `reason` of the relay's `language` event


# ----------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class MlClip:
    name: str  # path under tests/data/speech
    language: str
    ref: str


def ml_clips() -> list[MlClip]:
    """Every clip of tests/data/speech/multilingual, in manifest order."""
    with (MULTILINGUAL / "manifest.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [MlClip("multilingual/" + r["file"], r["language"], r["reference_transcript"]) for r in rows]


def english_clips() -> list[MlClip]:
    """The LibriSpeech dev-clean clips of tests/data/speech (read English), in manifest order."""
    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [MlClip(r["file"], ENGLISH, r["reference_transcript"])
            for r in rows if r["file"].startswith(hard_audio.LIBRI)]


def clips_of(language: str) -> list[MlClip]:
    return english_clips() if language == ENGLISH else [c for c in ml_clips() if c.language == language]


def languages() -> list[str]:
    """The languages of the multilingual set, in manifest order."""
    return list(dict.fromkeys(c.language for c in ml_clips()))


def load_item(clip: MlClip) -> Item:
    """A clip as a hard_audio speech Item (category = its language): reference regions and true speech end from
    its own envelope."""
    from pipeline.source.file import decode_file

    name = str(Path(clip.name.removeprefix("multilingual/")).with_suffix(""))  # two sources have a test_it.wav
    return speech_item(name, clip.language, decode_file(SPEECH / clip.name), clip.ref)


# ----------------------------------------------------------------------------------------- streams
@dataclass
class MlStream:
    label: str  # "es" or "mixed es+en"
    languages: tuple[str, ...]
    pieces: list[Item]
    mixed: bool = False

    @property
    def speech(self) -> list[Item]:
        return [p for p in self.pieces if p.is_speech]

    @property
    def slug(self) -> str:
        return "ml_" + "_".join(self.languages) + ("_mixed" if self.mixed else "")

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.pieces)


def joined(items: Sequence[Item], gap_s: float) -> list[Item]:
    """Items with `gap_s` of digital silence before each and after the last; offsets set (hard_audio.assemble)."""
    pieces: list[Item] = [silence(gap_s)]
    for it in items:
        pieces += [it, silence(gap_s)]
    return pieces


def single_streams(langs: Sequence[str], gap_s: float, load: Callable[[MlClip], Item] = load_item) -> list[MlStream]:
    return [MlStream(lang, (lang,), joined([load(c) for c in clips_of(lang)], gap_s)) for lang in langs]


def mixed_stream(pair: Sequence[str], gap_s: float, load: Callable[[MlClip], Item] = load_item,
                 turns_per_language: int = MIX_TURNS_PER_LANGUAGE) -> MlStream:
    """Turns alternating between the two languages of `pair`, one clip a turn, A B A B ..."""
    a, b = (clips_of(lang) for lang in pair)
    n = min(len(a), len(b), turns_per_language)
    if n == 0:
        raise ValueError(f"--ml-mix {','.join(pair)}: no clips of {pair[0] if not a else pair[1]}")
    turns = [load(c) for pa, pb in zip(a[:n], b[:n], strict=True) for c in (pa, pb)]
    return MlStream("mixed " + "+".join(pair), tuple(pair), joined(turns, gap_s), mixed=True)


# ----------------------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class Utterance:
    utterance_id: str
    start: float
    end: float
    emitted: float  # the last message's emitted_at_s
    text: str
    language: str | None


@dataclass
class TurnOutcome:
    """One clip of a stream: hard_audio's outcome (echoes, error, latency, lost speech) and its languages."""

    outcome: hard_audio.ItemOutcome
    language: str
    speech_s: float  # true speech length (speech_bounds)
    utterances: list[Utterance] = field(default_factory=list)

    @property
    def wrong(self) -> list[Utterance]:
        return [u for u in self.utterances if u.language is not None and u.language != self.language]

    @property
    def unknown(self) -> int:
        return sum(u.language is None for u in self.utterances)

    @property
    def own_language(self) -> bool:
        return bool(self.utterances) and all(u.language == self.language for u in self.utterances)


@dataclass
class Lock:
    language: str | None
    t: float | None  # stream clock
    source: str  # "event" | "derived" | "none"
    time_to_lock_s: float | None


@dataclass
class MlResult:
    stream: MlStream
    turns: list[TurnOutcome]
    hallucinations: list[Utterance]
    events: list[dict[str, Any]]  # the relay's `language` events
    lock: Lock
    language_source: str  # where the utterances' languages came from: "record", "perception" or "none"
    peak_rss_mb: float = 0.0
    wrong_after_lock: list[Utterance] = field(default_factory=list)

    @property
    def utterances(self) -> list[Utterance]:
        return sorted((u for t in self.turns for u in t.utterances), key=lambda u: u.emitted)

    @property
    def switches(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("reason") == SWITCHED]


def record_language(record: dict[str, Any]) -> tuple[str | None, str]:
    """(language, source) of one JSONL echo record: its top-level `language` (issue 23's format), else the
    `language` perception analyzer's result, else (None, "none")."""
    if "language" in record:
        return record["language"], "record"
    found = ((record.get("perception") or {}).get("language") or {}).get("language")
    return (str(found), "perception") if found else (None, "none")


def late_languages(events: Sequence[dict[str, Any]]) -> dict[str, str]:
    """utterance_id -> language of the `language` analyzer's results that came after their echo (`perception`
    events with late: true)."""
    out = {}
    for e in events:
        found = ((e.get("results") or {}).get("language") or {}).get("language") if e.get("kind") == "perception" \
            else None
        if found:
            out[str(e.get("utterance_id"))] = str(found)
    return out


def utterances(records: Sequence[dict[str, Any]], late: dict[str, str] | None = None
               ) -> tuple[list[Utterance], str]:
    """Echo records grouped by utterance_id (a long text is several messages), in emission order; and where
    their languages came from. `late`: languages of analyzer results that missed their echo."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("event") == "echo":
            groups.setdefault(str(r["utterance_id"]), []).append(r)
    out, sources = [], set()
    for uid, msgs in groups.items():
        lang, source = record_language(msgs[0])
        if lang is None and late and uid in late:
            lang, source = late[uid], "perception"
        sources.add(source)
        out.append(Utterance(uid, float(msgs[0]["audio_start_s"]), float(msgs[0]["audio_end_s"]),
                             max(float(m["emitted_at_s"]) for m in msgs), " ".join(str(m["text"]) for m in msgs), lang))
    source = "record" if "record" in sources else "perception" if "perception" in sources else "none"
    return sorted(out, key=lambda u: u.emitted), source


def find_lock(utts: Sequence[Utterance], events: Sequence[dict[str, Any]], onset_s: float) -> Lock:
    """The conversation's lock: the first `language` event with reason "locked", else derived from the echoes
    (the first echo from which every later one has the same language)."""
    locked = [e for e in events if e.get("reason") == LOCKED]
    if locked:
        t = float(locked[0]["t"])
        return Lock(locked[0].get("language"), t, "event", t - onset_s)
    known = [u for u in utts if u.language is not None]
    if not known:
        return Lock(None, None, "none", None)
    i = len(known) - 1
    while i > 0 and known[i - 1].language == known[-1].language:
        i -= 1
    return Lock(known[i].language, known[i].emitted, "derived", known[i].emitted - onset_s)


def analyse_ml(stream: MlStream, records: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]],
               margins: hard_audio.Interval = (0.0, 0.0)) -> MlResult:
    """Streamed error, latency and languages of every clip of one replayed stream. `events`: the relay's
    `language` and `perception` events."""
    lang_by_ref = {p.ref: p.category for p in stream.speech}
    hres = hard_audio.analyse_hard(stream.label, stream.pieces, records,
                                   lambda ref, hyp: lang_scoring.error_rate(lang_by_ref[ref], ref, hyp), margins)
    utts, source = utterances(records, late_languages(events))
    events = [e for e in events if e.get("kind") == "language"]
    speech = stream.speech
    turns = [TurnOutcome(o, p.category, p.true_end_s - p.regions[0][0])
             for o, p in zip(hres.items, speech, strict=True)]
    spans = [(i, p.speech_span) for i, p in enumerate(speech)]
    halluc = []
    for u in utts:
        i = best_match((u.start, u.end), spans)
        if i is None:
            halluc.append(u)
        else:
            turns[i].utterances.append(u)
    onset = speech[0].speech_span[0] if speech else 0.0
    res = MlResult(stream, turns, halluc, list(events), Lock(None, None, "none", None), source)
    res.lock = find_lock(res.utterances, events, onset)
    lock = res.lock
    if not stream.mixed and lock.t is not None:
        res.wrong_after_lock = [u for t in turns for u in t.wrong if u.emitted >= lock.t]
    return res


# ----------------------------------------------------------------------------------------- figures
def mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def latencies(turns: Sequence[TurnOutcome]) -> list[float]:
    return [t.outcome.latency_s for t in turns if t.outcome.latency_s is not None]


def language_errors(results: Sequence[MlResult]) -> dict[str, tuple[float, float, int]]:
    """language -> (mean streamed error, mean offline error, clips) over the single-language streams."""
    out = {}
    for r in results:
        if r.stream.mixed:
            continue
        for lang in r.stream.languages:
            turns = [t for t in r.turns if t.language == lang]
            out[lang] = (mean([t.outcome.wer for t in turns]), mean([t.outcome.offline_wer for t in turns]), len(turns))
    return out


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s"


def percent(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f} %"


def yes(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def error_target_met(streamed: float, offline: float) -> bool:
    return streamed <= offline + POINTS + 1e-9


def lock_ok(r: MlResult) -> bool | None:
    """No wrong-language utterance after the lock (and, for a derived lock, the lock is the stream's language)."""
    if r.lock.source == "none" or r.language_source == "none":
        return None
    if r.lock.source == "derived" and r.lock.language != r.stream.languages[0]:
        return False
    return not r.wrong_after_lock


def single_table(results: Sequence[MlResult]) -> str:
    head = ("| language | scored by | clips | streamed | offline, language given | target ≤ offline + 2 | met "
            "| missed | p50 | p95 | utterances | wrong language (after the lock) | locked to | time to lock "
            "| lock from | switches | echoes outside speech |\n|" + "---|" * 17)
    rows = []
    for r in results:
        if r.stream.mixed:
            continue
        lang = r.stream.languages[0]
        streamed, offline = mean([t.outcome.wer for t in r.turns]), mean([t.outcome.offline_wer for t in r.turns])
        lat = latencies(r.turns)
        n_wrong = sum(len(t.wrong) for t in r.turns)
        unknown = sum(t.unknown for t in r.turns)
        rows.append(
            f"| {lang} | {lang_scoring.metric(lang)} | {len(r.turns)} | {percent(streamed)} | {percent(offline)} "
            f"| {percent(offline + POINTS)} | {yes(error_target_met(streamed, offline))} "
            f"| {sum(t.outcome.echoes == 0 for t in r.turns)} | {ms(pct(lat, 50) if lat else None)} "
            f"| {ms(pct(lat, 95) if lat else None)} | {len(r.utterances)} "
            f"| {n_wrong if r.language_source != 'none' else 'n/a'} ({len(r.wrong_after_lock)})"
            f"{f', {unknown} unknown' if unknown else ''} "
            f"| {r.lock.language or '–'} | {ms(r.lock.time_to_lock_s)} | {r.lock.source} | {len(r.switches)} "
            f"| {len(r.hallucinations)} |")
    return head + "\n" + "\n".join(rows)


def mixed_table(r: MlResult) -> str:
    head = ("| turn | language | speech | echoes | utterance languages | own language | streamed | offline, language "
            "given | latency | streamed text |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {t.outcome.name} | {t.language} | {t.speech_s:.1f} s | {t.outcome.echoes} "
            f"| {', '.join(u.language or '?' for u in t.utterances) or '–'} | {yes(t.own_language)} "
            f"| {percent(t.outcome.wer)} | {percent(t.outcome.offline_wer)} | {ms(t.outcome.latency_s)} "
            f"| {md_cell(t.outcome.text)} |" for t in r.turns]
    return head + "\n" + "\n".join(rows)


def mixed_summary(r: MlResult) -> str:
    """One line: per language streamed vs offline error, latency, switches, turns in their own language."""
    parts = []
    for lang in r.stream.languages:
        turns = [t for t in r.turns if t.language == lang]
        parts.append(f"{lang} ({lang_scoring.metric(lang)}) streamed {percent(mean([t.outcome.wer for t in turns]))}"
                     f" vs offline {percent(mean([t.outcome.offline_wer for t in turns]))}")
    lat = latencies(r.turns)
    n, good, _ = mixed_ok(r)
    return (f"{'; '.join(parts)}; latency p50 {ms(pct(lat, 50) if lat else None)}, p95 "
            f"{ms(pct(lat, 95) if lat else None)}; {len(r.switches)} switch event(s); {good} of {n} turns of "
            f"≥ {MIN_TURN_S:g} s in their own language; {len(r.hallucinations)} echoes outside speech.")


def clip_table(results: Sequence[MlResult]) -> str:
    head = ("| clip | language | echoes | utterance languages | streamed | offline, language given | latency "
            "| streamed text |\n|---|---|---|---|---|---|---|---|")
    rows = [f"| {t.outcome.name} | {t.language} | {t.outcome.echoes} "
            f"| {', '.join(u.language or '?' for u in t.utterances) or '–'} | {percent(t.outcome.wer)} "
            f"| {percent(t.outcome.offline_wer)} | {ms(t.outcome.latency_s)} | {md_cell(t.outcome.text)} |"
            for r in results if not r.stream.mixed for t in r.turns]
    return head + "\n" + "\n".join(rows)


def events_table(r: MlResult) -> str:
    if not r.events:
        return "No `language` events (the relay sent none, or its event stream was not reachable)."
    head = "| t (stream) | language | probability | previous | reason |\n|---|---|---|---|---|"
    rows = [f"| {float(e.get('t', float('nan'))):.2f} s | {e.get('language')} | {e.get('probability')} "
            f"| {e.get('previous')} | {e.get('reason')} |" for e in r.events]
    return head + "\n" + "\n".join(rows)


def hallucination_table(results: Sequence[MlResult]) -> str:
    rows = [f"| {r.stream.label} | {u.start:.2f}–{u.end:.2f} s | {u.language or '?'} | {md_cell(u.text)} |"
            for r in results for u in r.hallucinations]
    if not rows:
        return "No echoes outside the clips' speech."
    return "| stream | audio window | language | text |\n|---|---|---|---|\n" + "\n".join(rows)


def mixed_ok(r: MlResult) -> tuple[int, int, bool | None]:
    """(turns of MIN_TURN_S or more, those in their own language, target met)."""
    long_turns = [t for t in r.turns if t.speech_s >= MIN_TURN_S]
    good = sum(t.own_language for t in long_turns)
    return len(long_turns), good, None if r.language_source == "none" else good == len(long_turns)


def target_rows(results: Sequence[MlResult]) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) of the multilingual targets."""
    rows: list[tuple[str, str, bool | None]] = []
    errors = language_errors(results)
    failing = [lang for lang, (s, o, _) in errors.items() if not error_target_met(s, o)]
    figure = ", ".join(f"{lang} {percent(s)} vs {percent(o)}" for lang, (s, o, _) in errors.items())
    rows.append(("every language: streamed WER (CER ja, zh) ≤ offline (language given) + 2 points, mean per language",
                 figure + (f"; over: {', '.join(failing)}" if failing else ""), not failing if errors else None))
    singles = [r for r in results if not r.stream.mixed]
    verdicts = [lock_ok(r) for r in singles]
    bad = [r.stream.label for r, v in zip(singles, verdicts, strict=True) if v is False]
    sources = sorted({r.lock.source for r in singles})
    rows.append(("single-language streams: no utterance in a wrong language after the lock",
                 f"{sum(len(r.wrong_after_lock) for r in singles)} after the lock (lock from {'/'.join(sources)})"
                 + (f"; failing: {', '.join(bad)}" if bad else ""),
                 None if any(v is None for v in verdicts) else not bad))
    for r in results:
        if r.stream.mixed:
            n, good, ok = mixed_ok(r)
            rows.append((f"{r.stream.label}: every turn of ≥ {MIN_TURN_S:g} s in its own language",
                         f"{good} of {n} turns", ok))
    return rows


def describe(streams: Sequence[MlStream]) -> str:
    return "; ".join(f"{s.label}: {len(s.speech)} clips, {s.duration_s:.0f} s" for s in streams)
