"""The `echo-relay` executable (and `python -m pipeline`): stop signals are taken care of before anything
heavy is imported (pipeline/signals.py), then the command line runs (pipeline/cli.py)."""

from __future__ import annotations


def main() -> int:
    from pipeline.signals import install_early

    install_early()
    from pipeline.cli import main as cli_main

    return cli_main()
