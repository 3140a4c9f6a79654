# syntax=docker/dockerfile:1
#
# invite-worker: the production image.
#
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" -t invite-worker:0.1.0 .
#
# Four stages: uv, tini, build, runtime. `build` installs the locked runtime dependencies and
# the app into /opt/venv; tests/deploy/test_deploy.py replays that stage's ENV, WORKDIR, COPY and RUN
# lines on the CI machine (same lock file, same uv, same commands), so keep them plain: no paths
# but /opt/venv and /src, no shell tricks. `runtime` gets /opt/venv, tini, and nothing else.

# uv, pinned: the same release .ci/run installs, which the tests check.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# Every other stage starts from the same Python image, written out in each FROM (a shared stage
# would have to carry the runtime's labels, and hadolint wants them where they are inherited):
# the venv's interpreter link (/usr/local/bin/python3.11) must exist, at the same version, where
# the venv is copied to; tests/deploy/test_deploy.py checks that the three are one. The minor version is
# pinned by the tag (the lock holds cp311 wheels); patch releases follow the tag so that a rebuild
# picks up security fixes; the release pipeline pins the digest (`python:…@sha256:…`).
FROM python:3.11-slim-bookworm AS tini
# tini as PID 1: it forwards SIGTERM to the worker (which then drains in-flight commands) and
# reaps zombies. Without it Python would be PID 1, which the kernel shields from every signal
# the process has no handler for yet: a SIGTERM during start-up would be ignored until the
# kubelet's SIGKILL. The static build needs no library from this stage. The version pin is
# Debian bookworm's (amd64); a build for another architecture may need its own binNMU suffix.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
# UV_COMPILE_BYTECODE: the .pyc files are written now, because the runtime's root filesystem is
# read-only. UV_LINK_MODE=copy: the cache is a mount, so the venv must not hard-link into it.
# UV_PYTHON*: the base image's interpreter, never one uv would download.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON=3.11 \
    UV_PYTHON_PREFERENCE=only-system \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# Dependencies first, in a layer of their own that only a lock change rebuilds.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --no-editable --no-install-project
# Then the app, as a regular (non-editable) install: /opt/venv does not refer back to /src.
COPY worker/ worker/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --no-editable

FROM python:3.11-slim-bookworm AS runtime
# The version is written out, not a build argument, so that an image cannot carry another
# version than the code inside it: tests/deploy/test_deploy.py checks it against pyproject.toml.
# Revision and source come from the release build (`--build-arg REVISION=… SOURCE=…`).
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="invite-worker" \
      org.opencontainers.image.description="Invites people to Microsoft Teams calls from RabbitMQ commands, through Graph." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# A fixed UID/GID (65532, the distroless "nonroot" convention) so that Kubernetes'
# runAsNonRoot can verify it and runAsUser/fsGroup in k8s/ match it; no home, no shell.
RUN groupadd --system --gid 65532 invite-worker \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin invite-worker

COPY --from=tini /usr/bin/tini-static /usr/bin/tini
COPY --from=build /opt/venv /opt/venv

# PYTHONDONTWRITEBYTECODE: nothing is written to the (read-only) root filesystem; the bytecode
# was compiled at build time. PYTHONUNBUFFERED: log lines leave at once, even on a crash.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    HEALTH_PORT=8080

USER 65532:65532
EXPOSE 8080

# `invite-worker healthcheck` asks the worker's own /healthz on 127.0.0.1:$HEALTH_PORT, so the
# image needs no curl. Kubernetes ignores HEALTHCHECK and uses the probes in k8s/ instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/invite-worker", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/venv/bin/invite-worker"]
CMD ["run"]
