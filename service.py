"""Task service: the REST API behind a multi-user todo app, on PostgreSQL.

Production runs `uvicorn service:app` (the Procfile). `python service.py` hands over to dev.py,
the quick start, which this module never imports.

How to read it. Sections 1 to 5 are the security core: they decide who the caller is, what is
served without a token, and which rows a request can reach.

1. Settings: every setting, read once; settings_problem says which cannot be trusted.
2. Authentication: the token policy, verification, the key set, the BearerAuth middleware.
3. Routes and app: the whole surface (every /api route sits behind BearerAuth), and `start`,
   the one gate the lifespan runs before anything is served.
4. SQL: every statement, whole. Each one on a user's data names the user
   (`user_id = :user_id`), so isolation between users is enforced by the query itself.
5. Handlers: one per endpoint; the caller is request.user, which only BearerAuth sets.

The rest serves the core:

6. Input: pydantic models of the body's fields and of the list's query parameters.
7. Errors and logs: what a client sees of a failure, and what the logs keep of it.
8. Database set-up: the URL's TLS policy, the connection, the schema, the pooler check.

docs/review.md lists each security property, where it is enforced and the tests that prove it.
"""

import asyncio
import calendar
import collections
import functools
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import ssl
import sys
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, quote, urlsplit

import asyncpg
import httpx
import jwt
from databases import Database
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings, Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

# Section 7 sets up the logs.
log = logging.getLogger("service")


# === 1. Settings ===
# Read once, from the environment, or a .env file if there is one.
config = Config(".env" if Path(".env").is_file() else None)

# HS256 tokens are signed with this secret, which Better Auth shares.
BETTER_AUTH_SECRET = config("BETTER_AUTH_SECRET", default="")
# Better Auth's base URL: its key set (JWKS), and the issuer and audience of its tokens.
BETTER_AUTH_URL = config("BETTER_AUTH_URL", default="").rstrip("/")
JWKS_DEFAULT = f"{BETTER_AUTH_URL}/api/auth/jwks" if BETTER_AUTH_URL else ""
JWKS_URL = config("JWKS_URL", default=JWKS_DEFAULT)
# Better Auth's JWT plugin sets both claims to its base URL. ANY ("*") turns a check off.
JWT_ISSUER = config("JWT_ISSUER", default=BETTER_AUTH_URL)
JWT_AUDIENCE = config("JWT_AUDIENCE", default=BETTER_AUTH_URL)
# The frontends' origins: browsers let these pages call the API with the user's credentials.
CORS_ORIGINS = config("CORS_ORIGINS", cast=CommaSeparatedStrings, default="http://localhost:3000")
# The most tasks one user may hold: at most SQL_INTEGER_MAX, what users.task_count holds.
MAX_TASKS_PER_USER = config("MAX_TASKS_PER_USER", cast=int, default=10_000)
# postgresql://user:password@host/db?sslmode=require; section 8 reads it.
DATABASE_URL = config("DATABASE_URL", default="")
# true: PgBouncer in transaction mode; false: a session per connection (directly, or through a
# proxy such as Neon's direct host). Unset: check_pooler asks for it where it is needed.
DATABASE_POOLED = config("DATABASE_POOLED", cast=bool, default=None)
# asyncpg's prepared statements. Off only behind a pooler that cannot keep them (PgBouncer
# before 1.21); each statement then takes two round trips.
DATABASE_STATEMENT_CACHE = config("DATABASE_STATEMENT_CACHE", cast=bool, default=True)

# Secrets this repository has published as examples (.env.example, now and before).
PUBLISHED_SECRETS = {
    "dev-only-secret-change-me-0123456789abcdef",
    "replace-me-with-the-output-of-openssl-rand-base64-32",
}
# RFC 7518 3.2: an HS256 key is at least as long as the hash.
MIN_SECRET_BYTES = 32
SQL_INTEGER_MAX = 2**31 - 1
NEW_SECRET = "make one with `openssl rand -base64 32`"


def is_loopback(host: str | None) -> bool:
    """This machine: `localhost` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def jwks_over_tls(url: str) -> bool:
    """The keys decide who is who: fetched over TLS, or over http from this machine only."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback(parts.hostname)


def settings_problem(database_url: str) -> str | None:
    """Why the service must not start, in one line; None when it may. The lifespan asks it
    first, however the app was started."""
    if not BETTER_AUTH_SECRET and not JWKS_URL:
        return "set BETTER_AUTH_SECRET and/or BETTER_AUTH_URL (for its JWKS)"
    if BETTER_AUTH_SECRET and len(BETTER_AUTH_SECRET.encode()) < MIN_SECRET_BYTES:
        return f"BETTER_AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes: {NEW_SECRET}"
    if BETTER_AUTH_SECRET in PUBLISHED_SECRETS:
        return f"BETTER_AUTH_SECRET is the published example value: {NEW_SECRET}"
    if JWKS_URL and not jwks_over_tls(JWKS_URL):
        return f"JWKS_URL must be an https URL (http only for localhost), not {JWKS_URL!r}"
    if JWKS_URL and not (JWT_ISSUER and JWT_AUDIENCE):
        return "with JWKS_URL, set JWT_ISSUER and JWT_AUDIENCE (or BETTER_AUTH_URL)"
    # Browsers send credentials: "*" would let any web site act as the signed-in user.
    if "*" in CORS_ORIGINS:
        return "CORS_ORIGINS must name the frontend's origins, not '*'"
    if not 1 <= MAX_TASKS_PER_USER <= SQL_INTEGER_MAX:
        return f"MAX_TASKS_PER_USER must be from 1 to {SQL_INTEGER_MAX}"
    if not database_url:
        return "set DATABASE_URL, or run `python service.py` for a local PostgreSQL"
    return None


# === 2. Authentication ===
# The BearerAuth middleware turns a request into its caller, or a 401 / 403.
#
# The token policy, all of it (a reviewer should agree with each line):
# - HS256 tokens, signed with BETTER_AUTH_SECRET: HS256 only. `iss` and `aud` are not checked:
#   whoever holds the secret can write any claims, so the secret is the whole trust.
# - Better Auth's JWKS tokens: the algorithm is the one the key's type allows (EdDSA, ES256,
#   RS256), never the token's `alg` alone, so an HS256 token "signed" with a public key is
#   refused. `iss` and `aud` must be JWT_ISSUER and JWT_AUDIENCE (ANY turns a check off).
# - Both kinds: `exp` and `sub` are required and `nbf` is honoured, with CLOCK_SKEW_LEEWAY, as
#   PyJWT reads time claims; `sub` is a user id PostgreSQL can store; `email` is kept only if it
#   can be stored too. A token over MAX_TOKEN_BYTES is not read.
# - Anything else is the one 401, INVALID_TOKEN: nobody learns which check failed.

HS256_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = {"EdDSA", "ES256", "RS256"}
REQUIRED_CLAIMS = ["exp", "sub"]
ANY = "*"
CLOCK_SKEW_LEEWAY = 30
MAX_TOKEN_BYTES = 8 * 1024
# A longer user id would not fit PostgreSQL's primary-key index anyway.
MAX_SUBJECT_LENGTH = 255
# RFC 3696.
MAX_EMAIL_LENGTH = 320
INVALID_TOKEN = "Invalid or expired token"
# PostgreSQL's text holds no NUL, nor a lone surrogate (it has no UTF-8 form).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unauthorized(detail: str = INVALID_TOKEN) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def is_storable_text(value, max_length: int) -> bool:
    """A string of at most max_length characters that PostgreSQL's text can hold."""
    if not isinstance(value, str):
        return False
    return len(value) <= max_length and not UNSTORABLE.search(value)


def is_usable_subject(subject) -> bool:
    """A user id: a non-blank string that PostgreSQL can store and index."""
    return is_storable_text(subject, MAX_SUBJECT_LENGTH) and subject.strip() != ""


def usable_email(claims: dict) -> str | None:
    """The email claim, if PostgreSQL can store it; otherwise it is left out."""
    email = claims.get("email")
    if is_storable_text(email, MAX_EMAIL_LENGTH):
        return email
    return None


def decode(token: str, key, algorithms: list[str], issuer=ANY, audience=ANY) -> dict:
    """The claims, if the signature, exp, nbf, iss and aud (unless ANY) hold; else a 401."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            # docs/review.md: how PyJWT reads issuer=None and verify_aud.
            issuer=None if issuer == ANY else issuer,
            audience=None if audience == ANY else audience,
            leeway=CLOCK_SKEW_LEEWAY,
            options={"require": REQUIRED_CLAIMS, "verify_aud": audience != ANY},
        )
    except jwt.InvalidTokenError:
        raise unauthorized() from None
    if not is_usable_subject(claims["sub"]):
        raise unauthorized()
    return claims


# A key set this old is fetched again, by the request that finds it so.
JWKS_MAX_AGE_SECONDS = 300
# The least time between two fetches (for unknown kids, and after a failed fetch).
JWKS_REFETCH_SECONDS = 30
# For all of one fetch: connect, send, every read.
JWKS_DEADLINE_SECONDS = 3
JWKS_MAX_BYTES = 1024 * 1024


async def fetch_jwks(url: str):
    """The key set's JSON: a 200 within JWKS_DEADLINE_SECONDS in all, however slowly a server
    drips its bytes, and at most JWKS_MAX_BYTES once decoded (gzip too)."""
    # No redirect is followed, and no proxy is taken from the environment.
    client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    headers = {"Accept": "application/json"}
    async with asyncio.timeout(JWKS_DEADLINE_SECONDS), client:
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise ValueError(f"answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"more than {JWKS_MAX_BYTES} bytes")
    return json.loads(body)


def is_signing_key(key: jwt.PyJWK, data: dict) -> bool:
    """An asymmetric key we accept, with a kid, meant for signatures."""
    if key.algorithm_name not in JWKS_ALGORITHMS:
        return False
    return isinstance(key.key_id, str) and data.get("use", "sig") == "sig"


def usable_keys(jwks) -> dict[str, jwt.PyJWK]:
    """The set's signing keys by kid, each bound to the one algorithm its type allows."""
    if not isinstance(jwks, dict):
        return {}
    keys = {}
    for data in jwks.get("keys", []):
        # A key PyJWK cannot use (it raises what it likes) is skipped; the others stay usable.
        try:
            key = jwt.PyJWK(data)
        except Exception:
            log.warning("JWKS: skipped a key that is not a usable JWK")
            continue
        if is_signing_key(key, data):
            keys[key.key_id] = key
    return keys


class KeySet:
    """Better Auth's public keys, by kid. Fetched for an unknown kid or at the maximum age, at
    most once per JWKS_REFETCH_SECONDS; never used past that age. A failed fetch keeps them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys = {}
        self.fetches = 0
        # When keys were last loaded, and when a fetch was last tried.
        self.loaded_at = float("-inf")
        self.fetched_at = float("-inf")
        # Concurrent callers wait for one fetch, not one each.
        self.lock = asyncio.Lock()
        self.clock = time.monotonic

    def age(self) -> float:
        return self.clock() - self.loaded_at

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if kid not in self.keys or self.age() >= JWKS_MAX_AGE_SECONDS:
            await self.refetch_unless_recent()
        if self.age() >= JWKS_MAX_AGE_SECONDS:
            # Too old to trust, and no newer set could be had.
            return None
        return self.keys.get(kid)

    async def refetch_unless_recent(self) -> None:
        async with self.lock:
            if self.clock() - self.fetched_at < JWKS_REFETCH_SECONDS:
                return
            self.fetched_at = self.clock()
            self.fetches += 1
            keys = await self.fetch_usable_keys()
            if keys:
                self.keys = keys
                self.loaded_at = self.clock()

    async def fetch_usable_keys(self) -> dict[str, jwt.PyJWK]:
        """The fetched keys, or none: whatever the answer (unreachable, slow, not a 200, not
        JSON, nested past Python's recursion limit), never an exception out of a request."""
        try:
            keys = usable_keys(await fetch_jwks(self.url))
        except Exception as exc:
            problem = f"fetching it failed ({type(exc).__name__})"
            keys = {}
        else:
            problem = "it has no usable key"
        if not keys:
            kept = len(self.keys)
            log.warning("JWKS: %s: %s; %d cached keys kept", self.url, problem, kept)
        return keys


# A verified token is remembered (by its SHA-256) until it expires, and checked in full again
# after VERIFIED_TOKEN_SECONDS. About 200 bytes each.
VERIFIED_TOKENS_KEPT = 4096
VERIFIED_TOKEN_SECONDS = 60
# So a key removed from the JWKS stops working within
# JWKS_MAX_AGE_SECONDS + VERIFIED_TOKEN_SECONDS: 6 minutes.

# Who made a request: the token's sub, and its email if usable.
Caller = collections.namedtuple("Caller", ["id", "email"])


class TokenVerifier:
    """A bearer token's Caller, under the token policy above; or the 401."""

    def __init__(self, secret="", jwks_url="", issuer="", audience="") -> None:
        self.secret = secret
        self.issuer = issuer
        self.audience = audience
        self.key_set = KeySet(jwks_url) if jwks_url else None
        # SHA-256 of a token: (expires_at, recheck_at, caller).
        self.verified: dict[bytes, tuple[float, float, Caller]] = {}
        self.clock = time.time

    async def caller(self, token: str) -> Caller:
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthorized()
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        if digest in self.verified:
            expires_at, recheck_at, caller = self.verified[digest]
            # PyJWT's rule: expired once exp + leeway is reached.
            if now >= expires_at:
                raise unauthorized()
            if now < recheck_at:
                return caller
        claims = await self.verify(token)
        caller = Caller(claims["sub"], usable_email(claims))
        # PyJWT took int() of it: a number, or its text, perhaps past float's range.
        self.remember(digest, int(claims["exp"]), caller, now)
        return caller

    def remember(self, digest: bytes, exp: int, caller: Caller, now: float) -> None:
        if len(self.verified) >= VERIFIED_TOKENS_KEPT:
            # The oldest goes: a dict keeps the order of insertion.
            del self.verified[next(iter(self.verified))]
        expires_at = exp + CLOCK_SKEW_LEEWAY
        recheck_at = min(expires_at, now + VERIFIED_TOKEN_SECONDS)
        self.verified[digest] = (expires_at, recheck_at, caller)

    async def verify(self, token: str) -> dict:
        """The claims of a token signed with the secret or with a key of the key set."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise unauthorized() from None
        # The header only picks the key to try: decode() checks the signature with it.
        if header.get("alg") == "HS256" and self.secret:
            return decode(token, self.secret, HS256_ALGORITHMS)
        key = await self.jwks_key(header.get("kid"))
        if key is None:
            raise unauthorized()
        return decode(token, key.key, [key.algorithm_name], self.issuer, self.audience)

    async def jwks_key(self, kid) -> jwt.PyJWK | None:
        if self.key_set is None or not isinstance(kid, str):
            return None
        return await self.key_set.key(kid)


def bearer_token(headers: Headers) -> str:
    """The token of `Authorization: Bearer <token>` (the scheme in any case), or a 401."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("Missing authentication credentials")
    return token.strip()


# A fair share: one user's requests in flight at once, in this process; more is a 429. Fewer
# than the pool's connections (asyncpg's 10), so one user's slowest requests (a search, the
# largest page, a slow reader) always leave connections and memory for everyone else.
MAX_REQUESTS_PER_USER = 4


class BearerAuth:
    """Route middleware on every /api route: the bearer token becomes scope["user"], a Caller,
    or a 401. On a path-scoped route the path's {user_id} must be the caller, else a 403,
    before any database work. A caller with MAX_REQUESTS_PER_USER in flight gets a 429."""

    def __init__(self, app: ASGIApp, path_scoped: bool) -> None:
        self.app = app
        self.path_scoped = path_scoped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = bearer_token(Headers(scope=scope))
        # Set by start(), once the settings have passed: no start, no caller.
        caller = await scope["app"].state.verifier.caller(token)
        if self.path_scoped and scope["path_params"]["user_id"] != caller.id:
            raise HTTPException(403, "Forbidden")
        in_flight = scope["app"].state.in_flight
        if in_flight[caller.id] >= MAX_REQUESTS_PER_USER:
            raise HTTPException(429, "Too many requests", headers={"Retry-After": "1"})
        scope["user"] = caller
        in_flight[caller.id] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            in_flight[caller.id] -= 1
            if not in_flight[caller.id]:
                del in_flight[caller.id]


# === 3. Routes and app ===
# The whole surface: /health and /openapi.json need no token; every /api route is behind
# BearerAuth (task_routes).


def task_routes(prefix: str, path_scoped: bool) -> list[Route]:
    """One family of task routes. Path-scoped ones answer bare bodies; token-scoped ones
    {"data": ...}."""
    auth = [Middleware(BearerAuth, path_scoped=path_scoped)]

    def route(path: str, handler, methods: list[str]) -> Route:
        endpoint = functools.partial(handler, envelope=not path_scoped)
        return Route(prefix + path, endpoint, methods=methods, middleware=auth)

    return [
        route("/tasks", list_tasks, ["GET"]),
        route("/tasks", create_task, ["POST"]),
        route("/tasks/{task_id}", get_task, ["GET"]),
        route("/tasks/{task_id}", update_task, ["PUT", "PATCH"]),
        route("/tasks/{task_id}", delete_task, ["DELETE"]),
        route("/tasks/{task_id}/complete", complete_task, ["PATCH"]),
        route("/tasks/{task_id}/toggle", complete_task, ["PATCH"]),
    ]


def service_routes() -> list[Route]:
    # The first route that matches serves: "/api/tasks/{task_id}" must not be user "tasks"'s list.
    return [
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
        *task_routes("/api", path_scoped=False),
        *task_routes("/api/{user_id}", path_scoped=True),
    ]


# What a browser page on an allowed origin may send, and read, across origins.
CORS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "X-Request-ID"]
CORS_EXPOSED_HEADERS = ["Location", "X-Total-Count"]


def create_app(
    database_url: str | None = None,
    verifier: TokenVerifier | None = None,
    pooled: bool | None = None,
    statement_cache: bool | None = None,
) -> Starlette:
    """The app on the settings (a test may give its own); its lifespan runs start()."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        configure_logging()
        try:
            database = await start(app, database_url, verifier, pooled, statement_cache)
        except Exception as exc:
            log.error("cannot start: %s", startup_problem(exc))
            raise
        yield
        await database.disconnect()

    # Credentials (fetch's `credentials: "include"`) for the named origins only, never "*".
    cors = Middleware(
        CORSMiddleware,
        allow_origins=list(CORS_ORIGINS),
        allow_credentials=True,
        allow_methods=CORS_METHODS,
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        max_age=600,
    )
    # Section 7: every error is JSON, and a 500 shows no internals.
    exception_handlers = {
        HTTPException: http_error,
        ClientDisconnect: client_left,
        asyncpg.CheckViolationError: constraint_error,
        **dict.fromkeys(LOST_STATEMENTS, lost_prepared_statement),
        **dict.fromkeys(DATABASE_OUTAGES, database_error),
    }
    app = Starlette(
        routes=service_routes(),
        # ServerErrorMiddleware innermost: an unexpected exception becomes the bare 500 inside
        # RequestLog and CORS, which log it and add their headers (docs/review.md).
        middleware=[
            Middleware(RequestLog),
            cors,
            Middleware(ServerErrorMiddleware, handler=server_error),
        ],
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
    # Starlette's redirect of /api/tasks/ builds its URL from the Host header.
    app.router.redirect_slashes = False
    app.state.max_tasks_per_user = MAX_TASKS_PER_USER
    # Requests in flight, by caller (BearerAuth).
    app.state.in_flight = collections.Counter()
    app.state.health_check = asyncio.Lock()
    # Read once: the document is data, served as it is.
    app.state.openapi = OPENAPI_PATH.read_bytes()
    return app


async def start(app: Starlette, url, verifier, pooled, statement_cache) -> Database:
    """The settings gate, then the database connected and made ready; a CannotServe says why
    not. The arguments default to the settings."""
    if url is None:
        url = DATABASE_URL
    problem = settings_problem(url)
    if problem:
        raise CannotServe(problem)
    target = read_database_url(url)
    if verifier is None:
        verifier = TokenVerifier(BETTER_AUTH_SECRET, JWKS_URL, JWT_ISSUER, JWT_AUDIENCE)
    if pooled is None:
        pooled = target.pooled
    if statement_cache is None:
        statement_cache = DATABASE_STATEMENT_CACHE
    log.info("accepting tokens: %s", accepted_tokens(verifier))
    log.info("database: %s", target.protection)
    async with open_database(url, target.tls, pooled, statement_cache, upgrade=True) as upgrade:
        # Before any schema change: a pooler that is refused gets none.
        await check_pooler(upgrade, pooled, statement_cache)
        await apply_schema(upgrade)
    database = open_database(url, target.tls, pooled, statement_cache)
    await database.connect()
    # Only now can a request have a caller: BearerAuth finds no verifier before.
    app.state.verifier = verifier
    app.state.database = database
    return database


# === 4. SQL ===
# Every statement, whole. Each one on a user's data names the user: `user_id = :user_id` on
# tasks, `id = :user_id` on users. :user_id is always request.user.id, the caller BearerAuth
# set. Values are bound as parameters, never written into the text. Timestamps are text in one
# format (stamp), so text order is time order.

# get_task: :id is the path's task id.
SELECT_TASK = """
    SELECT * FROM tasks
    WHERE id = :id AND user_id = :user_id
"""

# Create, and a successor (insert_task). The user's row comes with their first task.
# task_count goes up only while under :max_tasks, and concurrent creates queue on the user's
# row, so the cap is exact. At the cap no row comes back, and nothing is written.
CREATE_TASK = """
    WITH counted AS (
        INSERT INTO users (id, email, created_at, task_count)
        VALUES (:user_id, :email, :now, 1)
        ON CONFLICT (id) DO UPDATE SET task_count = users.task_count + 1
        WHERE users.task_count < :max_tasks
        RETURNING id
    )
    INSERT INTO tasks (
        id, user_id, title, description, completed, priority, tags, tag_keys,
        due_date, due_at, remind_at, recurrence, created_at, updated_at
    )
    SELECT
        :id, counted.id, :title, :description, CAST(:completed AS boolean),
        CAST(:priority AS integer), :tags, CAST(:tag_keys AS text[]),
        :due_date, :due_at, :remind_at, :recurrence, :now, :now
    FROM counted
    RETURNING *
"""

# PUT, PATCH, /complete and /toggle (run_change).
# - :changes, the columns the request sets, laid over the row (an unqualified column in the
#   sub-SELECT is `changed`'s). The SET list is all a change can touch: never id or user_id.
# - :flip turns completed over (/complete or /toggle without a body).
# - :completing declines (no row) what might complete a recurring task without a successor:
#   change_task decides on the locked row, then comes back with the successor's id.
CHANGE_TASK = """
    UPDATE tasks SET
        (title, description, completed, priority, tags, tag_keys,
         due_date, due_at, remind_at, recurrence) = (
            SELECT
                title, description,
                CASE WHEN :flip THEN NOT tasks.completed ELSE changed.completed END,
                priority, tags, tag_keys, due_date, due_at, remind_at, recurrence
            FROM jsonb_populate_record(tasks, CAST(:changes AS jsonb)) AS changed
        ),
        next_occurrence_id = COALESCE(CAST(:next_occurrence_id AS text), next_occurrence_id),
        updated_at = :now
    WHERE id = :id AND user_id = :user_id
      AND NOT (
        :completing
        AND NOT completed
        AND next_occurrence_id IS NULL
        AND (recurrence IS NOT NULL OR CAST(:changes AS jsonb) ->> 'recurrence' IS NOT NULL)
      )
    RETURNING *
"""

# change_task's lock: concurrent changes of this task wait here until the transaction ends.
LOCK_TASK = """
    SELECT completed, due_date, due_at, remind_at, recurrence, next_occurrence_id
    FROM tasks
    WHERE id = :id AND user_id = :user_id
    FOR UPDATE
"""

# task_count goes down in the same statement (a data-changing WITH runs even if unread).
DELETE_TASK = """
    WITH deleted AS (
        DELETE FROM tasks
        WHERE id = :id AND user_id = :user_id
        RETURNING id
    ), uncounted AS (
        UPDATE users SET task_count = task_count - 1
        WHERE id = :user_id AND EXISTS (SELECT 1 FROM deleted)
    )
    SELECT id FROM deleted
"""

# A list: the filters given join LIST_TASKS' WHERE after the user. Each is fixed text that
# begins AND, its ORs in parentheses, so none can widen the list beyond the user's tasks. The
# search is strpos, literal by nature and cheaper than LIKE on multibyte text.
LIST_FILTERS = {
    "completed": "AND completed = :completed",
    "status": "AND completed = :status",
    "search": """
        AND (strpos(lower(title), :search) > 0
             OR strpos(lower(description), :search) > 0)""",
    "priorities": "AND priority = ANY(:priorities)",
    "tag_keys": "AND tag_keys @> :tag_keys",
    "due_before": "AND due_at < :due_before",
    "due_after": "AND due_at > :due_after",
    "overdue": "AND (COALESCE(due_at < :now, FALSE) AND NOT completed) = :overdue",
    "reminder_due": "AND (COALESCE(remind_at <= :now, FALSE) AND NOT completed) = :reminder_due",
}
# The total (X-Total-Count): unfiltered, the user's task_count; filtered, the matches.
LIST_TOTALS = {
    False: "SELECT task_count FROM users WHERE id = :user_id",
    True: "SELECT count(*) FROM matching",
}
# The total comes beside the page: a page past the end is one row, NULL but for total_count.
# {order_by} is one of LIST_ORDERS; ties are broken by id, so paging never repeats a task.
LIST_TASKS = """
    WITH matching AS NOT MATERIALIZED (
        SELECT * FROM tasks
        WHERE user_id = :user_id {filters}
    )
    SELECT COALESCE(({total}), 0) AS total_count, page.*
    FROM (SELECT) AS total
    LEFT JOIN (
        SELECT * FROM matching
        ORDER BY {order_by}
        LIMIT :limit OFFSET :offset
    ) AS page ON TRUE
    ORDER BY {order_by}
"""

# (sort, order) -> LIST_TASKS' ORDER BY. Tasks without a due date come last in either order.
LIST_ORDERS = {
    ("created_at", "asc"): "created_at ASC, id ASC",
    ("created_at", "desc"): "created_at DESC, id DESC",
    ("updated_at", "asc"): "updated_at ASC, id ASC",
    ("updated_at", "desc"): "updated_at DESC, id DESC",
    ("title", "asc"): "title ASC, id ASC",
    ("title", "desc"): "title DESC, id DESC",
    ("priority", "asc"): "priority ASC, id ASC",
    ("priority", "desc"): "priority DESC, id DESC",
    ("due_date", "asc"): "(due_at IS NULL), due_at ASC, id ASC",
    ("due_date", "desc"): "(due_at IS NULL), due_at DESC, id DESC",
}


# === 5. Handlers ===
# One per endpoint. The caller is request.user, set by BearerAuth. `envelope`: token-scoped
# routes answer {"data": ...}.

# The same bytes for a missing task and another user's: neither says which it was.
TASK_NOT_FOUND = "Task not found"

# Stored as its rank, so that it sorts as it reads.
PRIORITIES = {"low": 1, "medium": 2, "high": 3}
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}
# What a client sees of a task's row: not tag_keys or due_at, which serve the filters.
TASK_JSON_FIELDS = [
    *("id", "user_id", "title", "description", "completed", "priority", "tags"),
    *("due_date", "remind_at", "recurrence", "next_occurrence_id", "created_at", "updated_at"),
]


def task_json(row) -> dict:
    # asyncpg's own record: faster than `databases`' wrapper.
    record = row._mapping
    task = {name: record[name] for name in TASK_JSON_FIELDS}
    task["priority"] = PRIORITY_NAMES[record["priority"]]
    task["tags"] = json.loads(record["tags"])
    return task


def reply(body, envelope: bool, status_code: int = 200, headers=None) -> JSONResponse:
    if envelope:
        body = {"data": body}
    return JSONResponse(body, status_code, headers=headers)


async def list_tasks(request: Request, envelope: bool) -> Response:
    statement, values = parse_list_query(request.query_params)
    values["user_id"] = request.user.id
    rows = await request.app.state.database.fetch_all(statement, values)
    # A page past the end is one row, NULL but for total_count.
    tasks = [task_json(row) for row in rows if row["id"] is not None]
    total = str(rows[0]["total_count"])
    return reply(tasks, envelope, headers={"X-Total-Count": total})


async def create_task(request: Request, envelope: bool) -> Response:
    fields = parse_task_fields(await read_json_body(request), partial=False)
    task_id = str(uuid.uuid4())
    row = await insert_task(request, fields, task_id, request.user.email, utc_now())
    location = f"{quote(request.url.path)}/{task_id}"
    return reply(task_json(row), envelope, 201, headers={"Location": location})


async def insert_task(request: Request, fields: dict, task_id: str, email, now: str):
    """CREATE_TASK for the caller: the new row, or a 409 at the cap (nothing written)."""
    values = {
        **fields,
        "id": task_id,
        "user_id": request.user.id,
        "email": email,
        "now": now,
        "max_tasks": request.app.state.max_tasks_per_user,
    }
    row = await request.app.state.database.fetch_one(CREATE_TASK, values)
    if row is None:
        raise HTTPException(409, "Task limit reached")
    return row


async def get_task(request: Request, envelope: bool) -> Response:
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    row = await request.app.state.database.fetch_one(SELECT_TASK, values)
    if row is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    return reply(task_json(row), envelope)


async def update_task(request: Request, envelope: bool) -> Response:
    """PUT and PATCH alike: the fields given change, the others stay."""
    task_id = task_id_or_404(request)
    fields = parse_task_fields(await read_json_body(request), partial=True)
    task = await change_task(request, task_id, fields, flip=False)
    return reply(task, envelope)


async def complete_task(request: Request, envelope: bool) -> Response:
    """/complete and /toggle: flip completed, or set it from a body {"completed": a boolean}."""
    task_id = task_id_or_404(request)
    fields = read_body(Completion, await read_json_body(request, required=False))
    task = await change_task(request, task_id, fields, flip=not fields)
    return reply(task, envelope)


async def change_task(request: Request, task_id: str, fields: dict, flip: bool) -> dict:
    """One statement, CHANGE_TASK; where it declines or finds no row, or where the change might
    leave a recurring task without a due date (so no CHECK error logs the row), the locked path."""
    now = utc_now()
    # The change would leave the task completed: a flip, or "completed": true.
    completing = flip or fields.get("completed") is True
    row = None
    if not might_recur_without_due_date(fields):
        row = await run_change(request, task_id, fields, flip, now, completing)
    if row is None:
        async with request.app.state.database.transaction():
            row = await change_locked_task(request, task_id, fields, flip, now, completing)
    return task_json(row)


async def run_change(request, task_id, fields, flip, now, completing, next_occurrence_id=None):
    """CHANGE_TASK on the caller's task: the changed row, or None."""
    values = {
        "id": task_id,
        "user_id": request.user.id,
        "changes": json.dumps(fields),
        "flip": flip,
        "completing": completing,
        "next_occurrence_id": next_occurrence_id,
        "now": now,
    }
    return await request.app.state.database.fetch_one(CHANGE_TASK, values)


# What a successor copies from the completed task, besides its own dates.
SUCCESSOR_COPIES = ("title", "description", "priority", "tags", "tag_keys", "recurrence")


async def change_locked_task(request, task_id, fields, flip, now, completing):
    """Lock the task, decide in Python, then write the change and, if it completes a recurring
    task that has had no successor, the successor: both or neither."""
    values = {"id": task_id, "user_id": request.user.id}
    old = await request.app.state.database.fetch_one(LOCK_TASK, values)
    if old is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    new = {name: fields.get(name, old[name]) for name in RECURRENCE_COLUMNS}
    if recurs_without_due_date(new):
        raise unprocessable(RECURRENCE_WITHOUT_DUE_DATE)
    successor = None
    newly_completed = completing and not old["completed"]
    if newly_completed and new["recurrence"] and not old["next_occurrence_id"]:
        successor = next_occurrence(new)
    successor_id = str(uuid.uuid4()) if successor else None
    row = await run_change(request, task_id, fields, flip, now, False, successor_id)
    if successor is not None:
        copied = {name: row[name] for name in SUCCESSOR_COPIES}
        successor = {**successor, **copied, "completed": False}
        # At the cap, the 409 rolls the transaction back: the change is not kept either.
        await insert_task(request, successor, successor_id, None, now)
    return row


# The columns that decide whether a task recurs, and when.
RECURRENCE_COLUMNS = ("due_date", "due_at", "remind_at", "recurrence")


def recurs_without_due_date(task: dict) -> bool:
    """A recurring task needs a due date (schema.sql's CHECK is the backstop)."""
    return task["recurrence"] is not None and task["due_date"] is None


def might_recur_without_due_date(changes: dict) -> bool:
    """Sets a recurrence without a due date, or clears the due date: only the row can tell."""
    sets_recurrence = changes.get("recurrence") is not None and changes.get("due_date") is None
    clears_due_date = "due_date" in changes and changes["due_date"] is None
    return sets_recurrence or clears_due_date


def next_occurrence(task: dict) -> dict | None:
    """The successor's dates: due a period on, remind_at moved as much. None past 9999-12-31."""
    due = datetime.fromisoformat(task["due_at"])
    try:
        next_due = one_period_on(due, task["recurrence"])
        remind_at = None
        if task["remind_at"] is not None:
            reminder = datetime.fromisoformat(task["remind_at"]) + (next_due - due)
            remind_at = stamp(reminder)
    # The year 10000.
    except (ValueError, OverflowError):
        return None
    due_at = stamp(next_due)
    # A date-only due date stays a date (its first 10 characters).
    due_date = due_at[: len(task["due_date"])]
    return {"due_date": due_date, "due_at": due_at, "remind_at": remind_at}


def one_period_on(due: datetime, recurrence: str) -> datetime:
    """A day or a week on; a month on is the same day next month, or that month's last day."""
    if recurrence == "daily":
        return due + timedelta(days=1)
    if recurrence == "weekly":
        return due + timedelta(days=7)
    year = due.year + due.month // 12
    month = due.month % 12 + 1
    last_day = calendar.monthrange(year, month)[1]
    return due.replace(year=year, month=month, day=min(due.day, last_day))


async def delete_task(request: Request, envelope: bool) -> Response:
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    deleted = await request.app.state.database.fetch_one(DELETE_TASK, values)
    if deleted is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    return Response(status_code=204)


async def health(request: Request) -> Response:
    """No token needed: the platform's health check calls it. It reads no user's data, and
    holds at most one pooled connection however many ask (they wait their turn)."""
    try:
        async with request.app.state.health_check:
            await request.app.state.database.execute("SELECT 1")
    except Exception as exc:
        log.warning("health check: database did not answer (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


OPENAPI_PATH = Path(__file__).with_name("openapi.json")


async def openapi_document(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


# === 6. Input ===
# Clean values, or a 400 / 408 / 413 / 422. pydantic reads every input, one model a shape; its
# errors() are the contract's 422 (FastAPI's shape).

MAX_BODY_BYTES = 64 * 1024
# A body that has not arrived within this is a 408: a slow client does not hold a worker.
BODY_DEADLINE_SECONDS = 10
# So that a 422 stays small whatever the request.
MAX_ERRORS = 10
# PostgreSQL's text holds no NUL. pydantic refuses a lone surrogate itself (string_unicode).
STORABLE = r"^[^\x00]*$"
# Before 9999, so that a successor, a period on, is still a date.
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
DateTime = Annotated[AwareDatetime, Field(ge=datetime(1, 1, 1, tzinfo=UTC), lt=LATEST)]
Moment = DateTime | Annotated[date, Field(lt=LATEST.date())]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40, pattern=STORABLE)
]
Title = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=STORABLE)
]
Priority = Literal["low", "medium", "high"]


def first_spellings(tags: list[str]) -> list[str]:
    """Tags that differ only in case (Unicode case folding) are one, spelled as it first came."""
    kept = {}
    for tag in tags:
        kept.setdefault(tag.casefold(), tag)
    return list(kept.values())


class TaskFields(BaseModel):
    """PUT and PATCH: the fields given, at least one. Strict: "true" is not a boolean, a date is
    text. The defaults are a create's. Other fields are ignored."""

    model_config = ConfigDict(strict=True)
    title: Title = None
    description: Annotated[str, StringConstraints(max_length=1000, pattern=STORABLE)] | None = None
    completed: bool = False
    priority: Priority = "medium"
    tags: Annotated[list[Tag], Field(max_length=20), AfterValidator(first_spellings)] = []
    due_date: Moment | None = None
    remind_at: DateTime | None = None
    recurrence: Literal["daily", "weekly", "monthly"] | None = None

    @model_validator(mode="after")
    def changes_something(self):
        if not self.model_fields_set:
            raise ValueError("a change needs at least one of the task's fields")
        return self


class NewTask(TaskFields):
    title: Title


class Completion(BaseModel):
    """/complete and /toggle: {"completed": a boolean} sets it; {} flips it."""

    model_config = ConfigDict(strict=True)
    completed: bool = False


def unprocessable(*errors: dict) -> HTTPException:
    return HTTPException(422, list(errors))


def invalid(where: str, error: ValidationError) -> HTTPException:
    """pydantic's errors, under "body" or "query"; never the input, which may be large."""
    errors = error.errors(include_url=False, include_context=False, include_input=False)
    located = [{**error, "loc": [where, *error["loc"]]} for error in errors]
    return unprocessable(*located[:MAX_ERRORS])


RECURRENCE_WITHOUT_DUE_DATE = {
    "loc": ["body", "recurrence"],
    "msg": "A recurring task needs a due_date",
    "type": "recurrence_without_due_date",
}


async def read_json_body(request: Request, required: bool = True) -> bytes | None:
    """The body, known to be JSON; None if empty where optional. A client that leaves mid-body
    raises ClientDisconnect (see client_left)."""
    body = b""
    try:
        async with asyncio.timeout(BODY_DEADLINE_SECONDS):
            # A chunked body has no length to check in advance.
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise HTTPException(413, "Request body too large")
    except TimeoutError:
        raise HTTPException(408, "Request body not received in time") from None
    if not body.strip() and not required:
        return None
    try:
        # NaN and Infinity are not JSON (pydantic's parser takes them): int() refuses them.
        json.loads(body, parse_constant=int)
    # RecursionError: deeply nested arrays.
    except (ValueError, RecursionError):
        raise HTTPException(400, "Invalid JSON body") from None
    return body


def read_body(model: type[BaseModel], body: bytes | None, partial: bool = True) -> dict:
    """The body's fields: those given if partial (none if no body). pydantic parses the JSON
    again: in JSON mode, a strict date is text."""
    if body is None:
        return {}
    try:
        return model.model_validate_json(body).model_dump(exclude_unset=partial)
    except ValidationError as error:
        raise invalid("body", error) from None


def parse_task_fields(body: bytes, partial: bool) -> dict:
    """A change's columns (those given), or a create's (the defaults for those not given)."""
    fields = read_body(TaskFields if partial else NewTask, body, partial)
    columns = dict(fields)
    if "priority" in fields:
        columns["priority"] = PRIORITIES[fields["priority"]]
    # Stored twice: tags as JSON beside tag_keys (case-folded), for the filter; due_date
    # beside due_at, the instant it stands for.
    if "tags" in fields:
        columns["tags"] = json.dumps(fields["tags"])
        columns["tag_keys"] = [tag.casefold() for tag in fields["tags"]]
    if "due_date" in fields:
        columns["due_date"] = served(fields["due_date"])
        columns["due_at"] = instant(fields["due_date"], date_means="end")
    if "remind_at" in fields:
        columns["remind_at"] = served(fields["remind_at"])
    if not partial and recurs_without_due_date(columns):
        raise unprocessable(RECURRENCE_WITHOUT_DUE_DATE)
    return columns


def served(moment: date | None) -> str | None:
    """As stored and served: a date as given, a date-time in UTC."""
    if isinstance(moment, datetime):
        return stamp(moment.astimezone(UTC))
    if moment is None:
        return None
    return moment.isoformat()


def instant(moment: date | None, date_means: str) -> str | None:
    """What a due date or a filter compares: a date is the "start" or "end" of that day, UTC."""
    if isinstance(moment, datetime) or moment is None:
        return served(moment)
    if date_means == "end":
        return moment.isoformat() + "T23:59:59.999999Z"
    return moment.isoformat() + "T00:00:00.000000Z"


def stamp(moment: datetime) -> str:
    """The one timestamp format stored and served: UTC, microseconds, Z (see schema.sql)."""
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def utc_now() -> str:
    return stamp(datetime.now(UTC))


def task_id_or_404(request: Request) -> str:
    """The path's task id in canonical form. Anything but a UUID names no task."""
    try:
        return str(uuid.UUID(request.path_params["task_id"]))
    except ValueError:
        raise HTTPException(404, TASK_NOT_FOUND) from None


# The names real frontends use for three of the list's parameters.
QUERY_ALIASES = {"search": "q", "sort_by": "sort", "sort_order": "order"}
# Which tasks, by completed.
STATUSES = {"all": None, "pending": False, "completed": True}


class ListQuery(BaseModel):
    """The list's parameters, each the list of its values under either of its names. Not strict:
    each value is text, read as its field's type. Unknown parameters are ignored."""

    completed: bool | None = None
    status: Literal["all", "pending", "completed"] = "all"
    # q and limit bound a request's work in the database, and the size of its answer.
    q: Annotated[str, StringConstraints(max_length=100, pattern=STORABLE)] = ""
    limit: Annotated[int, Field(ge=1, le=100)] = 100
    # LIMIT and OFFSET are 64-bit.
    offset: Annotated[int, Field(ge=0, lt=2**63)] = 0
    priority: Annotated[list[Priority], Field(max_length=20)] = []
    tag: Annotated[list[Tag], Field(max_length=20)] = []
    due_before: Moment | None = None
    due_after: Moment | None = None
    overdue: bool | None = None
    reminder_due: bool | None = None
    sort: Literal["created_at", "updated_at", "title", "priority", "due_date"] = "created_at"
    order: Literal["asc", "desc"] = "desc"

    @field_validator("*", mode="before")
    @classmethod
    def one_value(cls, values: list[str], info: ValidationInfo):
        """priority and tag repeat; any other parameter given twice must say one thing."""
        if info.field_name in ("priority", "tag"):
            return values
        if len(set(values)) > 1:
            raise ValueError("given twice with different values")
        return values[0]


def parse_list_query(params) -> tuple[str, dict]:
    """LIST_TASKS with the filters given, and its values but :user_id."""
    given = collections.defaultdict(list)
    for name, value in params.multi_items():
        given[QUERY_ALIASES.get(name, name)].append(value)
    try:
        query = ListQuery.model_validate(given)
    except ValidationError as error:
        raise invalid("query", error) from None
    filters = {
        "completed": query.completed,
        "status": STATUSES[query.status],
        "search": query.q.lower() or None,
        "priorities": [PRIORITIES[name] for name in query.priority] or None,
        "tag_keys": [tag.casefold() for tag in query.tag] or None,
        "due_before": instant(query.due_before, date_means="start"),
        "due_after": instant(query.due_after, date_means="end"),
        "overdue": query.overdue,
        "reminder_due": query.reminder_due,
    }
    values = {name: value for name, value in filters.items() if value is not None}
    statement = LIST_TASKS.format(
        filters=" ".join(LIST_FILTERS[name] for name in values),
        total=LIST_TOTALS[bool(values)],
        order_by=LIST_ORDERS[(query.sort, query.order)],
    )
    if "overdue" in values or "reminder_due" in values:
        values["now"] = utc_now()
    values["limit"] = query.limit
    values["offset"] = query.offset
    return statement, values


# === 7. Errors and logs ===
# Every error is JSON with a `detail` key; a 500 shows no internals. Logs (stdout) name route
# templates and error types, never an error's text.

request_log = logging.getLogger("service.requests")

# The database is out of reach, not a bug: OSError (refused, reset, timeouts), and SQLSTATE
# classes 08 (connection), 53 (resources) and 57 (operator intervention).
DATABASE_OUTAGES = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
)
# A pooler that passes prepared statements on.
LOST_STATEMENTS = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)
# Any other method is logged as OTHER: it is the caller's text.
LOGGED_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
# A caller's X-Request-ID is kept if it looks like one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def method_and_route(scope: Scope) -> str:
    """What a log line may say of what was asked: the method, and the route's template."""
    method = scope["method"] if scope["method"] in LOGGED_METHODS else "OTHER"
    route = scope["route"].path if "route" in scope else "-"
    return f"{method} {route}"


def failure_line(scope: Scope, what: str) -> str:
    return f"request {logged_ids(scope)}: {what} on {method_and_route(scope)}"


def logged_ids(scope: Scope) -> str:
    """The request's own id, then the caller's X-Request-ID (or -), which a caller chooses."""
    state = scope.get("state", {})
    return f"{state.get('request_id', '-')} {state.get('caller_request_id') or '-'}"


async def http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def client_left(request: Request, exc: ClientDisconnect) -> Response:
    """The client left before its body arrived: not an error; logged as 499, as proxies do."""
    return Response(status_code=499)


async def constraint_error(request: Request, exc: asyncpg.CheckViolationError) -> Response:
    # The backstop of recurs_without_due_date; any other CHECK that fails is a bug: a 500.
    if exc.constraint_name != "recurring_task_needs_due_date":
        return await server_error(request, exc)
    return await http_error(request, unprocessable(RECURRENCE_WITHOUT_DUE_DATE))


async def database_error(request: Request, exc: Exception) -> Response:
    what = f"database unavailable ({type(exc).__name__})"
    log.warning("%s", failure_line(request.scope, what))
    return JSONResponse({"detail": "Database unavailable"}, 503, headers={"Retry-After": "5"})


async def lost_prepared_statement(request: Request, exc: Exception) -> Response:
    """Such a pooler, which check_pooler refuses at start, reconfigured since."""
    log.error("%s", failure_line(request.scope, NO_PREPARED_STATEMENTS))
    return JSONResponse({"detail": "Internal server error"}, 500)


async def server_error(request: Request, exc: BaseException) -> Response:
    # Where in this file it failed, never the exception's text (it may quote a row).
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__]
    where = "".join(traceback.format_list(frames))
    log.error("%s\n%s", failure_line(request.scope, type(exc).__name__), where)
    return JSONResponse({"detail": "Internal server error"}, 500)


class RequestLog:
    """Gives each request an id and the headers every response carries, and logs one line: ids,
    method and route template (never a user id, query, token or body), status, time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        # Unpredictable: nobody can guess another request's id.
        state["request_id"] = secrets.token_hex(16)
        offered = Headers(scope=scope).get("x-request-id", "")
        if REQUEST_ID.fullmatch(offered):
            state["caller_request_id"] = offered
        # What the client gets if the app raises before it answers.
        status = 500

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in response_headers(scope).items():
                    # What the app set stays.
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            ids = logged_ids(scope)
            asked = method_and_route(scope)
            request_log.info("%s %s %d %.1fms", ids, asked, status, elapsed)


def response_headers(scope: Scope) -> dict:
    """The headers every response carries."""
    state = scope["state"]
    headers = {
        # The caller's, if sane, so that the frontend can match its logs.
        "X-Request-ID": state.get("caller_request_id") or state["request_id"],
        "X-Content-Type-Options": "nosniff",
        # Its CORS headers differ by Origin.
        "Vary": "Origin",
    }
    # User data must not sit in shared caches.
    if scope["path"].startswith("/api/"):
        headers["Cache-Control"] = "no-store"
    return headers


class CannotServe(RuntimeError):
    """A reason not to start, in one line."""


def startup_problem(exc: Exception) -> str:
    """Why the service cannot start, in one line: never an error's text (it may name the
    database's user or host)."""
    if isinstance(exc, CannotServe):
        return str(exc)
    if isinstance(exc, LOST_STATEMENTS):
        return NO_PREPARED_STATEMENTS
    return f"the database could not be reached or refused us ({type(exc).__name__})"


def accepted_tokens(verifier: TokenVerifier) -> str:
    """Which tokens are accepted, for the start-up log (never the secret)."""
    kinds = []
    if verifier.secret:
        kinds.append("HS256 signed with BETTER_AUTH_SECRET")
    if verifier.key_set:
        checks = f"iss {verifier.issuer}, aud {verifier.audience}"
        kinds.append(f"EdDSA/ES256/RS256 from {verifier.key_set.url} ({checks})")
    return "; ".join(kinds) or "none"


def without_exception_text(record: logging.LogRecord) -> bool:
    """A library's log line, without an exception's text or traceback."""
    record.exc_info = None
    record.exc_text = None
    return not str(record.msg).startswith("Traceback")


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `databases` logs the URL's user and host.
    logging.getLogger("databases").setLevel(logging.WARNING)
    # uvicorn's access log has raw paths (ours is RequestLog).
    logging.getLogger("uvicorn.access").disabled = True
    # These log exceptions whole (asyncpg's pool names the host).
    for name in ("uvicorn.error", "asyncpg.pool"):
        logger = logging.getLogger(name)
        if without_exception_text not in logger.filters:
            logger.addFilter(without_exception_text)


# === 8. Database set-up ===
# PostgreSQL through `databases` on asyncpg.

# A database that does not answer is a 503 within these bounds. Past the command timeout,
# asyncpg cancels the statement on the server too.
DATABASE_CONNECT_TIMEOUT_SECONDS = 5
DATABASE_COMMAND_TIMEOUT_SECONDS = 10
# The URL's options: `databases` reads host, min_size and max_size (docs/review.md); the TLS
# options are read here (channel_binding: asyncpg has none, and the verified certificate is what
# it stands for). Anything else is refused: a misspelled sslmode must not be plaintext.
URL_OPTIONS = {"sslmode", "sslrootcert", "channel_binding", "host", "min_size", "max_size"}
# Each verifies the certificate chain and host name before the password is sent: stricter
# than libpq's require, on purpose.
TLS_SSLMODES = {"require", "verify-ca", "verify-full"}
# Not allow or prefer, which fall back to plaintext.
SSLMODES = TLS_SSLMODES | {"disable"}
# sslrootcert=system (or none): the system's authorities, as libpq 16 names them.
SYSTEM_AUTHORITIES = "system"
# Never the URL, which holds the password.
UNREADABLE_DATABASE_URL = (
    "DATABASE_URL cannot be read as a URL: percent-encode the special characters in its"
    " password (/ as %2F, # as %23, ? as %3F, @ as %40) and give the port as a number"
)

NO_SSLMODE = (
    "DATABASE_URL names another machine without sslmode: add ?sslmode=require (TLS, verified),"
    " or ?sslmode=disable on a private network (Render's internal URL, Fly's .internal)"
)

# asyncpg's ssl=, the start-up log's words for it, and DATABASE_POOLED (None: not known).
DatabaseTarget = collections.namedtuple("DatabaseTarget", ["tls", "protection", "pooled"])


def read_database_url(url: str) -> DatabaseTarget:
    """How DATABASE_URL is reached and protected, or a CannotServe that quotes none of it."""
    try:
        parts = urlsplit(url)
        # urlsplit reads the port only when asked, and raises unless it is a number.
        _ = parts.port
    except ValueError:
        raise CannotServe(UNREADABLE_DATABASE_URL) from None
    # A password's unencoded `/`, `?` or `#` ends the host part inside it: its `@` comes later.
    if "@" in parts.path + parts.query + parts.fragment:
        raise CannotServe(UNREADABLE_DATABASE_URL)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - URL_OPTIONS)
    if unknown:
        known = ", ".join(sorted(URL_OPTIONS))
        raise CannotServe(f"DATABASE_URL's option {unknown[0]!r} is not one of {known}")
    # Without one, asyncpg would take PGHOST, or try a list of socket folders of its own.
    server = parts.hostname or options.get("host")
    if not server:
        raise CannotServe("DATABASE_URL must name its host (for a unix socket, host=/its/folder)")
    sslmode = options.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        modes = "require, verify-ca, verify-full (all verified) or disable"
        raise CannotServe(f"DATABASE_URL's sslmode must be {modes}")
    # asyncpg puts no TLS on a unix socket: the log would claim a verification never made.
    if sslmode in TLS_SSLMODES and server.startswith("/"):
        raise CannotServe("DATABASE_URL asks for TLS, which a unix socket does not carry")
    root = options.get("sslrootcert")
    if root is not None and sslmode not in TLS_SSLMODES:
        raise CannotServe("DATABASE_URL's sslrootcert needs sslmode=require (or verify-*)")
    # libpq refuses this without TLS; here it would be a connection in the clear.
    if options.get("channel_binding") == "require" and sslmode not in TLS_SSLMODES:
        raise CannotServe("DATABASE_URL's channel_binding=require needs sslmode=require")
    if root not in (None, SYSTEM_AUTHORITIES) and not Path(root).is_file():
        raise CannotServe("DATABASE_URL's sslrootcert is not a file: a PEM file, or system")
    pooled = DATABASE_POOLED
    if pooled is None and server.endswith(".neon.tech"):
        pooled = "-pooler" in server
    if sslmode in TLS_SSLMODES and root in (None, SYSTEM_AUTHORITIES):
        verified = "TLS, certificate and host name verified against the system's authorities"
        return DatabaseTarget(ssl.create_default_context(), verified, pooled)
    if sslmode in TLS_SSLMODES:
        verified = f"TLS, certificate and host name verified against {root}"
        return DatabaseTarget(ssl.create_default_context(cafile=root), verified, pooled)
    # ssl=False: the URL alone decides, not asyncpg's default (PGSSLMODE, else prefer).
    if sslmode == "disable":
        return DatabaseTarget(False, "not encrypted (sslmode=disable)", pooled)
    # Another machine is reached over TLS unless the URL asks for plaintext by name.
    if not (server.startswith("/") or is_loopback(server)):
        raise CannotServe(NO_SSLMODE)
    return DatabaseTarget(False, "not encrypted (this machine)", pooled)


async def no_reset(connection) -> None:
    """Instead of asyncpg's RESET ALL on every release: the service keeps no session state."""


def open_database(url: str, tls, pooled, statement_cache: bool, upgrade=False) -> Database:
    """The database at url, with asyncpg's ssl= from read_database_url (it replaces the URL's)."""
    options = {
        "reset": no_reset,
        "timeout": DATABASE_CONNECT_TIMEOUT_SECONDS,
        "command_timeout": DATABASE_COMMAND_TIMEOUT_SECONDS,
        "ssl": tls,
    }
    # The schema's steps: one connection, which no timeout cuts short (a step may take long).
    if upgrade:
        options.update(command_timeout=None, min_size=1, max_size=1)
    if not statement_cache:
        options["statement_cache_size"] = 0
    return Database(url, **options)


class SchemaTooNew(CannotServe):
    pass


SCHEMA_PATH = Path(__file__).with_name("schema.sql")
# Any constant: the advisory lock's name among this database's locks.
SCHEMA_LOCK = 720_514_001
# A database made before schema_version has none. users.id came with step 1, users.task_count
# with step 2: how many of them it has is its step (0: a new database).
UNVERSIONED_STEP = """
    SELECT count(*) FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = 'users'
      AND column_name IN ('id', 'task_count')
"""


def schema_steps() -> list[list[str]]:
    """schema.sql's steps, each a list of statements."""
    bodies = re.split(r"^-- step \d+:.*$", SCHEMA_PATH.read_text(), flags=re.MULTILINE)[1:]
    steps = []
    for body in bodies:
        parts = body.split(";")
        statements = [part for part in parts if re.search(r"^\s*[A-Z]", part, re.MULTILINE)]
        steps.append(statements)
    return steps


async def apply_schema(database: Database) -> None:
    """Runs the steps of schema.sql that the database has not had, in one transaction, under a
    lock: instances that start together take turns."""
    steps = schema_steps()
    async with database.transaction():
        # An upgrade of a large table may take long, and so may waiting for another's.
        await database.execute("SET LOCAL statement_timeout = 0")
        # PgBouncer in transaction mode allows a transaction's advisory lock.
        await database.execute("SELECT pg_advisory_xact_lock(:key)", {"key": SCHEMA_LOCK})
        await database.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
        )
        version = await database.fetch_val("SELECT version FROM schema_version")
        if version is None:
            version = await database.fetch_val(UNVERSIONED_STEP)
        if version > len(steps):
            raise SchemaTooNew(
                f"the database's schema is at step {version},"
                f" newer than this service's {len(steps)}"
            )
        for step in steps[version:]:
            for statement in step:
                await database.execute(statement)
        await database.execute("DELETE FROM schema_version")
        await database.execute(
            "INSERT INTO schema_version (version) VALUES (:version)", {"version": len(steps)}
        )


# The server's process id, and whether it sees asyncpg's statement names: a pooler that passes
# them on could run another client's statement of the same name in place of ours.
SERVER_SESSION = """
    SELECT pg_backend_pid() AS pid, EXISTS (
        SELECT FROM pg_prepared_statements WHERE starts_with(name, '__asyncpg_')
    ) AS sees_our_statements
"""
NO_PREPARED_STATEMENTS = (
    "the database's pooler does not keep prepared statements (PgBouncer before 1.21, or"
    " max_prepared_statements = 0): set DATABASE_STATEMENT_CACHE=false"
)
NOT_A_POOLER = (
    "DATABASE_POOLED=false says it keeps one server session per connection (Neon's direct"
    " host); if it is a pooler in transaction mode (PgBouncer), set DATABASE_POOLED=true"
)
UNDECLARED_INTERMEDIARY = (
    "something stands between the service and PostgreSQL: set DATABASE_POOLED=true for a pooler"
    " in transaction mode (PgBouncer: server sessions are shared between clients), or false for"
    " a proxy that keeps one server session per connection (Neon's direct host)"
)


async def check_pooler(database: Database, pooled: bool | None, statement_cache: bool) -> None:
    """Refuses a pooler that would run the wrong statements, whatever its host is called. A
    pooler or a proxy hands out a process id of its own; from here the two cannot be told apart
    for certain, so unless DATABASE_POOLED says which, the service does not start."""
    async with database.connection() as connection:
        async with connection.transaction():
            session = await connection.fetch_one(SERVER_SESSION)
            given_pid = connection.raw_connection.get_server_pid()
    if session["pid"] == given_pid:
        return
    if pooled is None:
        raise CannotServe(UNDECLARED_INTERMEDIARY)
    if not pooled:
        log.warning("something stands between the service and PostgreSQL: %s", NOT_A_POOLER)
    if pooled and statement_cache and session["sees_our_statements"]:
        raise CannotServe(NO_PREPARED_STATEMENTS)


app = create_app()

if __name__ == "__main__":
    # `python service.py` (the quick start) and `python service.py token NAME`: dev.py, which
    # production never runs.
    import dev

    dev.main(sys.argv[1:])
