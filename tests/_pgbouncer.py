"""Private test helper: a PgBouncer in transaction pooling mode, on a free loopback port.

:func:`find_pgbouncer` looks for the binary (``$TEST_PGBOUNCER``, ``PATH``, ``/usr/sbin``).
:class:`PgBouncer` writes a configuration into a temporary directory and runs the binary
in the foreground, as the ``postgres`` user when the tests run as root (PgBouncer
refuses to run as root, like PostgreSQL).  Its ``[databases]`` are given as aliases:
``{"app": "host=127.0.0.1 port=5432 dbname=t_... pool_size=3"}``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg

#: Overrides the search for the binary: the path of ``pgbouncer``.
BINARY_VARIABLE = "TEST_PGBOUNCER"
_START_ATTEMPTS = 5


class PgBouncerUnavailable(Exception):
    """PgBouncer cannot be run on this machine; the message says why."""


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` binary: ``$TEST_PGBOUNCER``, else on ``PATH`` or in ``/usr/sbin``."""
    override = os.environ.get(BINARY_VARIABLE)
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    return Path(found) if found else None


def version(binary: Path) -> tuple[int, int]:
    """``(major, minor)`` of ``binary``, from ``pgbouncer --version`` ("PgBouncer 1.18.0")."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if match is None:
        raise PgBouncerUnavailable(f"cannot read the version of {binary}: {out!r}")
    return int(match.group(1)), int(match.group(2))


class PgBouncer:
    """One PgBouncer process; ``start()`` returns its port, ``stop()`` ends it and cleans up."""

    def __init__(
        self,
        binary: Path,
        databases: Mapping[str, str],
        *,
        pool_mode: str = "transaction",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.databases = dict(databases)
        self.pool_mode = pool_mode
        self.settings = dict(settings or {})
        self.directory: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as: list[str] = []
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PgBouncerUnavailable(
                    "tests run as root, PgBouncer refuses to, and there is no 'postgres' user"
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PgBouncerUnavailable("running as root, but runuser does not exist")
            self._owner = (entry.pw_uid, entry.pw_gid)
            self._run_as = [runuser, "-u", "postgres", "--"]

    @property
    def log_file(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "pgbouncer.log"

    def _write_config(self, port: int) -> Path:
        assert self.directory is not None
        users = self.directory / "users.txt"
        users.write_text('"postgres" ""\n')
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(users),
            "admin_users": "postgres",
            "pool_mode": self.pool_mode,
            "max_client_conn": "500",
            "default_pool_size": "5",
            "logfile": str(self.log_file),
            "pidfile": str(self.directory / "pgbouncer.pid"),
            # asyncpg and psycopg send only parameters PgBouncer knows; keep it strict.
            "ignore_startup_parameters": "extra_float_digits",
            **self.settings,
        }
        config = self.directory / "pgbouncer.ini"
        lines = ["[databases]"]
        lines += [f"{name} = {spec}" for name, spec in self.databases.items()]
        lines += ["", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        config.write_text("\n".join(lines) + "\n")
        if self._owner is not None:
            for path in (self.directory, users, config):
                os.chown(path, *self._owner)
        return config

    def start(self, timeout: float = 20.0) -> int:
        """Start PgBouncer; return its port once it accepts connections to its admin console."""
        self.directory = Path(tempfile.mkdtemp(prefix="asgi-sqla-pgbouncer-"))
        if self._owner is not None:
            os.chown(self.directory, *self._owner)
        for _attempt in range(_START_ATTEMPTS):
            port = _free_loopback_port()
            config = self._write_config(port)
            self._process = subprocess.Popen(
                [*self._run_as, str(self.binary), "--quiet", str(config)],  # logs to log_file
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while self._process.poll() is None:
                with contextlib.suppress(psycopg.OperationalError):
                    self.admin(port).close()
                    self.port = port
                    return port
                if time.monotonic() > deadline:
                    log = self.log()
                    self.stop()
                    raise PgBouncerUnavailable(f"pgbouncer did not accept connections:\n{log}")
                time.sleep(0.02)  # polling interval, bounded by the deadline
            log = self.log()
            if "Address already in use" not in log:
                self.stop()
                raise PgBouncerUnavailable(f"pgbouncer exited at startup:\n{log}")
        self.stop()
        raise PgBouncerUnavailable(f"no free port found in {_START_ATTEMPTS} attempts")

    def admin(self, port: int | None = None) -> psycopg.Connection[tuple[object, ...]]:
        """A connection to the admin console (``SHOW POOLS``...); simple queries only."""
        return psycopg.connect(
            host="127.0.0.1",
            port=port or self.port,
            user="postgres",
            dbname="pgbouncer",
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=5,
        )

    def show(self, what: str) -> list[dict[str, object]]:
        """Rows of ``SHOW <what>`` on the admin console, as dicts."""
        with self.admin() as conn:
            cursor = conn.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=False)) for row in cursor.fetchall()]

    def log(self) -> str:
        if self.directory is not None and self.log_file.exists():
            return self.log_file.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL) and delete its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Signal pgbouncer itself, not runuser (which forwards SIGTERM, then waits 2 s);
            # runuser exits with it.
            try:
                assert self.directory is not None
                os.kill(int((self.directory / "pgbouncer.pid").read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
