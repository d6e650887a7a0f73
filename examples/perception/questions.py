"""The README's "Perception" example: a transform step that uses the built-in `pitch` analyzer's result.

    perception:
      analyzers: [{analyzer: pitch}]
    transform:
      steps: [{step: filler_words}, {step: "questions:by_intonation"}]

A sentence whose final intonation rises (`final_contour: rising`) gets a question mark. Tested in
tests/test_perception.py (the README's copy must stay the same as this one).
"""

from typing import Any


def by_intonation(text: str, meta: Any) -> str:
    rising = (meta.perception.get("pitch") or {}).get("final_contour") == "rising"
    return text.rstrip(".!") + "?" if rising and not text.endswith("?") else text
