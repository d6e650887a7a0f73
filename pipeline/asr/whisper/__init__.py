"""faster-whisper (CTranslate2) engine, tuned for per-utterance latency.

One utterance (already segmented by our VAD) is decoded as one Whisper window, calling CTranslate2 directly:

    engine.py   load and warm up the model; batch the windows several utterances ask for at once
    plan.py     one utterance: short window -> full window -> sampled fallbacks; second opinion; the gate
    decoder.py  the CTranslate2 calls: encode, detect language, generate, sentence-end probability
    prompts.py  per-language tokenizer and prompt (initial prompt, hotwords, committed beginning)
    window.py   window sizes and token budget (pure), the request and decode that pass between them
"""

from pipeline.asr.whisper.engine import FasterWhisperEngine, load_whisper_model
from pipeline.asr.whisper.window import SHORT_WINDOW_MAX_S

__all__ = ["SHORT_WINDOW_MAX_S", "FasterWhisperEngine", "load_whisper_model"]
