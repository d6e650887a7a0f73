#!/bin/sh
# The image's entrypoint (Dockerfile): `docker run IMAGE` serves, `docker run IMAGE run --speed 0` or any other
# echo-relay command runs that, and options alone (`docker run IMAGE --max-relays 4`) go to `serve`.
# `exec` makes echo-relay the container's main process, so `docker stop`'s SIGTERM reaches it: the first
# SIGTERM refuses new relays and drains the running ones (README "Deploy").
set -eu

if [ "$#" -eq 0 ]; then
  set -- serve
elif [ "${1#-}" != "$1" ] && [ "$1" != "--version" ] && [ "$1" != "-h" ] && [ "$1" != "--help" ]; then
  set -- serve "$@"
fi

# The image's config (deploy/docker/config.yaml) binds 0.0.0.0, which needs control.token: say which
# variable sets it before echo-relay refuses to listen (exit status 5).
if [ "$1" = "serve" ] && [ -z "${ECHO_RELAY_TOKEN:-}" ]; then
  echo "echo-relay-entrypoint: ECHO_RELAY_TOKEN is not set; the control API on 0.0.0.0 needs it" \
       "(docker run -e ECHO_RELAY_TOKEN=...)" >&2
fi

exec echo-relay "$@"
