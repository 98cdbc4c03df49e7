FROM python:3.12-slim

WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md alembic.ini ./
COPY eventsync ./eventsync
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --home-dir /data eventsync \
    && rm -rf /src

USER eventsync
WORKDIR /data
# The daemon migrates the database on start, then polls; SIGTERM stops it cleanly.
ENTRYPOINT ["eventsync"]
CMD ["run"]
