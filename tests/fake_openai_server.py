"""A stand-in OpenAI-compatible transcription server on 127.0.0.1, for the openai-http engine's tests.

`POST /v1/audio/transcriptions` (and `/v1/audio/translations`, refusing a `language` field) validates the
upload like a real server (multipart form, a 16 kHz mono 16-bit WAV in `file`, a `model` field), records it,
then answers with the next scripted reply or 200 {"text": default_text}. `GET /v1/models` answers a model
list (the engine's reachability probe). `required_key` makes both answer 401 without `Authorization: Bearer
<key>`. `stop()` and `start()` take the server down and bring it back on the same port (a server restart seen
from the relay).
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import wave
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"  # the same form, into English; OpenAI's takes no `language` field
MODELS = "/v1/models"


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-able, or bytes sent as text/plain
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-request (a cancelled speculative decode) is not the server's error."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeTranscriptionServer:
    def __init__(self, port: int = 0) -> None:
        self.script: list[tuple[int, Any, float] | Reply] = []
        self.default_text = "Hello world."
        self.default_reply: Reply | None = None  # answers every request once the script is used up
        self.required_key: str | None = None
        self.requests: list[dict[str, Any]] = []  # transcription requests (POST), in arrival order
        self.probes: list[dict[str, Any]] = []  # GET requests
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return self.base + TRANSCRIPTIONS

    def _next_reply(self) -> Reply:
        if self.script:
            item = self.script.pop(0)
            return item if isinstance(item, Reply) else Reply(*item)
        return self.default_reply or Reply(200, {"text": self.default_text})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                return server.required_key is None or \
                    self.headers.get("Authorization") == f"Bearer {server.required_key}"

            def do_GET(self) -> None:
                server.probes.append({"path": self.path, "t": time.monotonic(),
                                      "auth": self.headers.get("Authorization")})
                if not self._authorised():
                    return self._reply(401, {"error": {"message": "Incorrect API key provided"}})
                if self.path != MODELS:
                    return self._reply(404, {"error": {"message": "not found"}})
                return self._reply(200, {"object": "list", "data": [{"id": "whisper-1", "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                record: dict[str, Any] = {"path": self.path, "auth": self.headers.get("Authorization"),
                                          "fields": {}, "wav": None, "error": None, "t": time.monotonic()}
                server.requests.append(record)
                if not self._authorised():
                    return self._reply(401, {"error": {"message": "Incorrect API key provided"}})
                if self.path not in (TRANSCRIPTIONS, TRANSLATIONS):
                    return self._reply(404, {"error": {"message": "not found"}})
                ctype = self.headers.get("Content-Type", "")
                if not ctype.startswith("multipart/form-data"):
                    return self._reply(400, {"error": {"message": "expected multipart/form-data"}})
                msg = BytesParser(policy=policy.default).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    if name == "file":
                        record["filename"] = part.get_filename()
                        record["file_type"] = part.get_content_type()
                        try:
                            with wave.open(io.BytesIO(payload), "rb") as w:
                                frames = w.getnframes()
                                record["wav"] = {"channels": w.getnchannels(), "width": w.getsampwidth(),
                                                 "rate": w.getframerate(), "frames": frames,
                                                 "samples": np.frombuffer(w.readframes(frames), "<i2")}
                        except (wave.Error, EOFError) as exc:
                            record["error"] = str(exc)
                    else:
                        record["fields"][name] = payload.decode()
                wav_info = record["wav"]
                if wav_info is None:
                    problem = f"no valid WAV in 'file' ({record['error']})"
                    return self._reply(400, {"error": {"message": problem}})
                if (wav_info["channels"], wav_info["width"], wav_info["rate"]) != (1, 2, 16000):
                    return self._reply(400, {"error": {"message": "expected 16 kHz mono 16-bit"}})
                if "model" not in record["fields"]:
                    return self._reply(400, {"error": {"message": "model is required"}})
                if self.path == TRANSLATIONS and "language" in record["fields"]:
                    return self._reply(400, {"error": {"message": "Unrecognized request argument: language"}})
                reply = server._next_reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                return self._reply(reply.status, reply.body, reply.headers)

        return Handler

    def start(self) -> None:
        """Listen (again, on the same port after `stop`)."""
        assert self._httpd is None
        httpd = _Server(("127.0.0.1", self._port), self._handler())  # SO_REUSEADDR: rebinds at once
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: new connections are refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeTranscriptionServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
