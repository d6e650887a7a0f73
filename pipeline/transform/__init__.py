"""Transform stage: an ordered chain of `(text, meta) -> text | None` steps (None drops the utterance).

See `chain.py` for the timeout and error rules, `builtins.py` for the built-in steps, and
docs/transforms.md for writing your own.
"""

from pipeline.transform.base import OptionError, Step, StepResult
from pipeline.transform.builtins import BUILTINS
from pipeline.transform.chain import (
    BoundStep,
    StepDrop,
    StepTiming,
    TransformChain,
    TransformOutcome,
    build_chain,
)
from pipeline.transform.webhook import WebhookError, WebhookStep

__all__ = [
    "BUILTINS",
    "BoundStep",
    "OptionError",
    "Step",
    "StepDrop",
    "StepResult",
    "StepTiming",
    "TransformChain",
    "TransformOutcome",
    "WebhookError",
    "WebhookStep",
    "build_chain",
]
