"""Turn-end detection at a pause: is this a breath between clauses or the end of the speaker's turn?

- `words`: per-language function words (a transcript ending in one is unfinished);
- `prosody`: pitch, lengthening and energy cues of the speech before the pause (pure numpy);
- `rule`: the logistic combination fitted by scripts/turn_fit.py, with the graded policy
  (pipeline/endpoint.py) as the fallback when a signal is missing.
"""
