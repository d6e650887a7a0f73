"""Whisper's languages: ISO codes (what `asr.language`, `Transcript.language` and the event stream carry) and
their English names (what Tavus's `properties.language` takes, lower case, as in Whisper's own tokenizer table).

Pure data, no imports: the config validates `asr.language` / `asr.languages` against it without loading a model.
"""

from __future__ import annotations

AUTO = "auto"  # asr.language: detect the conversation's language and lock it (null means the same)
MULTILINGUAL = "multilingual"  # Tavus properties.language when the relay detects the language itself

# The 100 languages of the multilingual Whisper models, in the order of their tokens (whisper/tokenizer.py).
NAMES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}


def name(code: str) -> str:
    """The English name of a Whisper language code (the code itself when it is not one)."""
    return NAMES.get(code, code)


def check_code(code: str) -> str:
    """`code` lower-cased, or ValueError naming the codes (a name such as "spanish" is taken too)."""
    c = code.strip().lower()
    if c in NAMES:
        return c
    by_name = {v: k for k, v in NAMES.items()}
    if c in by_name:
        return by_name[c]
    raise ValueError(f"{code!r} is not a Whisper language code (e.g. en, es, de, fr, zh, hi; all: "
                     f"{', '.join(sorted(NAMES))})")
