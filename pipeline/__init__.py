"""echo-relay: relay speech to a Tavus persona in echo mode.

Stages (one subpackage each): source -> vad -> asr -> transform -> sink, wired by `pipeline.relay`.
"""

__version__ = "0.1.0"
