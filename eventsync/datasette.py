"""Datasette metadata that turns the README's cookbook into canned queries.

pip install 'eventsync[datasette]'
datasette eventsync.db --metadata "$(python -m eventsync.datasette)"
"""

from __future__ import annotations

from pathlib import Path

METADATA = Path(__file__).with_name("datasette-metadata.json")

if __name__ == "__main__":
    print(METADATA)
