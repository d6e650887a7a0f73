"""Reliability: the short form of the soak (scripts/soak.py): ~2 minutes of real speech at 24x real time
through the whole relay (real VAD, the Daily sink on the stand-in, tiny.en for a share of utterances)
with faults injected at random from a fixed seed, at 4x the default fault rates so every kind occurs.
The script itself checks that nothing is lost, that every injected ASR/transform fault is accounted
as its drop reason, that metrics agree with the ledger, and that threads, fds and RSS do not leak.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_short_soak_loses_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--minutes", "2", "--seed", "3",
                           "--speed", "24", "--intensity", "4", "--real-share", "0.2", "--log", str(tmp_path / "log")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert re.search(r"^lost:\s+0 ", out, re.M), out
    assert out.rstrip().endswith("OK"), out
    injected = {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+(?: \(\w+\))?)\s+(\d+)$", out, re.M)}
    assert sum(injected.values()) >= 10, out
    assert injected.get("asr_error", 0) + injected.get("asr_past_deadline", 0) >= 1, out
    assert any(k.startswith("transform_") for k in injected), out
    produced = int(re.search(r"^produced \(utterances closed by the VAD\): (\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    assert produced >= 10, out
