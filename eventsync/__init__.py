"""eventsync: mirror Together AI fine-tuning job events into SQLite or Postgres."""

__version__ = "0.1.0"
