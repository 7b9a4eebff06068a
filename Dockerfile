# Concord worker / webhook receiver image (used by docker-compose.yml).
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY concord ./concord
COPY connectors ./connectors
COPY schemas ./schemas
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/concord --create-home concord

USER concord
# relative state paths (.concord/...) land in the concord user's writable home
WORKDIR /var/lib/concord
ENV CONCORD_DATA_DIR=/var/lib/concord \
    CONCORD_WEB_HOST=0.0.0.0 \
    CONCORD_WEB_PORT=6066
EXPOSE 6066 6067
CMD ["concord", "run"]
