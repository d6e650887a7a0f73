"""A translation step for any target language, through the built-in `webhook` step (docs/transforms.md).

Whisper translates into English only (`asr.task: translate`). For another target, run this small adaptor beside
the relay: it takes the webhook step's JSON (`text`, `language`: the language the ASR heard) and asks a
LibreTranslate-compatible server (`POST /translate` with `q`, `source`, `target`, `format`; its answer's
`translatedText`) for the translation, and answers the step `{"text": ...}`. The step declares what it writes
(`output_language`), so later steps, the JSONL record and the Tavus conversation (`properties.language`) follow:

    python examples/transforms/translate_hook.py --target de --translator http://127.0.0.1:5000 --port 8090

    transform:
      steps:
        - {step: filler_words}
        - {step: webhook, url: "http://127.0.0.1:8090/", output_language: de, timeout_s: 3.0}

Standard library only. The target must be a code both sides know; the translator's own errors become a 502
here, which the webhook step treats as a failure (its `on_error`: `pass` echoes the untranslated text, `drop`
echoes nothing).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRANSLATE_TIMEOUT_S = 2.5  # below the step's timeout_s (3.0 above), so the step hears the reason


def translate(translator: str, text: str, source: str | None, target: str) -> str:
    """One LibreTranslate `/translate` call; ValueError with the server's message when it refuses."""
    body = json.dumps({"q": text, "source": source or "auto", "target": target, "format": "text"}).encode()
    req = urllib.request.Request(translator.rstrip("/") + "/translate", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TRANSLATE_TIMEOUT_S) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ValueError(f"translator answered {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        raise ValueError(f"translator unreachable or unreadable: {exc}") from None
    translated = answer.get("translatedText") if isinstance(answer, dict) else None
    if not isinstance(translated, str):
        raise ValueError("translator answered without translatedText")
    return translated


def make_server(host: str, port: int, translator: str, target: str) -> ThreadingHTTPServer:
    class Hook(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            try:
                step = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                text, source = step["text"], step.get("language")
            except (ValueError, KeyError, TypeError):
                self._reply(400, {"error": "expected the webhook step's JSON object with 'text'"})
                return
            if source == target:  # already in the target language: unchanged
                self._reply(200, {"text": text})
                return
            try:
                self._reply(200, {"text": translate(translator, text, source, target)})
            except ValueError as exc:
                self._reply(502, {"error": str(exc)})

    server = ThreadingHTTPServer((host, port), Hook)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="language code to translate into (e.g. de)")
    parser.add_argument("--translator", default="http://127.0.0.1:5000", help="LibreTranslate-compatible URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    make_server(args.host, args.port, args.translator, args.target).serve_forever()


if __name__ == "__main__":
    main()
