#!/usr/bin/env python
"""Separation table of each turn-end signal on the pause dataset, and the logistic combination's fit.

    .venv/bin/python scripts/pause_dataset.py            # -> out/pauses.json
    .venv/bin/python scripts/turn_fit.py                 # tables, coefficients, operating points
    .venv/bin/python scripts/turn_fit.py --features punct,unfinished,smart_turn

Positives are turn ends (each clip's last pause); negatives are the pauses the endpointer must not
finish: clause boundaries and mid-phrase pauses. Sentence ends inside a clip are neither (finishing
there is a split, not a mid-sentence one) and are shown apart. For each signal:
- AUC: the chance that a random turn end scores above a random negative (ties count half), on the
  pauses where the signal exists (n);
- turn ends finished early at the threshold that finishes at most 0 % / 10 % of the negatives.

The combination is a logistic regression on standardised signals (L2, Newton's method; a missing
signal contributes 0, its mean), scored in-sample and by leave-one-clip-out (each clip's pauses
scored by the fit without that clip). The rule's replay then finishes a pause when its score reaches
the threshold and the pause lasts `endpoint.turn_pause_ms`, else it falls back to the graded policy,
and counts what matters: mid-sentence splits (a clause or mid-phrase pause shorter than the hangover
that gets finished) and the silence each turn end waits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import EndpointSettings  # noqa: E402
from pipeline.endpoint import required_silence_ms  # noqa: E402
from pipeline.turn.prosody import Prosody  # noqa: E402
from pipeline.turn.rule import decide  # noqa: E402

NEGATIVE = ("clause", "mid_phrase")
HANGOVER_MS = 700  # vad.hangover_ms of config.yaml
SIGNALS: dict[str, Callable[[dict], float | None]] = {  # type: ignore[type-arg]
    # Whisper's probability of the final . ? ! (0 when the text does not end a sentence: no period at all)
    "punct": lambda r: None if r["text"].strip() == "" else (r["final_punct_prob"] or 0.0) if r["ends_sentence"]
    else 0.0,
    "unfinished": lambda r: None if r["unfinished"] is None else float(r["unfinished"]),
    "smart_turn": lambda r: r["smart_turn"],
    "smart_turn_250ms": lambda r: r["smart_turn_late"],
    "final_slope": lambda r: r["prosody"]["final_slope_st_per_s"],
    "final_pitch": lambda r: r["prosody"]["final_pitch_st"],
    "lengthening": lambda r: r["prosody"]["lengthening"],
    "final_level": lambda r: r["prosody"]["final_level_db"],
    "energy_decay": lambda r: r["prosody"]["decay_db_per_s"],
}


def auc(pos: list[float], neg: list[float]) -> float:
    if not pos or not neg:
        return float("nan")
    p, n = np.array(pos)[:, None], np.array(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (len(pos) * len(neg)))


def early_at(pos: list[float], neg: list[float], share: float) -> tuple[float, float]:
    """(share of positives at or above the lowest threshold that lets at most `share` of negatives reach it,
    that threshold)."""
    cands = sorted(set(pos) | set(neg) | {float("inf")})
    for t in cands:
        if np.mean([v >= t for v in neg]) <= share + 1e-9:
            return float(np.mean([v >= t for v in pos])), t
    return 0.0, float("inf")


def separation(rows: list[dict], scores: list[float | None], name: str) -> str:  # type: ignore[type-arg]
    pos = [s for r, s in zip(rows, scores, strict=True) if s is not None and r["label"] == "turn_end"]
    neg = [s for r, s in zip(rows, scores, strict=True) if s is not None and r["label"] in NEGATIVE]
    sen = [s for r, s in zip(rows, scores, strict=True) if s is not None and r["label"] == "sentence_end"]
    a = auc(pos, neg)
    sign = 1.0
    if a < 0.5:  # lower means "turn end" for this signal: flip it for the table
        sign, a = -1.0, 1 - a
        pos, neg, sen = [-v for v in pos], [-v for v in neg], [-v for v in sen]
    e0, t0 = early_at(pos, neg, 0.0)
    e10, t10 = early_at(pos, neg, 0.10)
    return (f"| {name} | {'high' if sign > 0 else 'low'} | {len(pos)}/{len(neg)}/{len(sen)} | {a:.2f} "
            f"| {100 * e0:.0f} % (t {sign * t0:.3g}) | {100 * e10:.0f} % (t {sign * t10:.3g}) |")


def design(rows: list[dict], names: list[str], stats: tuple[np.ndarray, np.ndarray] | None = None  # type: ignore[type-arg]
           ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    raw = np.array([[np.nan if SIGNALS[n](r) is None else float(SIGNALS[n](r)) for n in names] for r in rows])  # type: ignore[arg-type]
    if stats is None:
        stats = (np.nanmean(raw, axis=0), np.nanstd(raw, axis=0) + 1e-9)
    z = (raw - stats[0]) / stats[1]
    return np.nan_to_num(z, nan=0.0), stats


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Weights (bias first) of an L2-regularised logistic regression, by Newton's method."""
    xb = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(xb.shape[1])
    reg = l2 * np.eye(xb.shape[1])
    reg[0, 0] = 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-xb @ w))
        grad = xb.T @ (p - y) + reg @ w
        hess = xb.T @ (xb * (p * (1 - p))[:, None]) + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(w[0] + x @ w[1:])))


def replay(rows: list[dict], scores: list[float], threshold: float, turn_ms: int, graded: EndpointSettings  # type: ignore[type-arg]
           ) -> tuple[int, int, list[float]]:
    """(clause/mid-phrase pauses shorter than the hangover that get finished: mid-sentence splits, sentence-end
    pauses shorter than the hangover that get finished, silence each turn end waits in s)."""
    mid, sent, waits = 0, 0, []
    for r, s in zip(rows, scores, strict=True):
        need = turn_ms if s >= threshold else required_silence_ms(r["text"], r["final_punct_prob"], graded,
                                                                  HANGOVER_MS)
        need = max(need, 150)
        # A pause as long as the hangover closes the utterance whatever the rule: not the rule's split.
        finished = need - 1e-6 <= r["length_s"] * 1000 < HANGOVER_MS - 1e-6
        if r["label"] == "turn_end":
            waits.append(need / 1000)
        elif finished and r["label"] in NEGATIVE:
            mid += 1
        elif finished:
            sent += 1
    return mid, sent, waits


def shipped(rows: list[dict]) -> None:  # type: ignore[type-arg]
    """The rule as the relay runs it (pipeline.turn.rule.decide with config.yaml's endpoint defaults, vetoes and
    fallbacks included) against the graded policy alone, per set of clips."""
    on, off = EndpointSettings(), EndpointSettings(turn_rule=False)
    print("\nThe shipped rule (endpoint defaults) against the graded policy alone, by set:")
    print("| set | clips | graded: mid-sentence splits | rule: mid-sentence splits | rule: turn ends finished early "
          "| turn-end wait median, graded -> rule | decided by |\n|---|---|---|---|---|---|---|")
    groups = {"all": rows, **{s: [r for r in rows if r["set"] == s] for s in sorted({r["set"] for r in rows})},
              "bench clips (librispeech dev-clean)": [r for r in rows if "librispeech_dev_clean" in r["clip"]]}
    for name, group in groups.items():
        out = {}
        for label, ep in (("graded", off), ("rule", on)):
            mid, waits, why = 0, [], []
            for r in group:
                d = decide(r["text"], r["final_punct_prob"], r["language"], Prosody(**r["prosody"]), ep, HANGOVER_MS)
                need = max(d.silence_ms, 150)
                if r["label"] == "turn_end":
                    waits.append(need / 1000)
                elif r["label"] in NEGATIVE and need <= r["length_s"] * 1000 < HANGOVER_MS:
                    mid += 1
                why.append(d.rule)
            out[label] = (mid, waits, why)
        early = sum(1 for w, g in zip(out["rule"][1], out["graded"][1], strict=True) if w < g)
        counts = {k: out["rule"][2].count(k) for k in ("turn", "unfinished", "graded")}
        print(f"| {name} | {len({r['clip'] for r in group})} | {out['graded'][0]} | {out['rule'][0]} "
              f"| {early}/{len(out['rule'][1])} "
              f"| {np.median(out['graded'][1]):.2f} -> {np.median(out['rule'][1]):.2f} s "
              f"| {counts} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "out" / "pauses.json")
    ap.add_argument("--features", default="punct,lengthening,energy_decay",
                    help=f"signals combined (of {', '.join(SIGNALS)})")
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the fit")
    ap.add_argument("--turn-ms", type=int, default=EndpointSettings().turn_pause_ms,
                    help="silence a pause scoring over the threshold waits (default: endpoint.turn_pause_ms)")
    args = ap.parse_args()
    rows = json.loads(args.data.read_text())
    names = [n for n in args.features.split(",") if n]
    clips = sorted({r["clip"] for r in rows})
    count = {lab: sum(r["label"] == lab for r in rows) for lab in ("turn_end", "sentence_end", "clause", "mid_phrase")}
    print(f"{len(rows)} pauses in {len(clips)} clips: {count}\n")
    print("| signal | turn end when | n (turn ends/negatives/sentence ends) | AUC | turn ends early at 0 % of "
          "negatives | ... at <= 10 % |\n|---|---|---|---|---|---|")
    for n in SIGNALS:
        print(separation(rows, [SIGNALS[n](r) for r in rows], n))

    y = np.array([r["label"] == "turn_end" for r in rows], dtype=float)
    keep = np.array([r["label"] != "sentence_end" for r in rows])  # sentence ends are neither class
    x, stats = design(rows, names)
    w = fit_logistic(x[keep], y[keep], args.l2)
    inside = predict(w, x)
    loco = np.zeros(len(rows))
    for c in clips:
        out = np.array([r["clip"] == c for r in rows])
        train = keep & ~out
        xt, st = design([r for r, k in zip(rows, train, strict=True) if k], names)
        wt = fit_logistic(xt, y[train], args.l2)
        loco[out] = predict(wt, design([r for r, o in zip(rows, out, strict=True) if o], names, st)[0])
    print(separation(rows, list(inside), f"combined ({'+'.join(names)}), in-sample"))
    print(separation(rows, list(loco), f"combined ({'+'.join(names)}), leave-one-clip-out"))

    print("\nCoefficients on standardised signals (z = (x - mean) / std; missing: z = 0):")
    print(f"  bias {w[0]:+.3f}")
    for n, wi, m, s in zip(names, w[1:], stats[0], stats[1], strict=True):
        print(f"  {n:<16} weight {wi:+.3f}   mean {m:.4g}   std {s:.4g}   (raw weight {wi / s:+.4g})")
    print(f"  as raw weights: logit = {w[0] - float(np.sum(w[1:] * stats[0] / stats[1])):+.4f} "
          + " ".join(f"{wi / s:+.4g}*{n}" for n, wi, s in zip(names, w[1:], stats[1], strict=True)))

    graded = EndpointSettings()
    base_mid, base_sent, base_waits = replay(rows, [0.0] * len(rows), 2.0, args.turn_ms, graded)
    print(f"\nReplay (turn_pause_ms {args.turn_ms}); graded policy alone: {base_mid} mid-sentence splits, "
          f"{base_sent} sentence-end splits, turn-end wait median {np.median(base_waits):.2f} s")
    print("| threshold | scores | mid-sentence splits | sentence-end splits | turn ends at turn_pause_ms | "
          "turn-end wait median / p95 |\n|---|---|---|---|---|---|")
    for label, sc in (("in-sample", inside), ("leave-one-clip-out", loco)):
        for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9):
            mid, sent, waits = replay(rows, list(sc), t, args.turn_ms, graded)
            fast = sum(1 for r, s in zip(rows, sc, strict=True) if r["label"] == "turn_end" and s >= t)
            print(f"| {t} | {label} | {mid} | {sent} | {fast}/{count['turn_end']} "
                  f"| {np.median(waits):.2f} / {np.percentile(waits, 95):.2f} s |")
    shipped(rows)
    print("\nPer pause (combined score in-sample / leave-one-clip-out):")
    for r, a, b in zip(rows, inside, loco, strict=True):
        print(f"  {Path(r['clip']).stem[:18]:<18} {r['start_s']:6.2f} {r['length_s']:4.2f} {r['label']:<12} "
              f"{a:.3f} {b:.3f}  …{r['text'][-36:]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
