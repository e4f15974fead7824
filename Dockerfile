# The local development chain for docker-compose's `chain` service (`--target chain`): anvil
# from the npm package pinned in package-lock.json, in a small Node image, its chain kept in
# /data. Linux amd64 only (the lock pins @foundry-rs/anvil-linux-amd64).
FROM node:20-slim AS chain
WORKDIR /chain
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error \
    && test -x node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil \
    && mkdir /data && chown node:node /data
USER node
EXPOSE 8545
ENTRYPOINT ["/chain/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil", "--host", "0.0.0.0", "--port", "8545", \
            "--state", "/data/anvil-state.json", "--state-interval", "5"]

# The marketplace image (the default target): web (granian), Celery worker and beat, and the
# simulated fleet all run from it with different commands (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GPGPU_VAR_DIR=/var/lib/gpgpu \
    STATIC_ROOT=/app/staticfiles

RUN useradd --create-home --uid 10001 --user-group gpgpu
WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .
# The agent package: the marketplace verifies usage signatures with its wire contract
# (gpgpu_agent.protocol), and the compose `agent` service runs `gpgpu-agent`. Its dependencies
# are in requirements.txt already.
# Editable, so the demo profile's simulated agent finds its fake driver (gpgpu_agent_testing, which
# the agent's own wheel does not ship).
RUN pip install --no-deps -e ./agent
# Static files (admin, API docs) are collected into the image and served by WhiteNoise.
# The var dir (and its demo/, beat/, chain/ and metrics/ subfolders, volumes in docker-compose) belongs to the app user.
RUN python manage.py collectstatic --noinput -v 0 \
    && mkdir -p "$GPGPU_VAR_DIR/demo" "$GPGPU_VAR_DIR/beat" "$GPGPU_VAR_DIR/chain" "$GPGPU_VAR_DIR/metrics" \
    && mkdir -p /var/lib/gpgpu-agent \
    && chown -R gpgpu:gpgpu "$GPGPU_VAR_DIR" /var/lib/gpgpu-agent

USER gpgpu
EXPOSE 8000
# web: see docker-compose.yml's web.
CMD ["granian", "--interface", "wsgi", "--host", "0.0.0.0", "--port", "8000", "--workers", "3", "--blocking-threads", "4", \
     "--http", "1", "--no-ws", "--respawn-failed-workers", "--workers-kill-timeout", "5", "--access-log", \
     "marketplace.wsgi:application"]
