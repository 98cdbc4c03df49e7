"""The fake Together API in a process of its own, so that it never shares a GIL with what is
being measured. Commands go over a pipe."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

from eventsync.testing import FakeTogether

KEY = "bench-key-0123456789"


def _serve(conn: Connection) -> None:
    fake = FakeTogether(api_key=KEY)
    conn.send(fake.start())
    while True:
        command, args = conn.recv()
        if command == "stop":
            fake.stop()
            conn.send(None)
            return
        if command == "load":  # jobs, events per job, latency
            jobs, events, latency = args
            fake.reset()
            fake.latency = latency
            for i in range(jobs):
                fake.add_job(f"ft-bench-{i:04d}", events=events)
        elif command == "add_one_each":
            for job_id in list(fake.jobs):
                fake.add_events(job_id, 1)
        elif command == "add_history":  # metrics snapshots and checkpoints per job
            snapshots, checkpoints = args
            for job_id in list(fake.jobs):
                fake.add_metrics(job_id, snapshots)
                fake.add_checkpoints(job_id, checkpoints)
        elif command == "truncate":
            for job_id, job in list(fake.jobs.items()):
                fake.set_events(job_id, job.events[: args[0]])
        # Serialise each job's body now, outside the timed window: what the server costs is
        # not what is measured, and a cached body costs it nothing in every scenario alike.
        for job in fake.jobs.values():
            job.events_body()
        conn.send(sorted(fake.jobs))


class Server:
    """Start with `Server()`, load data with `load(...)`, stop with `close()`."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        self.base_url: str = self._conn.recv()
        self.job_ids: list[str] = []

    def _call(self, command: str, *args: Any) -> Any:
        self._conn.send((command, args))
        return self._conn.recv()

    def load(self, jobs: int, events: int, latency: float = 0.0) -> list[str]:
        self.job_ids = self._call("load", jobs, events, latency)
        return self.job_ids

    def add_one_each(self) -> None:
        self._call("add_one_each")

    def add_history(self, snapshots: int, checkpoints: int) -> None:
        self._call("add_history", snapshots, checkpoints)

    def truncate(self, events: int) -> None:
        self._call("truncate", events)

    def close(self) -> None:
        self._call("stop")
        self._proc.join(timeout=10)
