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

# Dependencies first, from pyproject.toml alone, so that a source change reuses this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --requirement /tmp/requirements.txt

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
    PROFILESTREAM_DATA_DIR=/var/lib/profilestream

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

# The worker creates topics and applies migrations before it serves /metrics, hence the long
# start period. Slim images have no curl, so Python's urllib fetches the page. A non-2xx status
# or a refused connection raises and fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PROFILESTREAM_HTTP_PORT', '6066') + '/metrics', timeout=4)"]

CMD ["profilestream", "worker"]
