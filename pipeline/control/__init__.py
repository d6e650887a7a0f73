"""Local control API (HTTP): Tavus echo-quickstart compatible `POST /send_text_message`, interrupt,
status, health/readiness and Prometheus metrics. See docs/control-api.md.

`pipeline.control.server` (FastAPI, uvicorn) is imported lazily by the daemon, so importing this
package stays cheap; its contracts with the relay and with serve's pool live in `pipeline.control.api`.
"""

from pipeline.control.api import QueueFull, RelayHandle

__all__ = ["QueueFull", "RelayHandle"]
