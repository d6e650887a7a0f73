"""Test doubles that run on this machine, for tests and manual trials without the internet.

- `pipeline.testing.fake_tavus`: `FakeTavusServer`, a real HTTP server on 127.0.0.1 faking the
  Tavus REST API v2 (personas, conversations, auth, errors, fault injection). Also runnable:
  `python -m pipeline.testing.fake_tavus --port 8765 --api-key test`.
- `pipeline.testing.fake_daily`: the stand-in for daily-python's call client.

Submodules are imported explicitly (nothing is imported here), so using one double never pulls in
the dependencies of another.
"""
