"""Task service: the REST API behind a multi-user todo app.

Reads top to bottom: configuration, database, authentication, SQL, handlers, errors, routes, app.
Every /api route sits behind the BearerAuth middleware (see task_routes), which turns the request's
JWT into the caller or a 401/403 before any handler runs; handlers never authenticate. Every SQL
statement that reads or changes a task has `user_id = :user_id` in its WHERE clause, so isolation
between users is enforced by the query itself.

Run it:      python service.py              (serves on 127.0.0.1:$PORT)
Try it:      python service.py token alice  (prints a one-hour token for user "alice")
"""

import argparse
import asyncio
import calendar
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import sqlite3
import ssl
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dt_time
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import aiosqlite
import h11
import jwt
import psycopg
import psycopg_pool
from psycopg.rows import dict_row
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings, Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

# ---------------------------------------------------------------------------------------------------
# Configuration, read once from the environment or a .env file.

# A deployed service has no .env file (its settings are in the environment), so only read one that exists.
config = Config(".env" if Path(".env").is_file() else None)
DATABASE_URL = config("DATABASE_URL", default="sqlite:///./tasks.db")
BETTER_AUTH_SECRET = config("BETTER_AUTH_SECRET", default="")
BETTER_AUTH_URL = config("BETTER_AUTH_URL", default="").rstrip("/")
JWKS_URL = config("JWKS_URL", default=f"{BETTER_AUTH_URL}/api/auth/jwks" if BETTER_AUTH_URL else "")
# Better Auth's JWT plugin sets both claims to its base URL. "*" turns a check off (see TokenPolicy).
JWT_ISSUER = config("JWT_ISSUER", default=BETTER_AUTH_URL)
JWT_AUDIENCE = config("JWT_AUDIENCE", default=BETTER_AUTH_URL)
# PgBouncer in transaction mode (Neon's pooled endpoints, whose host names end in "-pooler").
DATABASE_POOLED = config("DATABASE_POOLED", cast=bool, default="-pooler" in (urlsplit(DATABASE_URL).hostname or ""))
CORS_ORIGINS = config("CORS_ORIGINS", cast=CommaSeparatedStrings, default="http://localhost:3000")
PORT = config("PORT", cast=int, default=8000)
MAX_TASKS_PER_USER = config("MAX_TASKS_PER_USER", cast=int, default=10_000)
# Requests in flight plus open connections, per process; uvicorn answers 503 beyond it.
LIMIT_CONCURRENCY = config("LIMIT_CONCURRENCY", cast=int, default=256)

# Secrets this repository has published as examples (.env.example, now and before): never a secret.
PUBLISHED_SECRETS = {
    "dev-only-secret-change-me-0123456789abcdef",
    "replace-me-with-the-output-of-openssl-rand-base64-32",
}


def is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def settings_problem() -> str | None:
    """Why the authentication settings cannot work, in one line, or None."""
    if not BETTER_AUTH_SECRET and not JWKS_URL:
        return (
            "set BETTER_AUTH_SECRET (the HS256 secret shared with Better Auth) and/or BETTER_AUTH_URL "
            "(Better Auth's base URL, for its JWKS) in the environment or in .env"
        )
    # RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output (32 bytes).
    if BETTER_AUTH_SECRET and len(BETTER_AUTH_SECRET.encode()) < 32:
        return "BETTER_AUTH_SECRET must be at least 32 bytes: make one with `openssl rand -base64 32`"
    if BETTER_AUTH_SECRET in PUBLISHED_SECRETS:
        return "BETTER_AUTH_SECRET is the published example value: make one with `openssl rand -base64 32`"
    # The keys decide who is who: fetch them over TLS, except from this machine (local development).
    jwks = urlsplit(JWKS_URL)
    if JWKS_URL and not (jwks.scheme == "https" or jwks.scheme == "http" and is_loopback(jwks.hostname)):
        return f"JWKS_URL must be an https URL (http only for localhost), not {JWKS_URL!r}"
    if JWKS_URL and not (JWT_ISSUER and JWT_AUDIENCE):
        return "with JWKS_URL, set JWT_ISSUER and JWT_AUDIENCE (or BETTER_AUTH_URL); '*' skips a check"
    if MAX_TASKS_PER_USER < 1:
        return "MAX_TASKS_PER_USER must be at least 1"
    return None


DATABASE_CONNECT_TIMEOUT_SECONDS = 5  # a database that does not answer is a 503 within these bounds
DATABASE_COMMAND_TIMEOUT_SECONDS = 10
MAX_BODY_BYTES = 64 * 1024
TITLE_MAX, DESCRIPTION_MAX = 200, 1000
MAX_TAGS, TAG_MAX = 20, 40
PRIORITIES = {"low": 1, "medium": 2, "high": 3}  # stored as the rank, so that it sorts as it reads
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}
RECURRENCES = ("daily", "weekly", "monthly")
MOMENT_YEAR_MAX = 9998  # so that the next occurrence of a recurring task is still a 4-digit year
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 1000
SQL_BIGINT_MAX = 2**63 - 1  # LIMIT and OFFSET are 64-bit on both databases
MAX_QUERY_NUMBER_DIGITS = len(str(SQL_BIGINT_MAX))  # checked before int(), which refuses 4,300+ digits
CLOCK_SKEW_LEEWAY = timedelta(seconds=30)
MAX_TOKEN_BYTES = 8 * 1024
MAX_SUBJECT_LENGTH = 255  # a user id; longer ones would not fit PostgreSQL's primary-key index anyway
MAX_EMAIL_LENGTH = 320  # RFC 3696; a longer email claim is not stored
VERIFIED_TOKENS_KEPT = 4096  # at about 200 bytes each
VERIFIED_TOKEN_SECONDS = 60
# A removed JWKS key stops working within JWKS_MAX_AGE_SECONDS + VERIFIED_TOKEN_SECONDS (6 minutes).
JWKS_MAX_AGE_SECONDS = 300  # an older key set is not used: the request waits for a new one
JWKS_REFRESH_SECONDS = 240  # a key set in use is refetched in the background after this
JWKS_REFETCH_SECONDS = 30  # the least time between two fetches (unknown kids, failed fetches)
JWKS_DEADLINE_SECONDS = 3  # for all of one fetch: connect, send, every read
JWKS_MAX_BYTES = 1024 * 1024
OPENAPI_PATH = Path(__file__).with_name("openapi.json")

# Logs go to stdout, where Render and Fly collect them; configure_logging() sets that up at start.
# The request log is ours (RequestLog below): uvicorn's access log would log raw paths and queries.
log = logging.getLogger("service")
request_log = logging.getLogger("service.requests")


def configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        # Nothing logged here names a source line, thread or process, so none is collected for each
        # record (the logging documentation's "Optimization"): under load the request log went from
        # 6.6% of the service's time to 5.5%.
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


# ---------------------------------------------------------------------------------------------------
# Database: PostgreSQL through psycopg's pool, or one shared SQLite connection through aiosqlite.
# Both offer the same three things: fetch(sql, values) for one statement, transaction() for several,
# and connection(), the one place every statement starts.

SCHEMA_PATH = Path(__file__).with_name("schema.sql")


class PostgreSQL:
    """psycopg's pool, in autocommit: one statement is one round trip (its parameters travel with it,
    so nothing waits on a separate prepare), and a connection needs nothing sent when it goes back to
    the pool: the service keeps no session state on one (no SET, no LISTEN, no cursor; its one
    advisory lock is transaction-scoped)."""

    dialect = "postgresql"

    def __init__(self, url: str, pooled: bool) -> None:
        # libpq reads the URL itself (sslmode included); the pool's size is ours to take out of it.
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        sizes = {name: int(value) for name, value in query if name in ("min_size", "max_size")}
        self.min_size, self.max_size = sizes.get("min_size", 10), sizes.get("max_size", 10)
        self.conninfo = parts._replace(query=urlencode([(k, v) for k, v in query if k not in sizes])).geturl()
        self.pooled = pooled
        self.pool: psycopg_pool.AsyncConnectionPool | None = None

    async def connect(self) -> None:
        self.pool = psycopg_pool.AsyncConnectionPool(
            self.conninfo,
            min_size=self.min_size,
            max_size=max(self.min_size, self.max_size),
            timeout=DATABASE_CONNECT_TIMEOUT_SECONDS,  # the longest wait for a connection
            open=False,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "cursor_factory": psycopg.AsyncRawCursor,  # $1 placeholders: see driver_sql
                "connect_timeout": DATABASE_CONNECT_TIMEOUT_SECONDS,
                # PgBouncer in transaction mode may run each statement on another server connection,
                # where a statement prepared earlier does not exist: so none is prepared there.
                # Directly, each statement is prepared on its first use on a connection.
                "prepare_threshold": None if self.pooled else 0,
            },
        )
        await self.pool.open(wait=True, timeout=DATABASE_CONNECT_TIMEOUT_SECONDS)

    async def disconnect(self) -> None:
        await self.pool.close()

    def connection(self):
        return self.pool.connection()

    async def fetch(self, sql: str, values: dict | None = None) -> list:
        async with self.connection() as connection:
            return await self.run(connection, sql, values)

    @asynccontextmanager
    async def transaction(self):
        async with self.connection() as connection, connection.transaction():
            yield functools.partial(self.run, connection)

    @staticmethod
    async def run(connection: psycopg.AsyncConnection, sql: str, values: dict | None) -> list:
        text, names = driver_sql(sql)
        async with asyncio.timeout(DATABASE_COMMAND_TIMEOUT_SECONDS):
            cursor = await connection.execute(text, [values[name] for name in names])
            return await cursor.fetchall() if cursor.description else []


class SQLite:
    """One long-lived connection shared by every request, one statement or transaction at a time.
    SQLite writes one at a time anyway; a connection per request cost a thread per request."""

    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        self.path = url.removeprefix("sqlite://").removeprefix("/")  # sqlite:///./tasks.db, sqlite:////abs
        self.lock = asyncio.Lock()
        self.shared: aiosqlite.Connection | None = None

    async def connect(self) -> None:
        # isolation_level=None: each statement commits by itself unless transaction() began one.
        self.shared = await aiosqlite.connect(self.path, isolation_level=None)
        self.shared.row_factory = sqlite3.Row
        await self.shared.execute("PRAGMA foreign_keys = ON")  # off by default; ON DELETE CASCADE needs it
        # Write-ahead logging lets other processes read while this one writes; it lives in the file.
        await self.shared.execute("PRAGMA journal_mode = WAL")

    async def disconnect(self) -> None:
        await self.shared.close()

    @asynccontextmanager
    async def connection(self):
        async with self.lock:
            yield self.shared

    async def fetch(self, sql: str, values: dict | None = None) -> list:
        async with self.connection() as connection:
            return await self.run(connection, sql, values)

    @asynccontextmanager
    async def transaction(self):
        async with self.connection() as connection:
            await connection.execute("BEGIN IMMEDIATE")
            try:
                yield functools.partial(self.run, connection)
            except BaseException:
                await connection.execute("ROLLBACK")
                raise
            await connection.execute("COMMIT")

    @staticmethod
    async def run(connection: aiosqlite.Connection, sql: str, values: dict | None) -> list:
        async with connection.execute(sql, values or {}) as cursor:
            return list(await cursor.fetchall())


def open_database(url: str, pooled: bool = DATABASE_POOLED) -> PostgreSQL | SQLite:
    return SQLite(url) if url.startswith("sqlite") else PostgreSQL(url, pooled)


SCHEMA_LOCK = 720_514_001  # any constant: the advisory lock's name among this database's locks
SCHEMA_STEP = re.compile(r"^-- step (\d+):.*$", re.MULTILINE)

# A database made before schema_version existed tells its release by its columns.
TABLE_COLUMNS = {
    "postgresql": """
        SELECT column_name AS name FROM information_schema.columns
        WHERE table_schema = current_schema() AND CAST(table_name AS TEXT) = :table
    """,
    "sqlite": "SELECT name FROM pragma_table_info(:table)",
}


class SchemaTooNew(RuntimeError):
    pass


def schema_steps() -> list[list[str]]:
    """schema.sql's steps, in order, each a list of statements."""
    bodies = SCHEMA_STEP.split(SCHEMA_PATH.read_text())[2::2]
    return [
        [statement for statement in body.split(";") if re.search(r"^\s*[A-Z]", statement, re.MULTILINE)]
        for body in bodies
    ]


async def apply_schema(database: PostgreSQL | SQLite) -> None:
    """Run the steps of schema.sql this database has not had, all in one transaction. On SQLite the
    transaction's write lock, on PostgreSQL an advisory lock, make instances that start together on
    one database take turns: the first upgrades it, the others find nothing left to do."""
    steps = schema_steps()
    async with database.transaction() as run:
        if database.dialect == "postgresql":
            # A transaction-level lock: it also works through PgBouncer's transaction mode.
            await run("SELECT pg_advisory_xact_lock(:key)", {"key": SCHEMA_LOCK})
        await run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", None)
        rows = await run("SELECT version FROM schema_version", None)
        version = rows[0]["version"] if rows else await version_before_schema_version(run, database.dialect)
        if version > len(steps):
            raise SchemaTooNew(
                f"the database's schema is at step {version}, newer than this service's {len(steps)}: "
                "run the release that made it, or a newer one"
            )
        for statement in (statement for step in steps[version:] for statement in step):
            await run(statement, None)
        if not rows:
            await run("INSERT INTO schema_version (version) VALUES (:version)", {"version": len(steps)})
        elif version < len(steps):
            await run("UPDATE schema_version SET version = :version", {"version": len(steps)})


async def version_before_schema_version(run, dialect: str) -> int:
    """0 for an empty database; 1 for the first release's (no task_count); 2 for the second's."""
    columns = {row["name"] for row in await run(TABLE_COLUMNS[dialect], {"table": "users"})}
    return 0 if not columns else 2 if "task_count" in columns else 1


SQL_LITERAL_OR_PARAMETER = re.compile(r"'(?:[^']|'')*'|::|(?<!\w):(\w+)")


@functools.cache
def driver_sql(sql: str) -> tuple[str, tuple[str, ...]]:
    """A statement with :name parameters as PostgreSQL itself takes them ($1, $2, ..., one number per
    name however often it is used), and the names in that order; sqlite3 binds :name itself. Quoted
    literals and :: casts are left as they are. Done once per statement: psycopg's raw cursor sends
    the text as it is, where its own %(name)s placeholders would be parsed again on every execution
    of a statement over 4 KiB (CHANGE_TASK is one)."""
    names: list[str] = []

    def numbered(match: re.Match) -> str:
        name = match.group(1)
        if name is None:  # a literal or a cast
            return match.group(0)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return SQL_LITERAL_OR_PARAMETER.sub(numbered, sql), tuple(names)


def utc_now() -> str:
    """The one timestamp format stored and served (see schema.sql)."""
    return stamp(datetime.now(UTC))


# ---------------------------------------------------------------------------------------------------
# Authentication: the BearerAuth middleware turns a request into its caller, or a 401 / 403.
#
# Token policy, all of it (a reviewer should agree with each line):
# - HS256 tokens, signed with BETTER_AUTH_SECRET: HS256 only. `iss` and `aud` are not checked, because
#   whoever holds the secret can write any claims: the secret is the whole trust.
# - Better Auth's JWKS tokens: the algorithm is the one the key's type allows (EdDSA, ES256, RS256),
#   never the token's `alg` alone, so an HS256 token "signed" with a public key is refused.
#   `iss` and `aud` must be JWT_ISSUER / JWT_AUDIENCE (Better Auth's base URL): another service's
#   tokens from the same Better Auth are not ours. "*" turns a check off, for operators who share
#   tokens deliberately.
# - Both: `exp` and `sub` are required, `nbf` is honoured, with CLOCK_SKEW_LEEWAY. `exp`, `nbf` and
#   `iat` must be numbers JavaScript holds exactly (not strings, booleans, NaN or over 2**53); `sub`
#   a non-blank string of at most MAX_SUBJECT_LENGTH characters that PostgreSQL can store. Tokens over
#   MAX_TOKEN_BYTES are not read. Anything else is the one 401: no claim value can reach a 500.

HS256_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = {"EdDSA", "ES256", "RS256"}
REQUIRED_CLAIMS = ["exp", "sub"]
ANY = "*"


@dataclass(frozen=True)
class Caller:
    """Who is asking: the token's subject, and its email claim if it had one."""

    id: str
    email: str | None


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def invalid_token() -> HTTPException:
    # One answer for every way a token can fail, so a caller learns nothing about which check failed.
    return unauthorized("Invalid or expired token")


def bearer_token(headers: Headers) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("Missing authentication credentials")
    return token.strip()


def decode(token: str, key, algorithms: list[str], issuer: str = ANY, audience: str = ANY) -> dict:
    """The token's claims if the signature, the claims' types, exp, nbf and (unless ANY) iss and aud
    all hold; otherwise the one 401."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            issuer=None if issuer == ANY else issuer,
            audience=None if audience == ANY else audience,
            leeway=CLOCK_SKEW_LEEWAY,
            options={"require": REQUIRED_CLAIMS, "verify_aud": audience != ANY},
        )
    # PyJWT converts time claims with int(): a list is a TypeError, an infinity an OverflowError.
    except (jwt.InvalidTokenError, TypeError, ValueError, OverflowError):
        raise invalid_token() from None
    if not all(is_time_claim(claims[name]) for name in ("exp", "nbf", "iat") if name in claims):
        raise invalid_token()  # PyJWT took "1999999999" (a string) for a number
    if not is_user_id(claims["sub"]):
        raise invalid_token()
    return claims


def is_time_claim(value) -> bool:
    """A number of seconds JavaScript can hold exactly (Better Auth is JavaScript): not a string, not
    a boolean, not NaN, infinite or beyond 2**53, any of which would fail in arithmetic later."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= 2**53  # False for NaN too; an int is compared exactly, however large


def is_user_id(subject) -> bool:
    """A non-blank string PostgreSQL can store (no NUL, no unpaired surrogate) in its index."""
    if not isinstance(subject, str) or not subject.strip() or len(subject) > MAX_SUBJECT_LENGTH:
        return False
    return storable_text(subject)


async def fetch_json(url: str):
    """GET the URL and parse its JSON. JWKS_DEADLINE_SECONDS bounds all of it (a server that drips
    bytes cannot hold a fetch longer); only a 200 counts, so redirects are not followed."""
    parts = urlsplit(url)
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection, status, body = h11.Connection(h11.CLIENT), None, bytearray()
    async with asyncio.timeout(JWKS_DEADLINE_SECONDS):
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=tls)
        try:
            headers = [("Host", parts.netloc), ("Accept", "application/json"), ("Connection", "close")]
            writer.write(connection.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(connection.send(h11.EndOfMessage()))
            while not isinstance(event := connection.next_event(), (h11.EndOfMessage, h11.ConnectionClosed)):
                if event is h11.NEED_DATA:
                    connection.receive_data(await reader.read(64 * 1024))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"more than {JWKS_MAX_BYTES} bytes")
        finally:
            writer.close()
    if status != 200:
        raise ValueError(f"answered {status}")
    return json.loads(body)


def usable_keys(jwks) -> dict[str, jwt.PyJWK]:
    """The JWKS's signing keys by kid, each bound to the one algorithm its type allows."""
    keys = {}
    for data in jwks.get("keys", []) if isinstance(jwks, dict) else []:
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWTError, KeyError, ValueError, TypeError, AttributeError):
            log.warning("JWKS: skipped a key that is not a valid JWK")
            continue
        if key.algorithm_name in JWKS_ALGORITHMS and isinstance(key.key_id, str) and data.get("use", "sig") == "sig":
            keys[key.key_id] = key
    return keys


class KeySet:
    """Better Auth's public keys. Fetched on first use; refetched in the background once they are
    JWKS_REFRESH_SECONDS old and in use; never used once JWKS_MAX_AGE_SECONDS old (the request then
    waits for a fetch, at most JWKS_DEADLINE_SECONDS), so a key removed from the JWKS stops working.
    An unknown kid (key rotation) causes a fetch too. Fetches are at most one per
    JWKS_REFETCH_SECONDS however many requests want one, and a failed fetch, or one with no usable
    key, keeps the keys there were."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: dict[str, jwt.PyJWK] = {}
        self.loaded_at = float("-inf")  # when self.keys were last read from the JWKS
        self.fetched_at = float("-inf")  # when a fetch was last tried
        self.fetches = 0
        self.lock = asyncio.Lock()
        self.refreshing: asyncio.Task | None = None
        self.clock = time.monotonic

    async def key(self, kid: str) -> jwt.PyJWK | None:
        age = self.clock() - self.loaded_at
        if kid not in self.keys or age >= JWKS_MAX_AGE_SECONDS:
            await self.refetch_unless_recent()
        elif age >= JWKS_REFRESH_SECONDS and self.refreshing is None:
            self.refreshing = asyncio.create_task(self.refetch_unless_recent())
            self.refreshing.add_done_callback(lambda _: setattr(self, "refreshing", None))
        if self.clock() - self.loaded_at >= JWKS_MAX_AGE_SECONDS:
            return None  # too old to trust, and no newer set could be had
        return self.keys.get(kid)

    async def refetch_unless_recent(self) -> None:
        async with self.lock:  # concurrent callers wait for one fetch, not one each
            if self.clock() - self.fetched_at >= JWKS_REFETCH_SECONDS:
                await self.refetch()

    async def refetch(self) -> None:
        self.fetched_at, self.fetches = self.clock(), self.fetches + 1
        try:
            keys = usable_keys(await fetch_json(self.url))
        except (OSError, ValueError, h11.ProtocolError) as exc:  # unreachable, too slow, not a 200, not JSON
            log.warning("JWKS: fetching %s failed (%r); %d cached keys kept", self.url, exc, len(self.keys))
            return
        if not keys:
            log.warning("JWKS: %s has no usable key; %d cached keys kept", self.url, len(self.keys))
            return
        self.keys, self.loaded_at = keys, self.clock()


class TokenVerifier:
    """A bearer token becomes its caller, under the token policy above."""

    def __init__(self, secret: str = "", jwks_url: str = "", issuer: str = "", audience: str = "") -> None:
        self.secret = secret
        self.key_set = KeySet(jwks_url) if jwks_url else None
        self.issuer, self.audience = issuer, audience
        self.verified: dict[bytes, tuple[float, float, Caller]] = {}  # see caller()
        self.clock = time.time

    async def caller(self, token: str) -> Caller:
        """A client sends the same token with every request, so a verified token is remembered (by
        its SHA-256) until it expires, and checked in full again after VERIFIED_TOKEN_SECONDS, so a
        key taken out of the JWKS stops working within that time."""
        if len(token) > MAX_TOKEN_BYTES:
            raise invalid_token()
        key, now = hashlib.sha256(token.encode()).digest(), self.clock()
        if key in self.verified:
            expires_at, recheck_at, caller = self.verified[key]
            if now > expires_at:
                raise invalid_token()
            if now < recheck_at:
                return caller
        claims = await self.verify(token)
        email = claims.get("email")
        caller = Caller(claims["sub"], email if isinstance(email, str) and len(email) <= MAX_EMAIL_LENGTH else None)
        if len(self.verified) >= VERIFIED_TOKENS_KEPT:
            del self.verified[next(iter(self.verified))]  # the oldest
        expires_at = claims["exp"] + CLOCK_SKEW_LEEWAY.total_seconds()
        self.verified[key] = (expires_at, min(expires_at, now + VERIFIED_TOKEN_SECONDS), caller)
        return caller

    async def verify(self, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid_token() from None
        if header.get("alg") == "HS256" and self.secret:
            claims = decode(token, self.secret, HS256_ALGORITHMS)
        elif self.key_set and isinstance(header.get("kid"), str):
            key = await self.key_set.key(header["kid"])
            if key is None:
                raise invalid_token()
            claims = decode(token, key.key, [key.algorithm_name], self.issuer, self.audience)
        else:
            raise invalid_token()
        return claims

    def accepted(self) -> str:
        """Which tokens this verifier accepts, for the start-up log (never the secret)."""
        kinds = ["HS256 signed with BETTER_AUTH_SECRET"] if self.secret else []
        if self.key_set:
            kinds.append(
                f"EdDSA/ES256/RS256 from the JWKS at {self.key_set.url} (iss {self.issuer}, aud {self.audience})"
            )
        return "; ".join(kinds) or "none"


class BearerAuth:
    """Route middleware on every task route (see task_routes): the request's token becomes
    scope["user"], a Caller, or the request ends here with a 401. On path-scoped routes the path's
    {user_id} must be the caller, else 403, before any database work."""

    def __init__(self, app: ASGIApp, path_scoped: bool) -> None:
        self.app = app
        self.path_scoped = path_scoped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        verifier: TokenVerifier = scope["app"].state.verifier
        caller = await verifier.caller(bearer_token(Headers(scope=scope)))
        if self.path_scoped and scope["path_params"]["user_id"] != caller.id:
            raise HTTPException(403, "Forbidden")
        scope["user"] = caller
        await self.app(scope, receive, send)


def mint_token(user_id: str, secret: str, lifetime: timedelta = timedelta(hours=1)) -> str:
    """An HS256 token as the frontend would send it: for trying the API with curl."""
    now = datetime.now(UTC)
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + lifetime}, secret, algorithm="HS256")


# ---------------------------------------------------------------------------------------------------
# SQL. Every statement that reads or changes a task has `user_id = :user_id` in its WHERE clause,
# and so does every statement on task_tags (each tag row carries its task's user).

TASK_COLUMNS = (
    "id, user_id, title, description, completed, priority, tags, due_date, remind_at, recurrence, "
    "next_occurrence_id, created_at, updated_at"
)

# A user's row is made with their first task. Its task_count changes in the same statement (on
# SQLite, the same transaction) as every insert and delete of a task, so an unfiltered list's total is
# read, not counted (counting 100,000 rows for X-Total-Count made such a user's first page 47 times
# slower), and the cap of MAX_TASKS_PER_USER is exact: concurrent creates queue on the user's row.
# No row back means the user is at the cap, and nothing was written.
COUNT_NEW_TASK = """
    INSERT INTO users (id, email, created_at, task_count) VALUES (:user_id, :email, :now, 1)
    ON CONFLICT (id) DO UPDATE SET task_count = users.task_count + 1
    WHERE users.task_count < :max_tasks
    RETURNING id
"""

UNCOUNT_DELETED_TASK = "UPDATE users SET task_count = task_count - 1 WHERE id = :user_id"

INSERT_TASK = f"""
    INSERT INTO tasks (id, user_id, title, description, completed, priority, tags, due_date, due_at, remind_at,
                       recurrence, created_at, updated_at)
    VALUES (:id, :user_id, :title, :description, :completed, :priority, :tags, :due_date, :due_at, :remind_at,
            :recurrence, :now, :now)
    RETURNING {TASK_COLUMNS}
"""

# A tag row carries its task's created_at: a tag's tasks are listed newest first from its index.
INSERT_TASK_TAG = """
    INSERT INTO task_tags (task_id, user_id, tag, created_at) VALUES (:id, :user_id, :tag, :created_at)
"""

# PostgreSQL does it all in one statement (SQLite has no INSERT inside WITH: it runs the statements
# above in a transaction). The task is inserted only if the user's count went up, its tags only if
# the task was.
CREATE_TASK = f"""
    WITH counted AS ({COUNT_NEW_TASK}),
    created AS (
        INSERT INTO tasks (id, user_id, title, description, completed, priority, tags, due_date, due_at,
                           remind_at, recurrence, created_at, updated_at)
        SELECT CAST(:id AS TEXT), CAST(:user_id AS TEXT), CAST(:title AS TEXT), CAST(:description AS TEXT),
               CAST(:completed AS BOOLEAN), CAST(:priority AS INTEGER), CAST(:tags AS TEXT),
               CAST(:due_date AS TEXT), CAST(:due_at AS TEXT), CAST(:remind_at AS TEXT),
               CAST(:recurrence AS TEXT), CAST(:now AS TEXT), CAST(:now AS TEXT)
        FROM counted
        RETURNING {TASK_COLUMNS}
    ),
    tagged AS (
        INSERT INTO task_tags (task_id, user_id, tag, created_at)
        SELECT created.id, :user_id, key, created.created_at
        FROM created, jsonb_array_elements_text(CAST(:tag_keys AS jsonb)) AS key
    )
    SELECT {TASK_COLUMNS} FROM created
"""

SELECT_TASK = f"""
    SELECT {TASK_COLUMNS} FROM tasks
    WHERE id = :id AND user_id = :user_id
"""

# SQLite's change of a task: it reads the task (the transaction holds the one connection), works out
# the change in Python (changed_task), and writes every column.
SELECT_TASK_TO_CHANGE = f"""
    SELECT {TASK_COLUMNS}, due_at FROM tasks
    WHERE id = :id AND user_id = :user_id
"""

WRITE_TASK = f"""
    UPDATE tasks SET title = :title, description = :description, completed = :completed, priority = :priority,
        tags = :tags, due_date = :due_date, due_at = :due_at, remind_at = :remind_at, recurrence = :recurrence,
        next_occurrence_id = :next_occurrence_id, updated_at = :now
    WHERE id = :id AND user_id = :user_id
    RETURNING {TASK_COLUMNS}
"""

DELETE_TASK_TAGS = "DELETE FROM task_tags WHERE task_id = :id AND user_id = :user_id"

COPY_TASK_TAGS = """
    INSERT INTO task_tags (task_id, user_id, tag, created_at)
    SELECT :successor_id, user_id, tag, :now FROM task_tags WHERE task_id = :id AND user_id = :user_id
"""

# PostgreSQL's change of a task, in one statement: PUT, PATCH, /complete and /toggle alike. A field
# changes only when its set_ flag is true (:flip turns completed over). `plan` works out the new row
# and what the change does: `refused` says why it cannot be made (then nothing is written), `recurs`
# that it completes a recurring task, which then gets its successor one period later, with the same
# tags, in the same statement. The task and the user's row are locked (FOR UPDATE), so concurrent
# completions of one task see each other, and the cap holds.
CHANGE_TASK = f"""
    WITH old AS (
        SELECT * FROM tasks WHERE id = :id AND user_id = :user_id FOR UPDATE
    ),
    new AS (
        SELECT
            CASE WHEN :set_title THEN CAST(:title AS TEXT) ELSE title END AS new_title,
            CASE WHEN :set_description THEN CAST(:description AS TEXT) ELSE description END AS new_description,
            CASE WHEN :flip THEN NOT completed WHEN :set_completed THEN CAST(:completed AS BOOLEAN)
                 ELSE completed END AS new_completed,
            CASE WHEN :set_priority THEN CAST(:priority AS INTEGER) ELSE priority END AS new_priority,
            CASE WHEN :set_tags THEN CAST(:tags AS TEXT) ELSE tags END AS new_tags,
            CASE WHEN :set_due_date THEN CAST(:due_date AS TEXT) ELSE due_date END AS new_due_date,
            CASE WHEN :set_due_date THEN CAST(:due_at AS TEXT) ELSE due_at END AS new_due_at,
            CASE WHEN :set_remind_at THEN CAST(:remind_at AS TEXT) ELSE remind_at END AS new_remind_at,
            CASE WHEN :set_recurrence THEN CAST(:recurrence AS TEXT) ELSE recurrence END AS new_recurrence,
            completed AS was_completed, next_occurrence_id AS old_next_occurrence_id
        FROM old
    ),
    plan AS (
        SELECT new.*,
            new_recurrence IS NOT NULL AND new_due_date IS NULL AS lacks_due_date,
            NOT was_completed AND new_completed AND new_recurrence IS NOT NULL AND new_due_date IS NOT NULL
                AND old_next_occurrence_id IS NULL AS recurs
        FROM new
    ),
    owner AS (
        SELECT task_count FROM users
        WHERE id = :user_id AND EXISTS (SELECT 1 FROM plan WHERE recurs)
        FOR UPDATE
    ),
    verdict AS (
        SELECT plan.*,
            CASE WHEN lacks_due_date THEN 'recurrence'
                 WHEN recurs AND (SELECT task_count FROM owner) >= :max_tasks THEN 'limit' END AS refused
        FROM plan
    ),
    changed AS (
        UPDATE tasks SET title = new_title, description = new_description, completed = new_completed,
            priority = new_priority, tags = new_tags, due_date = new_due_date, due_at = new_due_at,
            remind_at = new_remind_at, recurrence = new_recurrence,
            next_occurrence_id = CASE WHEN recurs THEN CAST(:successor_id AS TEXT) ELSE next_occurrence_id END,
            updated_at = :now
        FROM verdict
        WHERE id = :id AND user_id = :user_id AND refused IS NULL
        RETURNING {TASK_COLUMNS}, due_at, recurs
    ),
    retagged AS (
        INSERT INTO task_tags (task_id, user_id, tag, created_at)
        SELECT :id, :user_id, key, changed.created_at
        FROM changed, jsonb_array_elements_text(CAST(:tag_keys AS jsonb)) AS key
        WHERE :set_tags
        ON CONFLICT DO NOTHING
    ),
    untagged AS (
        DELETE FROM task_tags
        WHERE task_id = :id AND user_id = :user_id AND :set_tags AND EXISTS (SELECT 1 FROM changed)
          AND tag NOT IN (SELECT jsonb_array_elements_text(CAST(:tag_keys AS jsonb)))
    ),
    counted AS (
        UPDATE users SET task_count = task_count + 1
        WHERE id = :user_id AND EXISTS (SELECT 1 FROM changed WHERE recurs)
    ),
    next AS (
        SELECT changed.*, CAST(due_at AS timestamp) AS due, CAST(due_at AS timestamp) + CASE recurrence
            WHEN 'daily' THEN interval '1 day' WHEN 'weekly' THEN interval '7 days' ELSE interval '1 month'
        END AS next_due
        FROM changed WHERE recurs
    ),
    successor AS (
        INSERT INTO tasks (id, user_id, title, description, completed, priority, tags, due_date, due_at, remind_at,
                           recurrence, created_at, updated_at)
        SELECT :successor_id, :user_id, title, description, FALSE, priority, tags,
            CASE WHEN length(due_date) = 10 THEN to_char(next_due, 'YYYY-MM-DD')
                 ELSE to_char(next_due, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END,
            to_char(next_due, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            to_char(CAST(remind_at AS timestamp) + (next_due - due), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            recurrence, :now, :now
        FROM next
        RETURNING id
    ),
    successor_tagged AS (
        INSERT INTO task_tags (task_id, user_id, tag, created_at)
        SELECT :successor_id, :user_id, key, :now FROM jsonb_array_elements_text(CAST(:tag_keys AS jsonb)) AS key
        WHERE :set_tags AND EXISTS (SELECT 1 FROM successor)
        UNION ALL
        SELECT :successor_id, :user_id, tag, :now FROM task_tags
        WHERE task_id = :id AND user_id = :user_id AND NOT :set_tags AND EXISTS (SELECT 1 FROM successor)
    )
    SELECT verdict.refused, changed.* FROM verdict LEFT JOIN changed ON TRUE
"""

DELETE_TASK = """
    DELETE FROM tasks
    WHERE id = :id AND user_id = :user_id
    RETURNING id
"""

# PostgreSQL: the delete and the count's change in one statement; SQLite runs the two statements.
# The task's tags go with it (ON DELETE CASCADE).
DELETE_AND_UNCOUNT_TASK = f"""
    WITH deleted AS ({DELETE_TASK}),
    uncounted AS (
        UPDATE users SET task_count = task_count - 1
        WHERE id = :user_id AND EXISTS (SELECT 1 FROM deleted)
    )
    SELECT id FROM deleted
"""

# Each filter is off when its parameter is NULL. The CASTs give PostgreSQL the parameter's type,
# which `:x IS NULL` alone does not; SQLite accepts them unchanged. The instants compared are
# due_at and remind_at, in the fixed timestamp format, so text comparison is time order.
TASK_FILTER = """
      AND (CAST(:completed AS BOOLEAN) IS NULL OR completed = :completed)
      AND (CAST(:pattern AS TEXT) IS NULL
           OR lower(title) LIKE :pattern ESCAPE '!'
           OR lower(description) LIKE :pattern ESCAPE '!')
      AND priority IN (:priority_1, :priority_2, :priority_3)
      AND (CAST(:due_before AS TEXT) IS NULL OR due_at < :due_before)
      AND (CAST(:due_after AS TEXT) IS NULL OR due_at > :due_after)
      AND (CAST(:overdue AS BOOLEAN) IS NULL
           OR (COALESCE(due_at < :now, FALSE) AND NOT completed) = :overdue)
      AND (CAST(:reminder_due AS BOOLEAN) IS NULL
           OR (COALESCE(remind_at <= :now, FALSE) AND NOT completed) = :reminder_due)
"""


def more_tags(task_id: str) -> str:
    """Every tag after the first (which the statements below start from) must be there too."""
    return "".join(
        f"      AND (CAST(:tag_{n} AS TEXT) IS NULL\n"
        f"           OR {task_id} IN (SELECT task_id FROM task_tags WHERE user_id = :user_id AND tag = :tag_{n}))\n"
        for n in range(2, MAX_TAGS + 1)
    )


WITH_FIRST_TAG = "id IN (SELECT task_id FROM task_tags WHERE user_id = :user_id AND tag = :tag_1)"

# How each sort orders, from fixed text (never from the request); ties are broken by id, so paging
# never repeats or skips. Tasks without a due date come last in either order.
SORTS = {
    "created_at": "created_at {0}, id {0}",
    "updated_at": "updated_at {0}, id {0}",
    "title": "title {0}, id {0}",
    "priority": "priority {0}, id {0}",
    "due_date": "(due_at IS NULL), due_at {0}, id {0}",
}
SORT_ORDERS = {"asc": "ASC", "desc": "DESC"}

# A list is one statement: the total (X-Total-Count) beside the page, so that a page past the end
# still has its total. The total of an unfiltered list is the user's task_count; of a list filtered
# by tags alone, a count of task_tags' index entries; otherwise a count of the matching tasks, which
# costs in proportion to them.
TOTALS = {
    "all": "SELECT task_count AS total_count FROM users WHERE id = :user_id",
    "tags": f"""
        SELECT COUNT(*) AS total_count FROM task_tags
        WHERE user_id = :user_id AND tag = :tag_1 {more_tags("task_id")}
    """,
    "matching": f"SELECT COUNT(*) AS total_count FROM tasks WHERE user_id = :user_id {TASK_FILTER}",
    "tagged": f"""
        SELECT COUNT(*) AS total_count FROM tasks
        WHERE user_id = :user_id AND {WITH_FIRST_TAG} {more_tags("id")} {TASK_FILTER}
    """,
}
PAGES = {
    "all": "SELECT {columns} FROM tasks WHERE user_id = :user_id ORDER BY {sort} LIMIT :limit OFFSET :offset",
    "matching": f"""
        SELECT {{columns}} FROM tasks WHERE user_id = :user_id {TASK_FILTER}
        ORDER BY {{sort}} LIMIT :limit OFFSET :offset
    """,
    "tagged": f"""
        SELECT {{columns}} FROM tasks WHERE user_id = :user_id AND {WITH_FIRST_TAG} {more_tags("id")} {TASK_FILTER}
        ORDER BY {{sort}} LIMIT :limit OFFSET :offset
    """,
    # Tags alone, newest or oldest first (a tag view's default): the page's ids come from task_tags'
    # index on (user_id, tag, created_at), so only the page's tasks are read, however many have the tag.
    "tags by created_at": f"""
        SELECT {{columns}} FROM tasks WHERE user_id = :user_id AND id IN (
            SELECT task_id FROM task_tags WHERE user_id = :user_id AND tag = :tag_1 {more_tags("task_id")}
            ORDER BY created_at {{direction}}, task_id {{direction}} LIMIT :limit OFFSET :offset
        )
        ORDER BY {{sort}}
    """,
}
LIST_KINDS = {  # (total, page) for: no filter, tags alone sorted by created_at, tags alone, filters
    "all": ("all", "all"),
    "tags by created_at": ("tags", "tags by created_at"),
    "tags": ("tags", "tagged"),
    "tagged": ("tagged", "tagged"),
    "matching": ("matching", "matching"),
}
LIST_TASKS = {
    (kind, sort, order): f"""
        SELECT total.total_count, page.* FROM ({TOTALS[total]}) AS total
        LEFT JOIN ({
        PAGES[page].format(columns=f"{TASK_COLUMNS}, due_at", sort=sql.format(direction), direction=direction)
    }) AS page ON TRUE
        ORDER BY {sql.format(direction)}
    """
    for kind, (total, page) in LIST_KINDS.items()
    for sort, sql in SORTS.items()
    for order, direction in SORT_ORDERS.items()
}

# ---------------------------------------------------------------------------------------------------
# Request parsing and validation: clean values, or a 400 / 413 / 422 in the contract's shape.


def invalid(*errors: tuple) -> HTTPException:
    """A 422 in FastAPI's shape; each error is (loc, msg, type)."""
    return HTTPException(422, [{"loc": list(loc), "msg": msg, "type": kind} for loc, msg, kind in errors])


def reject_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def read_json_body(request: Request, required: bool = True):
    """The parsed body; None for an empty body where one is optional."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, "Request body too large")
    body = b""
    async for chunk in request.stream():  # a chunked body has no length to check in advance
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, "Request body too large")
    if not body.strip() and not required:
        return None
    try:
        return json.loads(body, parse_constant=reject_json_constant)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise HTTPException(400, "Invalid JSON body") from None


def storable_text(value: str) -> bool:
    """PostgreSQL text holds neither NUL nor unpaired surrogates; refuse them on both databases."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_errors(name: str, value, max_length: int) -> list:
    loc = ("body", name)
    if not isinstance(value, str):
        return [(loc, "Input should be a valid string", "string_type")]
    if not storable_text(value):
        return [(loc, "String should not contain NUL characters or unpaired surrogates", "string_unicode")]
    if len(value) > max_length:
        return [(loc, f"String should have at most {max_length} characters", "string_too_long")]
    return []


# What JavaScript's String.prototype.trim() removes, as the frontends do; Python's str.strip() would
# also take \x1c-\x1f and \x85, which JSON Schema's \s (in openapi.json) does not.
WHITE_SPACE = "\t\n\v\f\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(map(chr, range(0x2000, 0x200B)))


def parse_task_fields(body, partial: bool) -> dict:
    """The fields of a create (all rules, defaults for what is missing) or an update (only the
    fields given, at least one), as the database stores them: priority as its rank, tags as JSON
    (and tag_keys, their case-folded keys), due_date with due_at, the instant it stands for."""
    if not isinstance(body, dict):
        raise invalid((("body",), "Input should be a valid JSON object", "model_attributes_type"))
    fields, errors = {}, []
    if "title" in body:
        title = body["title"].strip(WHITE_SPACE) if isinstance(body["title"], str) else body["title"]
        errors += text_errors("title", title, TITLE_MAX)
        if title == "":
            errors.append((("body", "title"), "String should have at least 1 character", "string_too_short"))
        fields["title"] = title
    elif not partial:
        errors.append((("body", "title"), "Field required", "missing"))
    if "description" in body:
        if body["description"] is not None:
            errors += text_errors("description", body["description"], DESCRIPTION_MAX)
        fields["description"] = body["description"]
    if "completed" in body:
        errors += completed_errors(body["completed"])
        fields["completed"] = body["completed"]
    if "priority" in body:
        if not isinstance(body["priority"], str) or body["priority"] not in PRIORITIES:
            errors.append((("body", "priority"), "Input should be 'low', 'medium' or 'high'", "enum"))
        else:
            fields["priority"] = PRIORITIES[body["priority"]]
    if "tags" in body:
        tags, tag_errors = parse_tags(body["tags"])
        errors += tag_errors
        fields["tags"], fields["tag_keys"] = json.dumps(tags), [tag.casefold() for tag in tags]
    if "due_date" in body:
        try:
            fields["due_date"], fields["due_at"] = parse_moment(body["due_date"], date_means="end")
        except ValueError as problem:
            errors.append((("body", "due_date"), *problem.args))
    if "remind_at" in body:
        try:
            fields["remind_at"] = parse_moment(body["remind_at"], date_means=None)[1]
        except ValueError as problem:
            errors.append((("body", "remind_at"), *problem.args))
    if "recurrence" in body:
        if body["recurrence"] is not None and body["recurrence"] not in RECURRENCES:
            errors.append((("body", "recurrence"), "Input should be 'daily', 'weekly', 'monthly' or null", "enum"))
        fields["recurrence"] = body["recurrence"]
    if not partial and fields.get("recurrence") and not fields.get("due_date") and not errors:
        errors.append(recurrence_needs_due_date())
    if partial and not fields and not errors:
        errors.append((("body",), f"At least one of {', '.join(TASK_FIELDS)} is required", "missing"))
    if errors:
        raise invalid(*errors)
    if not partial:
        fields = {**NEW_TASK_DEFAULTS, **fields}
    return fields


TASK_FIELDS = ("title", "description", "completed", "priority", "tags", "due_date", "remind_at", "recurrence")
NEW_TASK_DEFAULTS = {
    "description": None,
    "completed": False,
    "priority": PRIORITIES["medium"],
    "tags": "[]",
    "tag_keys": [],
    "due_date": None,
    "due_at": None,
    "remind_at": None,
    "recurrence": None,
}


def recurrence_needs_due_date() -> tuple:
    return (("body", "recurrence"), "A recurring task needs a due_date", "recurrence_without_due_date")


def parse_tags(value) -> tuple[list[str], list]:
    """Trimmed, 1 to TAG_MAX characters each, at most MAX_TAGS; tags that differ only in case are
    one tag, spelled as it first came; order is kept."""
    loc = ("body", "tags")
    if not isinstance(value, list):
        return [], [(loc, "Input should be a valid array of strings", "list_type")]
    tags, keys, errors = [], set(), []
    for index, tag in enumerate(value):
        tag = tag.strip(WHITE_SPACE) if isinstance(tag, str) else tag
        if problems := text_errors("tags", tag, TAG_MAX):
            errors += [((*loc, index), msg, kind) for _, msg, kind in problems]
        elif not tag:
            errors.append(((*loc, index), "String should have at least 1 character", "string_too_short"))
        elif tag.casefold() not in keys:
            keys.add(tag.casefold())
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        errors.append((loc, f"At most {MAX_TAGS} tags (after merging those that differ only in case)", "too_long"))
    return tags, errors


DATE = re.compile(r"(\d{4})-(\d\d)-(\d\d)")
DATE_TIME = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?([Zz]|[+-]\d\d:\d\d)?")


def parse_moment(value, date_means: str | None) -> tuple[str | None, str | None]:
    """(as served, the instant in the stored format) for null, a date "YYYY-MM-DD" (where
    `date_means` allows one: "start" or "end" of that day, UTC) or an RFC 3339 date-time with Z or
    an offset (served in UTC). A ValueError carries the 422's (msg, type)."""
    if value is None:
        return None, None
    expected = "a date (YYYY-MM-DD) or an RFC 3339 date-time" if date_means else "an RFC 3339 date-time"
    if not isinstance(value, str):
        raise ValueError(f"Input should be {expected}", "datetime_type")
    if date_means and DATE.fullmatch(value):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"Input should be {expected}", "datetime_parsing") from None
        if day.year > MOMENT_YEAR_MAX:
            raise ValueError(f"Input should be a moment in the years 1 to {MOMENT_YEAR_MAX}", "datetime_range")
        moment = datetime.combine(day, dt_time.max if date_means == "end" else dt_time.min)
        return value, stamp(moment)
    parts = DATE_TIME.fullmatch(value)
    if not parts:
        raise ValueError(f"Input should be {expected}", "datetime_parsing")
    day, hour, minute, second, fraction, offset = parts.groups()
    if offset is None:
        raise ValueError(
            "A date-time needs Z or an offset such as +02:00: without one it is ambiguous", "timezone_aware"
        )
    try:
        zone = (
            UTC
            if offset in "Zz"
            else timezone(int(offset[0] + "1") * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:])))
        )
        local = datetime.combine(
            date.fromisoformat(day),
            dt_time(int(hour), int(minute), int(second), int((fraction or "0").ljust(6, "0")[:6])),
        )
        moment = local.replace(tzinfo=zone).astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"Input should be {expected}", "datetime_parsing") from None
    if not 1 <= moment.year <= MOMENT_YEAR_MAX:
        raise ValueError(f"Input should be a moment in the years 1 to {MOMENT_YEAR_MAX}", "datetime_range")
    return stamp(moment), stamp(moment)


def stamp(moment: datetime) -> str:
    """The one timestamp format stored and served (see schema.sql), from a UTC datetime."""
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def completed_errors(value) -> list:
    if type(value) is not bool:  # "true" and 1 are not booleans
        return [(("body", "completed"), "Input should be a valid boolean", "bool_type")]
    return []


def parse_completed_body(body):
    """The body of /complete and /toggle: nothing (flip), or {"completed": bool} (set)."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise invalid((("body",), "Input should be a valid JSON object", "model_attributes_type"))
    if "completed" not in body:
        return None
    if errors := completed_errors(body["completed"]):
        raise invalid(*errors)
    return body["completed"]


def task_id_or_404(request: Request) -> str:
    """The path's task id in canonical form; an id that is not a UUID names no task."""
    try:
        return str(uuid.UUID(request.path_params["task_id"]))
    except ValueError:
        raise task_not_found() from None


def task_not_found() -> HTTPException:
    # The same bytes for a missing task and for another user's, so neither can be told apart.
    return HTTPException(404, "Task not found")


def non_negative_int(params, name: str, default: int, low: int, high: int, errors: list) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if raw.isascii() and raw.isdigit() and len(raw) <= MAX_QUERY_NUMBER_DIGITS and low <= int(raw) <= high:
        return int(raw)
    errors.append((("query", name), f"Input should be a whole number from {low} to {high}", "int_range"))
    return default


def choice(raw: str | None, name: str, options, default, errors: list):
    if raw is None:
        return default
    if raw not in options:
        errors.append((("query", name), f"Input should be one of: {', '.join(options)}", "enum"))
    return raw


def aliased(params, name: str, alias: str, errors: list) -> str | None:
    """A parameter that frontends also send under another name (search for q, sort_by for sort)."""
    given = params.getlist(name) + params.getlist(alias)
    if len(set(given)) > 1:
        errors.append((("query", name), f"Give {name} or {alias}, not both with different values", "value_error"))
    return given[-1] if given else None


def escape_like(text: str) -> str:
    """Make % and _ match themselves: '!' is the ESCAPE character in TASK_FILTER."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def parse_list_query(params) -> dict:
    """The list's statement and its values: every filter, NULL where it is off."""
    errors = []
    completed = choice(params.get("completed"), "completed", ("true", "false"), None, errors)
    status = choice(params.get("status"), "status", ("all", "pending", "completed"), "all", errors)
    sort = choice(aliased(params, "sort", "sort_by", errors), "sort", tuple(SORTS), "created_at", errors)
    order = choice(aliased(params, "order", "sort_order", errors), "order", tuple(SORT_ORDERS), "desc", errors)
    overdue = choice(params.get("overdue"), "overdue", ("true", "false"), None, errors)
    reminder_due = choice(params.get("reminder_due"), "reminder_due", ("true", "false"), None, errors)
    limit = non_negative_int(params, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX, errors)
    offset = non_negative_int(params, "offset", 0, 0, SQL_BIGINT_MAX, errors)
    q = aliased(params, "q", "search", errors) or ""
    if not storable_text(q) or len(q) > TITLE_MAX + DESCRIPTION_MAX:
        errors.append((("query", "q"), "Search text is too long or not valid text", "string_type"))
    priorities = [choice(p, "priority", tuple(PRIORITIES), None, errors) for p in params.getlist("priority")]
    tags = [tag.strip(WHITE_SPACE) for tag in params.getlist("tag")]
    if len(tags) > MAX_TAGS or not all(0 < len(tag) <= TAG_MAX for tag in tags):
        errors.append((("query", "tag"), f"At most {MAX_TAGS} tags, each 1 to {TAG_MAX} characters", "value_error"))
    tag_keys = list(dict.fromkeys(tag.casefold() for tag in tags))
    unmatchable = not all(storable_text(tag) for tag in tags)  # a tag with NUL: no task has it
    moments = {}
    for name, date_means in (("due_before", "start"), ("due_after", "end")):
        try:
            moments[name] = parse_moment(params.get(name), date_means)[1]
        except ValueError as problem:
            errors.append((("query", name), *problem.args))
    if errors:
        raise invalid(*errors)
    wanted = {"true": True, "false": False}.get(completed)
    status_wants = {"all": wanted, "pending": False, "completed": True}[status]
    # completed and status disagreeing, like a tag no task can have, match nothing: no query needed.
    matches_nothing = unmatchable or wanted not in (None, status_wants)
    wanted = status_wants
    ranks = [PRIORITIES[p] for p in priorities] or list(PRIORITY_NAMES)
    values = {
        "completed": wanted,
        "pattern": f"%{escape_like(q.lower())}%" if q else None,
        **{f"priority_{n}": ranks[(n - 1) % len(ranks)] for n in (1, 2, 3)},
        **moments,
        "overdue": {"true": True, "false": False}.get(overdue),
        "reminder_due": {"true": True, "false": False}.get(reminder_due),
        "now": utc_now(),
        **{f"tag_{n}": key for n, key in enumerate(tag_keys + [None] * (MAX_TAGS - len(tag_keys)), start=1)},
        "limit": limit,
        "offset": offset,
    }
    filtered = any(values[name] is not None for name in ("completed", "pattern", *moments, "overdue", "reminder_due"))
    if tag_keys and not filtered and not priorities:
        kind = "tags by created_at" if sort == "created_at" else "tags"
    else:
        kind = "tagged" if tag_keys else "matching" if filtered or priorities else "all"
    return {"statement": LIST_TASKS[(kind, sort, order)], "values": values, "matches_nothing": matches_nothing}


# ---------------------------------------------------------------------------------------------------
# Handlers. Each reads its caller from request.user (set by BearerAuth) and is given `envelope`
# by its route family: token-scoped routes wrap bodies as {"data": ...}, path-scoped ones do not.


def task_json(row) -> dict:
    return {
        "id": row["id"],
        "user_id": row["user_id"],
        "title": row["title"],
        "description": row["description"],
        "completed": bool(row["completed"]),  # SQLite answers 0 or 1
        "priority": PRIORITY_NAMES[row["priority"]],
        "tags": json.loads(row["tags"]),
        "due_date": row["due_date"],
        "remind_at": row["remind_at"],
        "recurrence": row["recurrence"],
        "next_occurrence_id": row["next_occurrence_id"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def task_or_404(rows: list) -> dict:
    """The one task an UPDATE ... RETURNING or SELECT found; none found is the contract's 404."""
    if not rows:
        raise task_not_found()
    return task_json(rows[0])


def reply(body, envelope: bool, status_code: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"data": body} if envelope else body, status_code, headers=headers)


def task_limit_reached() -> HTTPException:
    return HTTPException(409, "Task limit reached")


async def list_tasks(request: Request, envelope: bool) -> Response:
    """The caller's tasks, filtered, sorted and paged; X-Total-Count counts every match."""
    query = parse_list_query(request.query_params)
    values = {**query["values"], "user_id": request.user.id}
    database = request.app.state.database
    if query["matches_nothing"]:
        return reply([], envelope, headers={"X-Total-Count": "0"})
    rows = await database.fetch(query["statement"], values)
    total = rows[0]["total_count"] if rows else 0  # no row: the user has never had a task
    rows = [row for row in rows if row["id"] is not None]  # a page past the end is one row, all NULL
    return reply([task_json(row) for row in rows], envelope, headers={"X-Total-Count": str(total)})


async def create_task(request: Request, envelope: bool) -> Response:
    fields = parse_task_fields(await read_json_body(request), partial=False)
    database, caller = request.app.state.database, request.user
    values = {
        **fields,
        "id": str(uuid.uuid4()),
        "user_id": caller.id,
        "email": caller.email,
        "now": utc_now(),
        "max_tasks": request.app.state.max_tasks_per_user,
    }
    if database.dialect == "postgresql":
        rows = await database.fetch(CREATE_TASK, {**values, "tag_keys": json.dumps(fields["tag_keys"])})
    else:
        async with database.transaction() as run:
            rows = await run(COUNT_NEW_TASK, values)
            if rows:
                rows = await run(INSERT_TASK, values)
                for tag in fields["tag_keys"]:
                    await run(INSERT_TASK_TAG, {**values, "tag": tag, "created_at": values["now"]})
    if not rows:
        raise task_limit_reached()
    location = f"{quote(request.url.path)}/{rows[0]['id']}"
    return reply(task_json(rows[0]), envelope, 201, headers={"Location": location})


async def get_task(request: Request, envelope: bool) -> Response:
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    rows = await request.app.state.database.fetch(SELECT_TASK, values)
    return reply(task_or_404(rows), envelope)


async def update_task(request: Request, envelope: bool) -> Response:
    """PUT and PATCH alike: change the fields given, at least one."""
    task_id = task_id_or_404(request)
    fields = parse_task_fields(await read_json_body(request), partial=True)
    return reply(await change_task(request, task_id, fields, flip=False), envelope)


async def complete_task(request: Request, envelope: bool) -> Response:
    """Flip `completed`, or set it when the body says {"completed": bool}."""
    task_id = task_id_or_404(request)
    completed = parse_completed_body(await read_json_body(request, required=False))
    fields = {} if completed is None else {"completed": completed}
    return reply(await change_task(request, task_id, fields, flip=completed is None), envelope)


async def change_task(request: Request, task_id: str, fields: dict, flip: bool) -> dict:
    """Apply a change to the caller's task atomically; completing a recurring task creates its next
    occurrence in the same change (at most once per task, ever)."""
    database = request.app.state.database
    values = {
        "id": task_id,
        "user_id": request.user.id,
        "now": utc_now(),
        "successor_id": str(uuid.uuid4()),
        "max_tasks": request.app.state.max_tasks_per_user,
        "flip": flip,
    }
    if database.dialect == "postgresql":
        for name in TASK_FIELDS:
            values[f"set_{name}"] = name in fields
            values[name] = fields.get(name)
        values["due_at"] = fields.get("due_at")  # set with due_date
        values["tag_keys"] = json.dumps(fields.get("tag_keys", []))
        rows = await database.fetch(CHANGE_TASK, values)
        if rows and rows[0]["refused"] == "recurrence":
            raise invalid(recurrence_needs_due_date())
        if rows and rows[0]["refused"] == "limit":
            raise task_limit_reached()
        return task_or_404([row for row in rows if row["id"] is not None])
    async with database.transaction() as run:
        return await change_task_in_sqlite(run, values, fields, flip)


async def change_task_in_sqlite(run, values: dict, fields: dict, flip: bool) -> dict:
    """CHANGE_TASK's work, for SQLite: read, decide in Python, write, in the caller's transaction."""
    old = await run(SELECT_TASK_TO_CHANGE, values)
    if not old:
        raise task_not_found()
    old = {**old[0], "completed": bool(old[0]["completed"])}
    new = {**old, **{name: value for name, value in fields.items() if name != "tag_keys"}}
    if flip:
        new["completed"] = not old["completed"]
    if new["recurrence"] and not new["due_date"]:
        raise invalid(recurrence_needs_due_date())
    recurs = not old["completed"] and new["completed"] and new["recurrence"] and not old["next_occurrence_id"]
    if recurs:
        if not await run(COUNT_NEW_TASK, {**values, "email": None}):
            raise task_limit_reached()
        new["next_occurrence_id"] = values["successor_id"]
    [row] = await run(WRITE_TASK, {**values, **new})
    if "tag_keys" in fields:
        await run(DELETE_TASK_TAGS, values)
        for tag in fields["tag_keys"]:
            await run(INSERT_TASK_TAG, {**values, "tag": tag, "created_at": old["created_at"]})
    if recurs:
        successor = {**new, **next_occurrence(new), "id": values["successor_id"], "completed": False}
        await run(INSERT_TASK, {**values, **successor})
        await run(COPY_TASK_TAGS, values)
    return task_json(row)


def next_occurrence(task: dict) -> dict:
    """due_date one period on (monthly: the same day of the next month, or its last day), as a date
    if it was one, and remind_at moved by as much. PostgreSQL does the same in CHANGE_TASK."""
    due = datetime.fromisoformat(task["due_at"])
    if task["recurrence"] == "monthly":
        year, month = (due.year, due.month + 1) if due.month < 12 else (due.year + 1, 1)
        next_due = due.replace(year=year, month=month, day=min(due.day, calendar.monthrange(year, month)[1]))
    else:
        next_due = due + timedelta(days=1 if task["recurrence"] == "daily" else 7)
    remind_at = task["remind_at"] and stamp(datetime.fromisoformat(task["remind_at"]) + (next_due - due))
    due_at = stamp(next_due)
    return {
        "due_date": due_at[:10] if len(task["due_date"]) == 10 else due_at,
        "due_at": due_at,
        "remind_at": remind_at,
    }


async def delete_task(request: Request, envelope: bool) -> Response:
    database = request.app.state.database
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    if database.dialect == "postgresql":
        deleted = await database.fetch(DELETE_AND_UNCOUNT_TASK, values)
    else:
        async with database.transaction() as run:
            deleted = await run(DELETE_TASK, values)
            if deleted:
                await run(UNCOUNT_DELETED_TASK, values)
    if not deleted:
        raise task_not_found()
    return Response(status_code=204)


async def health(request: Request) -> Response:
    """No token needed: the platform's health check calls it."""
    try:
        await request.app.state.database.fetch("SELECT 1")
    except Exception:
        log.warning("health check: database did not answer", exc_info=True)
        return JSONResponse({"status": "unavailable", "database": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


# ---------------------------------------------------------------------------------------------------
# Errors: every error body is JSON with a `detail` key, and a 500 never shows internals.


async def http_error(request: Request, exc: HTTPException) -> Response:
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names only the first route on the path; each method here has its own.
        allowed = {
            method
            for route in request.app.routes
            if route.path_regex.fullmatch(request.url.path)
            for method in route.methods
        }
        headers = {"Allow": ", ".join(sorted(allowed))}
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)


def is_database_outage(exc: Exception) -> bool:
    """Errors that mean the database cannot be reached now, as opposed to a bug in a query."""
    if isinstance(exc, sqlite3.OperationalError):
        return exc.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR")
    return isinstance(exc, DATABASE_OUTAGES)


DATABASE_OUTAGES = (
    OSError,  # refused, reset, unreachable, and TimeoutError (connect and command timeouts)
    psycopg.OperationalError,  # SQLSTATE classes 08, 53, 57: connection, resources, shutting down
    psycopg.InterfaceError,  # the connection closed under us
    psycopg_pool.PoolTimeout,  # no connection could be had within the connect timeout
)


async def database_error(request: Request, exc: Exception) -> Response:
    if not is_database_outage(exc):
        raise exc
    log.warning("request %s: database unavailable: %r", request.state.request_id, exc)
    return JSONResponse({"detail": "Database unavailable"}, 503, headers={"Retry-After": "5"})


async def server_error(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    log.error("request %s: unhandled error on %s %s", request_id, request.method, request.url.path, exc_info=exc)
    # This response leaves from outside RequestLog and CORSMiddleware, so it carries their headers
    # itself: a browser at an allowed origin could not read the error otherwise.
    headers = response_headers(request.scope, request_id)
    if request.headers.get("origin") in CORS_ORIGINS:
        headers |= {
            "Access-Control-Allow-Origin": request.headers["origin"],
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": ", ".join(CORS_EXPOSED_HEADERS),
            "Vary": "Origin",
        }
    return JSONResponse({"detail": "Internal server error"}, 500, headers=headers)


# ---------------------------------------------------------------------------------------------------
# The request log, and the headers every response carries

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Made request ids: this process's random half, then a count; unique without a random draw each.
REQUEST_ID_PREFIX, REQUEST_NUMBERS = secrets.token_hex(8), itertools.count()


def response_headers(scope, request_id: str) -> dict:
    # Vary: a response differs by Origin (CORS headers), so a cache must not serve it to another.
    headers = {"X-Request-ID": request_id, "X-Content-Type-Options": "nosniff", "Vary": "Origin"}
    if scope["path"].startswith("/api/"):
        headers["Cache-Control"] = "no-store"  # user data must not sit in shared caches
    return headers


class RequestLog:
    """Gives every request an id (the caller's X-Request-ID when it is sane), adds the headers every
    response carries, and logs one line: id, method, route, status, milliseconds. The route is the
    template (/api/{user_id}/tasks), so neither user ids, query text, tokens nor bodies are logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        offered = Headers(scope=scope).get("x-request-id", "")
        request_id = offered if REQUEST_ID.fullmatch(offered) else f"{REQUEST_ID_PREFIX}{next(REQUEST_NUMBERS):016x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the client gets if the app raises before answering

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Raw (name, value) pairs, lower-case names, as ASGI has them; what the app set stays.
                own = message.get("headers", [])
                present = {name for name, _ in own}
                ours = [
                    (name.lower().encode(), value.encode())
                    for name, value in response_headers(scope, request_id).items()
                ]
                message["headers"] = [*own, *(header for header in ours if header[0] not in present)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope["route"].path if "route" in scope else "-"
            elapsed = (time.perf_counter() - started) * 1000
            request_log.info("%s %s %s %d %.1fms", request_id, scope["method"], route, status, elapsed)


# ---------------------------------------------------------------------------------------------------
# Routes and app


def task_routes(prefix: str, path_scoped: bool) -> list[Route]:
    """One route family. Path-scoped (/api/{user_id}/...) answers with bare bodies; token-scoped
    (/api/...) wraps them as {"data": ...}. Every route, without exception, is behind BearerAuth."""
    auth = [Middleware(BearerAuth, path_scoped=path_scoped)]
    envelope = not path_scoped

    def route(path: str, handler, methods: list[str]) -> Route:
        endpoint = functools.partial(handler, envelope=envelope)
        return Route(f"{prefix}{path}", endpoint, methods=methods, middleware=auth)

    return [
        route("/tasks", list_tasks, ["GET"]),
        route("/tasks", create_task, ["POST"]),
        route("/tasks/{task_id}", get_task, ["GET"]),
        route("/tasks/{task_id}", update_task, ["PUT", "PATCH"]),
        route("/tasks/{task_id}", delete_task, ["DELETE"]),
        route("/tasks/{task_id}/complete", complete_task, ["PATCH"]),
        route("/tasks/{task_id}/toggle", complete_task, ["PATCH"]),
    ]


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


CORS_EXPOSED_HEADERS = ["Location", "X-Total-Count"]


class CORS(CORSMiddleware):
    """Starlette's, except that a request from an origin that is not allowed, or from none, gets no
    CORS header at all (Starlette's would still send Allow-Credentials and Expose-Headers to another
    origin). Vary: Origin is on every response (response_headers)."""

    async def simple_response(self, scope: Scope, receive: Receive, send: Send, request_headers: Headers) -> None:
        origin = request_headers.get("origin")
        if origin is not None and self.is_allowed_origin(origin):
            await super().simple_response(scope, receive, send, request_headers)
        else:
            await self.app(scope, receive, send)


# The only routes without a token. Token-scoped before path-scoped: its fixed segments are the more
# specific match ("/api/tasks/{task_id}" would otherwise be the list of a user called "tasks").
routes = [
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    *task_routes("/api", path_scoped=False),
    *task_routes("/api/{user_id}", path_scoped=True),
]


def create_app(
    database_url: str = DATABASE_URL, verifier: TokenVerifier | None = None, pooled: bool = DATABASE_POOLED
) -> Starlette:
    database = open_database(database_url, pooled)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        configure_logging()
        if verifier is None and (problem := settings_problem()):
            raise RuntimeError(f"service: {problem}")  # `python service.py` says this before starting
        log.info("accepting tokens: %s", app.state.verifier.accepted())
        await database.connect()
        try:
            await apply_schema(database)
            yield
        finally:
            await database.disconnect()

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLog),
            Middleware(
                CORS,
                allow_origins=list(CORS_ORIGINS),  # never "*": the browser sends credentials
                allow_credentials=True,  # fetch(url, {credentials: "include"}) from the frontend
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=CORS_EXPOSED_HEADERS,
                max_age=600,
            ),
        ],
        exception_handlers={
            HTTPException: http_error,
            **{kind: database_error for kind in (*DATABASE_OUTAGES, sqlite3.OperationalError)},
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.database = database
    app.state.max_tasks_per_user = MAX_TASKS_PER_USER
    app.state.openapi = OPENAPI_PATH.read_bytes()
    app.state.verifier = verifier or TokenVerifier(BETTER_AUTH_SECRET, JWKS_URL, JWT_ISSUER, JWT_AUDIENCE)
    return app


app = create_app()


def first_local_run(host: str) -> bool:
    """`python service.py` on this machine with no settings at all: the quick start."""
    return is_loopback(host) and not Path(".env").exists() and not BETTER_AUTH_SECRET and not JWKS_URL


def write_local_env() -> None:
    """A .env with a random secret, so the quick start is one command and never runs on a published
    secret. Only on loopback: a deploy without settings is refused instead (see settings_problem)."""
    fd = os.open(".env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as env:
        env.write("# Written by the first `python service.py`: a random secret for this machine only.\n")
        env.write(f"BETTER_AUTH_SECRET={secrets.token_urlsafe(32)}\n")
    print("service: wrote .env with a new random BETTER_AUTH_SECRET", file=sys.stderr)


async def prepare_database(url: str) -> None:
    """Upgrade the schema before serving, so that `python service.py` can refuse a database newer
    than the code in one line (the lifespan does the same for `uvicorn service:app`)."""
    database = open_database(url)
    await database.connect()
    try:
        await apply_schema(database)
    finally:
        await database.disconnect()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="service.py", description="Serve the task API, or mint a token.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve beyond this machine (the Procfile)")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("token", help="print a one-hour HS256 token for USER_ID").add_argument("user_id")
    args = parser.parse_args(argv)
    if args.command == "token":
        if not BETTER_AUTH_SECRET:
            sys.exit("service: `token` signs with BETTER_AUTH_SECRET, which is not set")
        print(mint_token(args.user_id, BETTER_AUTH_SECRET))
        return
    if first_local_run(args.host):
        write_local_env()
        os.execv(sys.executable, [sys.executable, *sys.argv])  # start again, reading the new .env
    if problem := settings_problem():
        sys.exit(f"service: {problem}")
    try:
        asyncio.run(prepare_database(DATABASE_URL))
    except SchemaTooNew as refused:
        sys.exit(f"service: {refused}")
    import uvicorn

    configure_logging()
    # Beyond LIMIT_CONCURRENCY connections and requests, uvicorn answers 503 rather than queueing
    # without bound; an idle keep-alive connection is closed after 5 s. Header timeouts (slowloris)
    # are the platform's proxy's job: see README.md, Production.
    uvicorn.run(
        app, host=args.host, port=PORT, access_log=False, limit_concurrency=LIMIT_CONCURRENCY, timeout_keep_alive=5
    )


if __name__ == "__main__":
    main(sys.argv[1:])
