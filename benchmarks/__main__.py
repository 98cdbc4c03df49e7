"""`python -m benchmarks [--quick] [--db sqlite,postgres] [--runs 3]`

For each scenario and database, eventsync and the floor (or a peer) run alternately, at least
three times; the table reports medians and the ratio floor/eventsync, with each target.
Results are printed and written to benchmarks/RESULTS.md with the machine's details.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from benchmarks import floor, replicas, subjects
from benchmarks.server import KEY, Server
from eventsync.testing import install_write_counter, writes

HERE = Path(__file__).resolve().parent
DEFAULT_PG = "postgresql+psycopg://127.0.0.1:5432/test"


@dataclass
class Size:
    jobs: int = 100
    events: int = 1000
    wide_jobs: int = 400
    wide_events: int = 20
    latency: float = 0.05
    big_job: int = 50_000
    mem_jobs: tuple[int, int] = (100, 400)
    replica_jobs: tuple[int, ...] = (1000, 5000)
    replica_counts: tuple[int, ...] = (1, 3)
    snapshots: int = 300
    checkpoints: int = 5


FULL = Size()
QUICK = Size(
    jobs=10,
    events=200,
    wide_jobs=40,
    wide_events=5,
    big_job=5_000,
    mem_jobs=(10, 40),
    replica_jobs=(40,),
    replica_counts=(1, 2),
)


@dataclass
class Row:
    scenario: str
    database: str
    eventsync: float
    other: float | None
    other_name: str
    ratio: float | None
    target: str
    passed: bool | None
    note: str = ""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


class Databases:
    """Fresh, empty databases: SQLite files in a temp folder, Postgres databases by name."""

    def __init__(self, workdir: str, pg_admin: str) -> None:
        self.workdir = workdir
        self.pg_admin = pg_admin
        self._admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
        self._made: list[str] = []

    @contextmanager
    def fresh(self, kind: str) -> Iterator[str]:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        if kind == "sqlite":
            path = Path(self.workdir) / f"{name}.db"
            yield f"sqlite:///{path}"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(self.pg_admin).set(database=name).render_as_string(hide_password=False)
        finally:
            with self._admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        self._admin.dispose()


def floor_insert(kind: str, url: str, server: Server, concurrency: int) -> int:
    if kind == "sqlite":
        path = make_url(url).database or ""
        return floor.sqlite_floor(path, server.base_url, KEY, server.job_ids, concurrency)
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    return floor.postgres_floor(plain, server.base_url, KEY, server.job_ids, concurrency)


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """The runs' range, for judging the noise of a shared machine."""
    return f"{min(values):.2f}-{max(values):.2f} s"


def bench_database(
    kind: str, size: Size, runs: int, dbs: Databases, server: Server, peers: bool
) -> list[Row]:
    rows: list[Row] = []
    server.load(size.jobs, size.events)
    cold_es, cold_floor, steady_es, steady_floor, trickle_es = [], [], [], [], []
    steady_writes, trickle_writes = [], []
    for run in range(runs):
        order = ("floor", "eventsync") if run % 2 == 0 else ("eventsync", "floor")
        for who in order:
            if who == "floor":
                with dbs.fresh(kind) as url:
                    t, n = timed(lambda url=url: floor_insert(kind, url, server, 8))
                    assert n == size.jobs * size.events
                    cold_floor.append(t)
                t, _ = timed(lambda: floor.fetch_only(server.base_url, KEY, server.job_ids, 8))
                steady_floor.append(t)
                continue
            with dbs.fresh(kind) as url:
                engine = subjects.migrate(url)
                t, result = timed(
                    lambda url=url: subjects.eventsync_pass(url, server.base_url, KEY)
                )
                assert result.new == size.jobs * size.events, result.new
                cold_es.append(t)
                install_write_counter(engine)
                t, result = timed(
                    lambda url=url: subjects.eventsync_pass(url, server.base_url, KEY)
                )
                steady_es.append(t)
                steady_writes.append(sum(writes(engine, reset=True).values()))
                server.add_one_each()
                t, result = timed(
                    lambda url=url: subjects.eventsync_pass(url, server.base_url, KEY)
                )
                trickle_es.append(t)
                trickle_writes.append(sum(writes(engine, reset=True).values()))
                server.truncate(size.events)
                engine.dispose()
    cold = med(cold_es)
    ratio = med(cold_floor) / cold
    rows.append(
        Row(
            "cold",
            kind,
            cold,
            med(cold_floor),
            "floor",
            ratio,
            "floor/eventsync >= 0.67",
            ratio >= 0.67,
            f"{size.jobs} jobs x {size.events} events; runs: eventsync {spread(cold_es)}, "
            f"floor {spread(cold_floor)}",
        )
    )
    steady = med(steady_es)
    rows.append(
        Row(
            "steady",
            kind,
            steady,
            med(steady_floor),
            "floor (fetch only)",
            med(steady_floor) / steady,
            ">= 5x faster than cold, 0 rows written",
            cold / steady >= 5 and max(steady_writes) == 0,
            f"cold/steady {cold / steady:.1f}x, rows written {max(steady_writes)}",
        )
    )
    trickle = med(trickle_es)
    rows.append(
        Row(
            "trickle",
            kind,
            trickle,
            med(steady_floor),
            "floor (fetch only)",
            med(steady_floor) / trickle,
            "<= 1.5x steady, exactly 1 row per job",
            trickle <= 1.5 * steady and set(trickle_writes) == {size.jobs},
            f"trickle/steady {trickle / steady:.2f}x, rows written {trickle_writes}",
        )
    )

    server.load(size.wide_jobs, size.wide_events, size.latency)
    ideal = size.wide_jobs * size.latency / 8
    wide_es, wide_floor = [], []
    for run in range(runs):
        order = ("floor", "eventsync") if run % 2 == 0 else ("eventsync", "floor")
        for who in order:
            with dbs.fresh(kind) as url:
                if who == "floor":
                    wide_floor.append(timed(lambda url=url: floor_insert(kind, url, server, 8))[0])
                else:
                    subjects.migrate(url).dispose()
                    wide_es.append(
                        timed(lambda url=url: subjects.eventsync_pass(url, server.base_url, KEY))[0]
                    )
    wide = med(wide_es)
    rows.append(
        Row(
            "wide",
            kind,
            wide,
            med(wide_floor),
            "floor",
            med(wide_floor) / wide,
            f"<= 1.5x ideal ({ideal:.2f}s)",
            wide <= 1.5 * ideal,
            f"{size.wide_jobs} jobs x {size.wide_events} events, "
            f"{size.latency * 1000:.0f} ms latency, concurrency 8; "
            f"{wide / ideal:.2f}x ideal",
        )
    )
    if peers:
        rows += bench_peers(kind, size, runs, dbs, server, cold, steady, wide)
    return rows


def _eventsync_env(base_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    # Events only, as the floor does; bench_history measures what the history adds.
    return {
        **base,
        "TOGETHER_API_KEY": KEY,
        "TOGETHER_BASE_URL": base_url,
        "EVENTSYNC_HISTORY": "false",
    }


EVENTSYNC = str(Path(sys.executable).with_name("eventsync"))


def process_seconds(args: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one whole process, start-up included, as a user running it sees it."""
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed: {done.stderr.strip()[-500:]}")
    return seconds


def floor_process(kind: str, url: str, server: Server) -> list[str]:
    target = make_url(url).database or "" if kind == "sqlite" else url.replace("+psycopg", "")
    return [sys.executable, "-m", "benchmarks.floor", kind, target, server.base_url, KEY,
            *server.job_ids]  # fmt: skip


def bench_whole_process(
    kind: str, size: Size, runs: int, dbs: Databases, server: Server
) -> list[Row]:
    """`eventsync sync --all-jobs` from cron: cold and wide, each a whole process against the
    floor as a whole process."""
    rows = []
    env = _eventsync_env(server.base_url)
    for scenario in ("cold", "wide"):
        if scenario == "cold":
            server.load(size.jobs, size.events)
        else:
            server.load(size.wide_jobs, size.wide_events, size.latency)
        es, fl = [], []
        for run in range(runs):
            for who in ("floor", "eventsync") if run % 2 == 0 else ("eventsync", "floor"):
                with dbs.fresh(kind) as url:
                    if who == "floor":
                        fl.append(process_seconds(floor_process(kind, url, server)))
                    else:
                        subjects.migrate(url).dispose()  # as in-process: the schema is there
                        sync = [EVENTSYNC, "sync", "--all-jobs", "--database-url", url]
                        es.append(process_seconds(sync, env))
        mine, floor_s = med(es), med(fl)
        if scenario == "cold":
            target, passed = "floor/eventsync >= 0.67", floor_s / mine >= 0.67
            note = f"{size.jobs} jobs x {size.events} events"
        else:
            ideal = size.wide_jobs * size.latency / 8
            target, passed = f"<= 1.5x ideal ({ideal:.2f}s)", mine <= 1.5 * ideal
            note = f"{size.wide_jobs} jobs x {size.wide_events} events; {mine / ideal:.2f}x ideal"
        rows.append(
            Row(
                f"{scenario}, whole process",
                kind,
                mine,
                floor_s,
                "floor (whole process)",
                floor_s / mine,
                target,
                passed,
                f"{note}; runs: eventsync {spread(es)}, floor {spread(fl)}",
            )
        )
    return rows


def bench_history(kind: str, size: Size, runs: int, dbs: Databases, server: Server) -> list[Row]:
    """What the jobs' records, metrics and checkpoints add to a steady pass: running jobs
    re-polled with nothing new, with history against events only, alternating."""
    server.load(size.jobs, size.events)
    server.add_history(size.snapshots, size.checkpoints)
    with_history, events_only = [], []
    with dbs.fresh(kind) as url:
        subjects.migrate(url).dispose()
        cold = subjects.eventsync_pass(url, server.base_url, KEY, history=True)
        assert cold.ok
        for run in range(runs):
            for history in (True, False) if run % 2 == 0 else (False, True):
                seconds, result = timed(
                    lambda url=url, history=history: subjects.eventsync_pass(
                        url, server.base_url, KEY, history=history
                    )
                )
                assert sum(o.snapshots for o in result.outcomes) == 0
                (with_history if history else events_only).append(seconds)
    mine, base = med(with_history), med(events_only)
    return [
        Row(
            "steady, with history",
            kind,
            mine,
            base,
            "steady, events only",
            base / mine,
            "<= 1.5x events only",
            mine <= 1.5 * base,
            f"{size.jobs} running jobs, {size.snapshots} metrics snapshots and "
            f"{size.checkpoints} checkpoints each, nothing new; {mine / base:.2f}x; runs: "
            f"with {spread(with_history)}, without {spread(events_only)}",
        )
    ]


def bench_startup(runs: int, dbs: Databases, server: Server) -> list[Row]:
    """`eventsync status` on a small SQLite file, as a whole process, against the least any
    Python program that reads it with SQLAlchemy pays: `python -c "import sqlalchemy"`."""
    server.load(5, 50)
    env = _eventsync_env(server.base_url)
    with dbs.fresh("sqlite") as url:
        process_seconds([EVENTSYNC, "sync", "--all-jobs", "--database-url", url], env)
        status = [EVENTSYNC, "status", "--database-url", url]
        bare = [sys.executable, "-c", "import sqlalchemy"]
        process_seconds(status, env)  # the first run warms the disk cache; not counted
        mine, floor_s = [], []
        for _ in range(max(15, runs)):  # cheap, and the machine is noisy at this scale
            mine.append(process_seconds(status, env))
            floor_s.append(process_seconds(bare))
    ratio = med(mine) / med(floor_s)
    return [
        Row(
            "startup",
            "sqlite",
            med(mine),
            med(floor_s),
            "import sqlalchemy",
            med(floor_s) / med(mine),
            "status <= 1.3x import sqlalchemy",
            ratio <= 1.3,
            f"`eventsync status`, 5 jobs: {ratio:.2f}x; runs: status {spread(mine)}, "
            f"import {spread(floor_s)}",
        )
    ]


def bench_peers(
    kind: str,
    size: Size,
    runs: int,
    dbs: Databases,
    server: Server,
    cold: float,
    steady: float,
    wide: float,
) -> list[Row]:
    rows: list[Row] = []
    try:
        import dlt  # noqa: F401
        import together  # noqa: F401
    except ImportError as exc:
        return [
            Row(
                "peers",
                kind,
                cold,
                None,
                "-",
                None,
                "faster than SDK loop and dlt",
                None,
                f"not measured: {exc.name} is not installed (pip install '.[bench]')",
            )
        ]
    workdir = dbs.workdir
    scenarios = [
        ("cold", size.jobs, size.events, 0.0, cold),
        ("steady", size.jobs, size.events, 0.0, steady),
        ("wide", size.wide_jobs, size.wide_events, size.latency, wide),
    ]
    for scenario, jobs, events, latency, ours in scenarios:
        server.load(jobs, events, latency)
        peers: dict[str, Callable[[str], Any]] = {
            "dlt merge": lambda url: subjects.dlt_pipeline(
                url, server.base_url, KEY, server.job_ids, workdir
            ),
        }
        if kind == "sqlite":
            peers["SDK loop"] = lambda url: subjects.sdk_loop(
                make_url(url).database or "", server.base_url, KEY, server.job_ids
            )
        for name, peer in peers.items():
            times = []
            for _ in range(max(1, runs - 2) if scenario != "cold" else runs):
                with dbs.fresh(kind) as url:
                    seconds = run_capped(peer, url, warm=scenario == "steady")
                times.append(seconds)
                shown = f"{seconds:.2f}s" if seconds != float("inf") else f"> {PEER_CAP:.0f}s"
                print(f"  {name}, {scenario}, {kind}: {shown}", file=sys.stderr, flush=True)
                if seconds == float("inf"):
                    break
            theirs = med(times)
            if theirs == float("inf"):
                rows.append(
                    Row(
                        f"peer: {scenario}",
                        kind,
                        ours,
                        None,
                        name,
                        None,
                        "eventsync faster",
                        True,
                        f"{name} did not finish within {PEER_CAP:.0f} s",
                    )
                )
                continue
            rows.append(
                Row(
                    f"peer: {scenario}",
                    kind,
                    ours,
                    theirs,
                    name,
                    theirs / ours,
                    "eventsync faster",
                    ours < theirs,
                    f"eventsync {theirs / ours:.1f}x faster"
                    if ours < theirs
                    else f"{name} {ours / theirs:.1f}x faster",
                )
            )
    return rows


PEER_CAP = 45.0  # seconds; dlt's merge on SQLite grows quadratically with the table


def _peer_child(peer: Callable[[str], Any], url: str, warm: bool, queue: Any) -> None:
    if warm:
        peer(url)
    queue.put(timed(lambda: peer(url))[0])


def run_capped(peer: Callable[[str], Any], url: str, *, warm: bool) -> float:
    """Time one peer run in a child process, which is stopped after PEER_CAP seconds (inf)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_peer_child, args=(peer, url, warm, queue))
    child.start()
    child.join(PEER_CAP * (2 if warm else 1))
    if child.is_alive():
        child.kill()  # dlt handles SIGTERM gracefully, i.e. not soon
        child.join()
        return float("inf")
    if child.exitcode != 0:
        raise RuntimeError(f"a peer failed (exit {child.exitcode}); see its output above")
    return float(queue.get(timeout=5))


def peak_rss_mb(args: list[str], env: dict[str, str], cwd: str) -> float:
    """Peak resident memory of one `eventsync` process: its VmHWM, read while it runs.
    (ru_maxrss from wait4 would also count this parent's memory, which Linux carries over
    the child's fork and exec.)"""
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    status = Path(f"/proc/{proc.pid}/status")
    peak_kb = 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed: {stderr}")
    return peak_kb / 1024


def bench_memory(size: Size, dbs: Databases, server: Server) -> list[Row]:
    exe = EVENTSYNC
    env = _eventsync_env(server.base_url)
    rows = []
    server.load(1, size.big_job)
    with dbs.fresh("sqlite") as url:
        big = peak_rss_mb([exe, "sync", "--all-jobs", "--database-url", url], env, dbs.workdir)
    rows.append(
        Row(
            "memory: one big job",
            "sqlite",
            big,
            None,
            "-",
            None,
            "< 200 MB peak RSS",
            big < 200,
            f"1 job x {size.big_job} events: {big:.0f} MB",
        )
    )
    peaks = []
    for jobs in size.mem_jobs:
        server.load(jobs, size.events)
        with dbs.fresh("sqlite") as url:
            peaks.append(
                peak_rss_mb([exe, "sync", "--all-jobs", "--database-url", url], env, dbs.workdir)
            )
    growth = peaks[1] / peaks[0]
    rows.append(
        Row(
            "memory: 4x the jobs",
            "sqlite",
            peaks[1],
            peaks[0],
            "1x the jobs",
            None,
            "within 20% (no growth with jobs)",
            growth <= 1.2,
            f"{size.mem_jobs[0]} jobs: {peaks[0]:.0f} MB, {size.mem_jobs[1]} jobs: "
            f"{peaks[1]:.0f} MB ({(growth - 1) * 100:+.0f}%)",
        )
    )
    return rows


def bench_replicas(size: Size, dbs: Databases, server: Server) -> list[Row]:
    """`eventsync run` replicas on one Postgres: the time to sync every job once, at 50 ms
    of API latency, against the ideal (jobs x latency / (8 workers x replicas))."""
    rows = []
    for jobs in size.replica_jobs:
        server.load(jobs, 5, size.latency)
        for count in size.replica_counts:
            with dbs.fresh("postgres") as url:
                wall, work = replicas.round_seconds(url, server, count, jobs)
            ideal = jobs * size.latency / (8 * count)
            rate = (jobs - 1) / work if work > 0 else float("inf")
            rows.append(
                Row(
                    f"replicas: {jobs} jobs, {count} replica(s)",
                    "postgres",
                    work,
                    ideal,
                    "ideal",
                    ideal / work if work > 0 else None,
                    "- (how far it scales)",
                    None,
                    f"first to last job synced in {work:.1f} s ({wall:.1f} s with start-up): "
                    f"{rate:.0f} jobs/s, so a 60 s interval covers about {60 * rate:,.0f} "
                    "running jobs",
                )
            )
    return rows


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, "
        f"Python {platform.python_version()}, {platform.platform()}"
    )


def render(rows: list[Row]) -> str:
    head = (
        "| scenario | database | eventsync (s) | floor or peer (s) | vs | ratio | target "
        "| pass | note |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        other = f"{r.other:.3f}" if r.other is not None else "-"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        ok = {True: "yes", False: "NO", None: "-"}[r.passed]
        value = (
            f"{r.eventsync:.3f}" if not r.scenario.startswith("memory") else f"{r.eventsync:.0f} MB"
        )
        if r.scenario.startswith("memory") and r.other is not None:
            other = f"{r.other:.0f} MB"
        lines.append(
            f"| {r.scenario} | {r.database} | {value} | {other} | {r.other_name} | "
            f"{ratio} | {r.target} | {ok} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a ~30 s smoke run that checks the benchmarks work (CI)",
    )
    parser.add_argument("--db", default="sqlite,postgres", help="databases, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per measurement")
    parser.add_argument("--no-peers", action="store_true", help="skip the SDK and dlt peers")
    parser.add_argument("--only-memory", action="store_true", help="run only the memory scenario")
    parser.add_argument(
        "--output",
        type=Path,
        default=HERE / "RESULTS.md",
        help="where to write the table (default benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    runs = 1 if args.quick else max(3, args.runs)
    pg = (
        os.environ.get("EVENTSYNC_BENCH_POSTGRES_URL")
        or os.environ.get("EVENTSYNC_TEST_POSTGRES_URL")
        or DEFAULT_PG
    )
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="eventsync-bench-") as workdir:
        dbs = Databases(workdir, pg)
        server = Server()
        try:
            for kind in [] if args.only_memory else args.db.split(","):
                rows += bench_database(
                    kind.strip(),
                    size,
                    runs,
                    dbs,
                    server,
                    peers=not args.no_peers and not args.quick,
                )
                rows += bench_whole_process(kind.strip(), size, runs, dbs, server)
                rows += bench_history(kind.strip(), size, runs, dbs, server)
                print(render(rows), "\n", flush=True)
            if not args.only_memory:
                rows += bench_startup(runs, dbs, server)
                if "postgres" in args.db:
                    rows += bench_replicas(size, dbs, server)
            rows += bench_memory(size, dbs, server)
        finally:
            server.close()
            dbs.close()
    table = render(rows)
    print(table)
    if not args.quick and not args.only_memory:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        args.output.write_text(
            f"# Benchmark results\n\n{stamp}, `python -m benchmarks --runs {runs}`, "
            f"{time.perf_counter() - started:.0f} s in all.\n\nMachine: {machine()}\n\n"
            f"Medians of {runs} alternating runs; ratio = floor (or peer) / eventsync, so "
            "above 1 means eventsync is faster.\n\n" + table + "\n"
        )
        print(f"\nwritten to {args.output}")
    print(f"benchmarks done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
