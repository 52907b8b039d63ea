# Image of the profilestream worker. Build from the repository root:
#   docker build -t profilestream:0.1.0 .
# The default command runs the worker, and `profilestream topics` and `profilestream migrate` run
# from the same image (see deploy/docker-compose.yml).

# Builder: the project's wheel and every dependency, installed into a virtualenv that the
# runtime stage copies whole. Both stages share the base image, so the venv's interpreter
# path (/usr/local/bin/python3.11) is valid in both.
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, from requirements.lock alone, so that a source change reuses this layer.
# The lock pins every runtime dependency, transitive ones included, with the sha256 of each
# file, and deploy/README.md gives the command that regenerates it. --no-deps keeps pip from
# resolving anything beyond the lock.
# NOTE: pip's build isolation still fetches setuptools, the build backend of jieba (an sdist
# only) and of the project wheel, at its newest release and without a hash check.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps --requirement requirements.lock

COPY pyproject.toml README.md ./
COPY stream ./stream
COPY handlers ./handlers
COPY schemas ./schemas
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-deps /tmp/dist/*.whl


# Runtime: the venv and an unprivileged account, no build tools and no source tree.
FROM python:3.11.14-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROFILESTREAM_HTTP_HOST=0.0.0.0 \
    PROFILESTREAM_HTTP_PORT=6066 \
    PROFILESTREAM_DATA_DIR=/var/lib/profilestream \
    PROFILESTREAM_LOG_FORMAT=json

# A fixed numeric uid lets Kubernetes check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 profilestream \
    && useradd --system --uid 10001 --gid profilestream --home-dir /var/lib/profilestream \
        --no-create-home --shell /usr/sbin/nologin profilestream \
    && mkdir -p /var/lib/profilestream \
    && chown profilestream:profilestream /var/lib/profilestream

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/profilestream
EXPOSE 6066

# Liveness, as in the Kubernetes liveness probe: /healthz responds while the worker's event loop
# runs. /readyz would mark a rebalancing worker, or one of more workers than partitions,
# unhealthy. The worker creates the topics before it starts the HTTP server, hence the long
# start period. The Postgres migration runs after the server starts, so it does not delay the
# check. Slim images have no curl, so Python's urllib fetches the page. A non-2xx status or a
# refused connection raises and fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PROFILESTREAM_HTTP_PORT', '6066') + '/healthz', timeout=4)"]

CMD ["profilestream", "worker"]
