"""Benchmark the task service against its floor, on PostgreSQL.

    python bench.py                      # mixed workload: service, then floor; a table and the ratios
    python bench.py --json               # the same, as JSON
    python bench.py --scale              # first-page list and get on 1,000 vs 1,000,000 tasks, and EXPLAIN
    python bench.py --slow-readers 100   # memory while 100 connections leave the largest page unread

PostgreSQL is started the way the test suite starts it, or taken from BENCH_DATABASE_URL (its tasks
and users tables are emptied). The service runs as a real one-worker `uvicorn service:app` process.
The floor is a bare ASGI callable (below) under the same uvicorn: it verifies the same JWT and runs the
same SQL text from service.py on asyncpg directly (the driver under `databases`), with no framework, no
SQLAlchemy and no validation. The load generator runs in its own process and speaks HTTP/1.1 over raw
keep-alive sockets. With --db-latency MS a proxy adds MS each way and counts round trips. With
--pgbouncer the service and the floor reach PostgreSQL through PgBouncer 1.21+ in transaction mode
(prepared statements kept, as Neon's pooler), the proxy between them and it.
"""

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

SECRET = "bench-secret-" + "0123456789abcdef" * 3
os.environ.setdefault("BETTER_AUTH_SECRET", SECRET)
os.environ["BETTER_AUTH_SECRET"] = SECRET

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import jwt  # noqa: E402
from starlette.datastructures import QueryParams  # noqa: E402

import service  # noqa: E402

logging.getLogger("httpx").setLevel(
    logging.WARNING
)  # service.py logs at INFO; the bench's own calls are noise

HERE = Path(__file__).parent
ENDPOINTS = ("list", "get", "create", "toggle", "update", "delete")
# One at a time only: PATCH and /complete (one statement each, as PUT and /toggle), and
# completing a recurring task (the careful path, in a transaction).
SEQUENTIAL = (*ENDPOINTS, "patch", "complete", "complete recurring")
# The fixed mix, one cycle of ten requests: reads dominate, and creates balance deletes.
MIX = ("list", "get", "list", "get", "create", "toggle", "get", "update", "list", "delete")
EXPECTED_STATUS = {
    "list": 200,
    "get": 200,
    "create": 201,
    "toggle": 200,
    "update": 200,
    "delete": 204,
}
EXPECTED_STATUS["patch"] = 200
EXPECTED_STATUS["complete"] = 200
EXPECTED_STATUS["complete recurring"] = 200

# ---------------------------------------------------------------------------------------------------
# The floor: the same work as the service's handlers, with nothing between uvicorn and asyncpg.


def positional(sql: str) -> tuple[str, list[str]]:
    """The service's :name SQL as asyncpg takes it ($1, $2, ...), and the names in that order: done once
    per statement here, where `databases` has SQLAlchemy compile the text on every call."""
    names: list[str] = []

    def number(match: re.Match) -> str:
        names.append(match[1]) if match[1] not in names else None
        return f"${names.index(match[1]) + 1}"

    return re.sub(r"(?<![:\w]):(\w+)", number, sql), names


FLOOR_LIST = positional(service.parse_list_query(QueryParams("limit=50"))[0])
FLOOR_SELECT = positional(service.SELECT_TASK)
FLOOR_CREATE = positional(service.CREATE_TASK)
FLOOR_CHANGE = positional(service.CHANGE_TASK)
FLOOR_DELETE = positional(service.DELETE_TASK)
FLOOR_ROUTE = re.compile(r"^/api/([^/]+)/tasks(?:/([^/]+))?(/toggle)?$")
# A new task's columns but its title, as the service's create stores them.
NEW_TASK_DEFAULTS = {
    **dict.fromkeys(("description", "due_date", "due_at", "remind_at", "recurrence")),
    **{"completed": False, "priority": 2, "tags": "[]", "tag_keys": []},
}


async def floor(scope, receive, send):
    """The bare ASGI app: `uvicorn bench:floor`."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            # As the service's pool: no reset query, and every statement planned for its values.
            options = {"reset": lambda connection: asyncio.sleep(0), "min_size": 10, "max_size": 10}
            # A pooler passes no startup setting on: there the role carries it (apply_schema).
            if os.environ.get("DATABASE_POOLED") != "true":
                options["server_settings"] = {"plan_cache_mode": "force_custom_plan"}
            floor.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], **options)
            await send({"type": "lifespan.startup.complete"})
        await floor.pool.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while (message := await receive()).get("more_body"):
        body += message.get("body", b"")
    body += message.get("body", b"")
    status, payload = await floor_handle(scope, body)
    content = b"" if payload is None else json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


async def floor_handle(scope, body: bytes):
    """Each request is one statement, as in the service: the physical limit of one round trip."""
    if scope["path"] == "/health":
        return 200, {"status": "ok"}
    authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
    try:
        claims = jwt.decode(
            authorization[7:], SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.InvalidTokenError:
        return 401, {"detail": "Invalid or expired token"}
    route = FLOOR_ROUTE.match(scope["path"])
    if route is None or route.group(1) != claims["sub"]:
        return 404, {"detail": "Not Found"}
    user_id, task_id, method, now = (
        claims["sub"],
        route.group(2),
        scope["method"],
        service.utc_now(),
    )
    if task_id is None and method == "GET":
        rows = await floor_fetch(FLOOR_LIST, user_id=user_id, limit=50, offset=0)
        return 200, [floor_json(row) for row in rows if row["id"] is not None]
    if task_id is None:
        values = {**NEW_TASK_DEFAULTS, "title": json.loads(body)["title"].strip()}
        values |= {
            "id": str(uuid.uuid4()),
            "user_id": user_id,
            "email": None,
            "now": now,
            "max_tasks": 10_000,
        }
        [row] = await floor_fetch(FLOOR_CREATE, **values)
        return 201, floor_json(row)
    if method == "GET":
        rows = await floor_fetch(FLOOR_SELECT, id=task_id, user_id=user_id)
    elif method in ("PATCH", "PUT"):
        flip = method == "PATCH"
        changes = json.dumps({} if flip else {"title": json.loads(body)["title"].strip()})
        values = {
            "id": task_id,
            "user_id": user_id,
            "now": now,
            "flip": flip,
            # The service's statement declines a recurring completion; the floor's tasks never recur.
            "completing": False,
        }
        rows = await floor_fetch(FLOOR_CHANGE, **values, changes=changes, next_occurrence_id=None)
    else:
        rows = await floor_fetch(FLOOR_DELETE, id=task_id, user_id=user_id)
        return (204, None) if rows else (404, {"detail": "Task not found"})
    return (200, floor_json(rows[0])) if rows else (404, {"detail": "Task not found"})


def floor_json(row) -> dict:
    return service.task_json(
        SimpleNamespace(_mapping=row)
    )  # the service reads asyncpg's record from `databases`'


async def floor_fetch(statement: tuple[str, list[str]], **values) -> list:
    text, names = statement
    async with floor.pool.acquire() as connection:
        return await connection.fetch(text, *[values[name] for name in names])


# ---------------------------------------------------------------------------------------------------
# The database: seeded users and tasks, and their tokens


def token(user_id: str) -> str:
    now = datetime.now(UTC)
    return jwt.encode(
        {"sub": user_id, "iat": now, "exp": now + timedelta(hours=2)}, SECRET, algorithm="HS256"
    )


TAG_POOL = 50  # each task has one of 50 tags, so a tag filter matches 2% of a user's tasks


async def seed(
    url: str, users: int, tasks_per_user: int, prefix: str = "user"
) -> dict[str, list[str]]:
    """Empty the tables and fill them; the task ids of each user. Tasks have every priority, a due
    date on two in three (dates and date-times), and one tag each."""
    db = service.open_database(url, service.read_database_url(url).tls, False, True)
    await db.connect()
    await service.apply_schema(db)  # the same schema the service applies
    await db.disconnect()
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("TRUNCATE users, tasks")
        now = service.utc_now()
        owned = {
            f"{prefix}-{u}": [str(uuid.uuid4()) for _ in range(tasks_per_user)]
            for u in range(users)
        }

        def due(i: int) -> tuple:
            if i % 3 == 2:
                return None, None
            moment = service.stamp(datetime(2026, 1, 1) + timedelta(minutes=37 * i))
            return (
                (moment[:10], moment[:10] + "T23:59:59.999999Z") if i % 3 == 0 else (moment, moment)
            )

        await connection.copy_records_to_table(
            "users",
            columns=["id", "email", "created_at", "task_count"],
            records=[(u, None, now, tasks_per_user) for u in owned],
        )
        columns = [
            "id",
            "user_id",
            "title",
            "description",
            "completed",
            "created_at",
            "updated_at",
            "priority",
        ]
        columns += ["tags", "tag_keys", "due_date", "due_at"]
        records = (
            (
                task_id,
                user,
                f"task {i} of {user}",
                None,
                i % 3 == 0,
                now,
                now,
                i % 3 + 1,
                f'["tag-{i % TAG_POOL}"]',
            )
            + ([f"tag-{i % TAG_POOL}"], *due(i))
            for user, ids in owned.items()
            for i, task_id in enumerate(ids)
        )
        await connection.copy_records_to_table("tasks", columns=columns, records=records)
        # As autovacuum leaves a table in use: statistics, and the visibility map (index-only scans).
        await connection.execute("VACUUM ANALYZE users, tasks")
    finally:
        await connection.close()
    return owned


# ---------------------------------------------------------------------------------------------------
# The load generator: its own process, raw HTTP/1.1 keep-alive, one loop per connection


def request_bytes(method: str, path: str, bearer: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {bearer}\r\n"
    if method in ("POST", "PUT", "PATCH"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def read_response(reader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return status, body


def endpoint_request(endpoint: str, user: str, ids: list[str], bearer: str, step: int) -> bytes:
    """The HTTP request for one of SEQUENTIAL, on the user's own tasks (a delete takes the last)."""
    base = f"/api/{user}/tasks"
    if endpoint == "complete recurring":  # the last task made: a recurring one (see one_at_a_time)
        return request_bytes("PATCH", f"{base}/{ids[-1]}/complete", bearer)
    if endpoint == "list":
        return request_bytes("GET", base + "?limit=50", bearer)
    if endpoint == "create":
        return request_bytes("POST", base, bearer, b'{"title": "benchmark task"}')
    if endpoint == "get":
        return request_bytes("GET", f"{base}/{ids[step % len(ids)]}", bearer)
    if endpoint == "toggle":
        return request_bytes("PATCH", f"{base}/{ids[step % len(ids)]}/toggle", bearer)
    if endpoint == "update":
        return request_bytes(
            "PUT", f"{base}/{ids[step % len(ids)]}", bearer, b'{"title": "renamed"}'
        )
    if endpoint == "patch":
        body = b'{"description": "patched"}'
        return request_bytes("PATCH", f"{base}/{ids[step % len(ids)]}", bearer, body)
    if endpoint == "complete":
        body = b'{"completed": true}'
        return request_bytes("PATCH", f"{base}/{ids[step % len(ids)]}/complete", bearer, body)
    return request_bytes("DELETE", f"{base}/{ids.pop()}", bearer)


async def drive_connection(port, owned, tokens, stop_at, record):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    users, step = list(owned), 0
    try:
        while time.perf_counter() < stop_at:
            user, endpoint = users[step % len(users)], MIX[step % len(MIX)]
            step += 1
            ids = owned[user]
            if endpoint != "create" and endpoint != "list" and not ids:
                endpoint = "create"
            message = endpoint_request(endpoint, user, ids, tokens[user], step)
            started = time.perf_counter()
            writer.write(message)
            status, body = await read_response(reader)
            record(
                endpoint,
                (time.perf_counter() - started) * 1000,
                status == EXPECTED_STATUS[endpoint],
            )
            if endpoint == "create" and status == 201:
                ids.append(json.loads(body)["id"])
    finally:
        writer.close()


async def one_at_a_time(
    port: int, owned: dict, rounds: int, round_trips, endpoints=ENDPOINTS
) -> dict:
    """Each endpoint `rounds` times, one request at a time: its latencies, and the round trips to the
    database each request made (read from the delay proxy's counter)."""
    user = next(iter(owned))
    ids, bearer = owned[user], token(user)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    report = {}
    try:
        for endpoint in endpoints:
            latencies, trips = [], []
            for step in range(rounds):
                if endpoint == "complete recurring":  # a new recurring task for each, not counted
                    recurring = (
                        b'{"title": "weekly", "due_date": "2026-01-16", "recurrence": "weekly"}'
                    )
                    writer.write(request_bytes("POST", f"/api/{user}/tasks", bearer, recurring))
                    ids.append(json.loads((await read_response(reader))[1])["id"])
                message = endpoint_request(endpoint, user, ids, bearer, step)
                before = round_trips.value if round_trips else 0
                started = time.perf_counter()
                writer.write(message)
                status, body = await read_response(reader)
                latencies.append((time.perf_counter() - started) * 1000)
                trips.append((round_trips.value if round_trips else 0) - before)
                assert status == EXPECTED_STATUS[endpoint], (endpoint, status, body)
                if endpoint == "create":
                    ids.append(json.loads(body)["id"])
            ordered = sorted(latencies)
            report[endpoint] = {
                "round_trips": statistics.median(trips) if round_trips else None,
                "most_round_trips": max(trips) if round_trips else None,
                "p50_ms": round(statistics.median(ordered), 2),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
            }
    finally:
        writer.close()
    return report


def load_generator(port, owned, concurrency, warmup, duration, results):
    """Runs in its own process; puts {endpoint: (latencies in ms, errors)} on `results`."""
    tokens = {user: token(user) for user in owned}
    slices = [{u: owned[u] for u in list(owned)[c::concurrency]} for c in range(concurrency)]
    latencies = {endpoint: [] for endpoint in ENDPOINTS}
    errors = dict.fromkeys(ENDPOINTS, 0)
    measuring = False

    def record(endpoint, ms, ok):
        if measuring:
            latencies[endpoint].append(ms)
            errors[endpoint] += not ok

    async def run():
        nonlocal measuring
        start = time.perf_counter()
        stop_at = start + warmup + duration
        workers = [
            asyncio.create_task(drive_connection(port, s, tokens, stop_at, record))
            for s in slices
            if s
        ]
        await asyncio.sleep(warmup)
        measuring = True
        await asyncio.gather(*workers)

    asyncio.run(run())
    results.put({endpoint: (latencies[endpoint], errors[endpoint]) for endpoint in ENDPOINTS})


# ---------------------------------------------------------------------------------------------------
# The network: a proxy that delays every byte by the same time each way and counts round trips


def delay_proxy(
    listen_port: int, target: tuple[str, int], delay_ms: float, round_trips, ready
) -> None:
    """Runs in its own process, as the network would. A message from client to database after
    traffic the other way starts a new round trip: `round_trips` counts them, across connections."""
    delay = delay_ms / 1000
    last = {"direction": "down"}

    async def forward(reader, writer, direction):
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                if direction == "up" and last["direction"] == "down":
                    with round_trips.get_lock():
                        round_trips.value += 1
                last["direction"] = direction
                queue.put_nowait((time.monotonic() + delay, data))
        except OSError:
            pass
        queue.put_nowait(None)
        await delivering

    async def connection(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(*target)
        await asyncio.gather(
            forward(client_reader, server_writer, "up"),
            forward(server_reader, client_writer, "down"),
            return_exceptions=True,
        )

    async def serve():
        server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_delay_proxy(database_url: str, delay_ms: float):
    """(the URL through the proxy, its round-trip counter, the proxy process)."""
    parts = urlsplit(database_url)
    port, round_trips, ready = free_port(), multiprocessing.Value("q", 0), multiprocessing.Event()
    process = multiprocessing.Process(
        target=delay_proxy,
        args=(port, (parts.hostname, parts.port or 5432), delay_ms, round_trips, ready),
        daemon=True,
    )
    process.start()
    ready.wait(10)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl(), round_trips, process


# ---------------------------------------------------------------------------------------------------
# Running a target (the service or the floor) under the load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(app: str, database_url: str, pooled: bool) -> tuple[subprocess.Popen, int]:
    """One uvicorn worker serving `app`. BENCH_SERVICE_DIR and BENCH_SERVICE_PYTHON run the service of
    another checkout with its own Python (how README's "before" columns were measured)."""
    port = free_port()
    here = Path(os.environ.get("BENCH_SERVICE_DIR", HERE)) if app == "service:app" else HERE
    python = (
        os.environ.get("BENCH_SERVICE_PYTHON", sys.executable)
        if app == "service:app"
        else sys.executable
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATABASE_POOLED": str(pooled).lower(),
        "BETTER_AUTH_SECRET": SECRET,
        "PYTHONPATH": str(here),
    }
    for name in ("BETTER_AUTH_URL", "JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE"):
        env.pop(name, None)
    process = subprocess.Popen(
        [
            python,
            "-m",
            "uvicorn",
            app,
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=here,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{app} did not start")


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def measure(
    app: str, database_url: str, args, served_url: str | None = None, round_trips=None
) -> dict:
    """Seed, start `app` on `served_url` (the database through the delay proxy, if any), then one
    request at a time per endpoint, then the mixed load at --concurrency."""
    owned = asyncio.run(seed(database_url, args.users, args.tasks))
    process, port = start_server(app, served_url or database_url, args.pgbouncer)
    try:
        endpoints = (
            SEQUENTIAL if app == "service:app" else ENDPOINTS
        )  # the floor has no recurring tasks
        asyncio.run(
            one_at_a_time(port, owned, 30, round_trips, endpoints)
        )  # warm: statements prepared everywhere
        sequential = asyncio.run(one_at_a_time(port, owned, args.rounds, round_trips, endpoints))
        results = multiprocessing.Queue()
        generator = multiprocessing.Process(
            target=load_generator,
            args=(port, owned, args.concurrency, args.warmup, args.duration, results),
        )
        generator.start()
        measured = results.get(timeout=args.warmup + args.duration + 120)
        generator.join()
        rss = peak_rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    report = {"peak_rss_mib": round(rss, 1), "endpoints": {}, "one_at_a_time": sequential}
    everything = []
    for endpoint, (latencies, errors) in measured.items():
        report["endpoints"][endpoint] = summary(latencies, errors, args.duration)
        everything += latencies
    report["overall"] = summary(everything, sum(e for _, e in measured.values()), args.duration)
    return report


def summary(latencies: list[float], errors: int, duration: float) -> dict:
    ordered = sorted(latencies) or [0.0]

    def percentile(p):
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / duration, 1),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
        "p99_ms": percentile(99),
        "errors": errors,
    }


def table(results: dict) -> str:
    lines = [
        "| endpoint | service rps | p50 ms | p95 ms | p99 ms | errors | floor rps | floor p99 ms | service/floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in (*ENDPOINTS, "overall"):
        s = results["service"]["endpoints"].get(name) or results["service"]["overall"]
        f = results["floor"]["endpoints"].get(name) or results["floor"]["overall"]
        lines.append(
            f"| {name} | {s['rps']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['errors']} "
            f"| {f['rps']} | {f['p99_ms']} | {results['ratio'][name]} |"
        )
    lines.append(
        f"\npeak RSS: service {results['service']['peak_rss_mib']} MiB, floor {results['floor']['peak_rss_mib']} MiB"
    )
    latency = results["settings"]["db_latency"]
    heading = (
        f"one request at a time, {latency} ms each way to the database"
        if latency is not None
        else ("one request at a time, database on loopback")
    )
    lines += [
        f"\n{heading}:\n",
        "| endpoint | round trips | p50 ms | p99 ms | floor round trips | floor p50 ms | floor p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SEQUENTIAL:
        s, f = (
            results["service"]["one_at_a_time"][name],
            results["floor"]["one_at_a_time"].get(name),
        )
        floor = f"| {f['round_trips']} | {f['p50_ms']} | {f['p99_ms']} |" if f else "| - | - | - |"
        lines.append(f"| {name} | {s['round_trips']} | {s['p50_ms']} | {s['p99_ms']} {floor}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Scale: the same first-page list and get on a small and a large table


SCALE_REQUESTS = {  # each a first page of 50, as a frontend asks for it, and one get
    "list": "?limit=50",
    "list by due_date": "?limit=50&sort=due_date&order=asc",
    "list by priority": "?limit=50&sort=priority&order=desc",
    "list by one tag": "?limit=50&tag=tag-7",
}


async def timed_requests(port: int, user: str, task_id: str, rounds: int) -> dict:
    bearer = {"Authorization": f"Bearer {token(user)}"}
    paths = {name: f"/api/{user}/tasks{query}" for name, query in SCALE_REQUESTS.items()}
    paths["get"] = f"/api/{user}/tasks/{task_id}"
    times = {name: [] for name in paths}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(rounds):
            for name, path in paths.items():
                started = time.perf_counter()
                assert (await http.get(path, headers=bearer)).status_code == 200
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


async def explain(url: str, user: str, task_id: str) -> dict:
    """The plans of the statements the service runs for SCALE_REQUESTS, with their values."""
    statements = {}
    for name, query in SCALE_REQUESTS.items():
        statement, values = service.parse_list_query(QueryParams(query[1:]))
        statements[name] = (statement, {**values, "user_id": user})
    statements["get"] = (service.SELECT_TASK, {"id": task_id, "user_id": user})
    plans = {}
    connection = await asyncpg.connect(url)
    try:
        for name, (statement, values) in statements.items():
            text, names = positional(statement)
            rows = await connection.fetch(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + text, *[values[n] for n in names]
            )
            plans[name] = "\n".join(row[0] for row in rows)
    finally:
        await connection.close()
    return plans


def scale(database_url: str, rounds: int) -> dict:
    results = {}
    # 10 users of 100 tasks, and 100 users at the default cap of 10,000 (one user per request, either way).
    for size, users, per_user in (("1,000 tasks", 10, 100), ("1,000,000 tasks", 100, 10_000)):
        owned = asyncio.run(seed(database_url, users, per_user))
        user = next(iter(owned))
        process, port = start_server("service:app", database_url, pooled=False)
        try:
            asyncio.run(timed_requests(port, user, owned[user][0], 20))  # warm up
            results[size] = asyncio.run(
                timed_requests(port, user, owned[user][per_user // 2], rounds)
            )
        finally:
            process.terminate()
            process.wait(30)
        results[size]["plans"] = asyncio.run(
            explain(database_url, user, owned[user][per_user // 2])
        )
    small, large = results["1,000 tasks"], results["1,000,000 tasks"]
    results["ratio"] = {
        name: round(large[name] / small[name], 2) for name in (*SCALE_REQUESTS, "get")
    }
    return results


# ---------------------------------------------------------------------------------------------------
# Slow readers: connections that ask for the largest page and never read it


async def seed_largest(url: str, users: int) -> list[str]:
    """users users, each with a page of the largest tasks (every text field at its bound, in
    4-byte characters): the users' ids."""
    owned = await seed(url, users, service.ListQuery().limit, prefix="reader")
    big = "\U0001f600"
    tags = [f"{i:02d}" + big * 38 for i in range(20)]
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "UPDATE tasks SET title = $1, description = $2, tags = $3, tag_keys = $4",
            big * 200,
            big * 1000,
            json.dumps(tags, ensure_ascii=False),
            tags,
        )
    finally:
        await connection.close()
    return list(owned)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def slow_readers(database_url: str, readers: int) -> dict:
    """The process's memory before, while `readers` connections (one user each) hold their
    answer to the largest page unread, and after they close."""
    users = asyncio.run(seed_largest(database_url, readers))
    process, port = start_server("service:app", database_url, pooled=False)
    try:
        path = f"/api/tasks?limit={service.ListQuery().limit}"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            page = http.get(path, headers={"Authorization": f"Bearer {token(users[0])}"})
        before = rss_mib(process.pid)
        held = []
        for user in users:
            sock = socket.socket()
            # The least the kernel allows: the answer stays in the service's buffers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request_bytes("GET", path, token(user)))
            held.append(sock)
        time.sleep(10)
        holding = rss_mib(process.pid)
        # Each answer's status line, read only now.
        statuses = collections.Counter(sock.recv(12)[9:12].decode() for sock in held)
        for sock in held:
            sock.close()
        time.sleep(5)
        after = rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    return {
        "readers": readers,
        "page_bytes": len(page.content),
        "statuses": statuses,
        "rss_mib": {"before": before, "holding": holding, "after": after},
        "growth_per_reader_mib": round((holding - before) / readers, 2),
    }


# ---------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=200, help="tasks per user")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before measuring")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--scale", action="store_true", help="the 1,000 vs 1,000,000 tasks comparison"
    )
    parser.add_argument(
        "--rounds", type=int, default=200, help="requests of each kind one at a time (and per size)"
    )
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="reach PostgreSQL through PgBouncer 1.21+ (.ci/build-pgbouncer), as Neon's pooler",
    )
    parser.add_argument(
        "--db-latency",
        type=float,
        default=None,
        metavar="MS",
        help="put a proxy adding MS each way before the database",
    )
    parser.add_argument(
        "--slow-readers",
        type=int,
        default=None,
        metavar="N",
        help="N connections ask for the largest page and never read: the process's memory",
    )
    args = parser.parse_args()

    stops = []
    database_url = os.environ.get("BENCH_DATABASE_URL")
    if not database_url:
        # The way the suite starts it (imported here: the floor needn't).
        from test_service import start_postgres

        database_url, stop = start_postgres()
        stops.append(stop)
    try:
        if args.slow_readers:
            print(json.dumps(slow_readers(database_url, args.slow_readers), indent=2))
            return
        if args.scale:
            results = scale(database_url, args.rounds)
            if args.json:
                print(json.dumps(results, indent=2))
                return
            for size in ("1,000 tasks", "1,000,000 tasks"):
                medians = ", ".join(
                    f"{name} {results[size][name]} ms" for name in (*SCALE_REQUESTS, "get")
                )
                print(f"{size}: medians: {medians}")
                for name, plan in results[size]["plans"].items():
                    print(f"  EXPLAIN {name}:\n    " + plan.replace("\n", "\n    "))
            print(f"large/small: {results['ratio']}")
            return
        served_url, round_trips = database_url, None
        if args.pgbouncer:
            # PgBouncer 1.21+ keeping prepared statements, as Neon's pooler; the delay proxy, if
            # any, sits between the service and it, where the network is.
            from test_service import keeping_pgbouncer, start_pgbouncer

            served_url, stop_pooler = start_pgbouncer(
                database_url, keeping_pgbouncer(), "max_prepared_statements = 200"
            )
            stops.append(stop_pooler)
        if args.db_latency is not None:
            served_url, round_trips, _proxy = start_delay_proxy(served_url, args.db_latency)
        results = {
            "service": measure("service:app", database_url, args, served_url, round_trips),
            "floor": measure("bench:floor", database_url, args, served_url, round_trips),
        }
        # In a fixed mix every endpoint's rate is the same share of the total, so per endpoint the
        # ratio compares time per request (floor mean / service mean): the rate each would reach
        # alone at the same concurrency. Overall it is the throughput ratio itself.
        service_run, floor_run = results["service"], results["floor"]
        results["ratio"] = {
            name: round(
                floor_run["endpoints"][name]["mean_ms"]
                / max(service_run["endpoints"][name]["mean_ms"], 1e-9),
                2,
            )
            for name in ENDPOINTS
        }
        results["ratio"]["overall"] = round(
            service_run["overall"]["rps"] / max(floor_run["overall"]["rps"], 1e-9), 2
        )
        results["settings"] = vars(args)
        print(json.dumps(results, indent=2) if args.json else table(results))
    finally:
        for stop in reversed(stops):
            stop()


if __name__ == "__main__":
    main()
