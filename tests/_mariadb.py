"""Private test helpers: provide a real MariaDB (or MySQL) server and throwaway databases.

Used by ``tests/conftest.py``; tests normally use its fixtures, not this module.  The
counterpart of ``tests/_postgres.py``:

* :func:`find_server` looks for the server (``mariadbd`` or ``mysqld``) and the program
  that creates its system tables (``mariadb-install-db`` or ``mysql_install_db``).
* :class:`TemporaryServer` runs a disposable server in a temporary directory on a free
  loopback port (and a socket in that directory), tuned for speed (no flush at commit,
  no binary log).  When the tests run as root it runs as the ``mysql`` user (or
  ``postgres``): ``mariadbd`` refuses to run as root without ``--user``.
* :class:`DatabaseFactory` creates and drops one fresh database per test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy import URL, make_url

import _postgres

#: Overrides the search: the directory holding ``mariadbd`` (or ``mysqld``) and
#: ``mariadb-install-db`` (or ``mysql_install_db``).
BINDIR_VARIABLE = "TEST_MARIADB_BINDIR"
#: An external server instead (``mysql://root:pw@host:3306``; the user needs CREATE, DROP
#: and the right to KILL other sessions and set global variables).
URL_VARIABLE = "TEST_MARIADB_URL"
_SERVERS = ("mariadbd", "mysqld")
_INSTALLERS = ("mariadb-install-db", "mysql_install_db")
_START_ATTEMPTS = 5  # a free port can be taken by someone else before the server binds it
#: Users the server may run as when we are root (Debian's package makes ``mysql``).
_RUN_AS = ("mysql", "postgres")


class MariaDBUnavailable(Exception):
    """No MariaDB server can be provided on this machine; the message says why."""


def find_server() -> tuple[Path, Path] | None:
    """``(server, installer)`` paths, or None when either is missing.

    Looks in ``$TEST_MARIADB_BINDIR`` only, if set; otherwise on ``PATH`` and in
    ``/usr/sbin`` and ``/usr/bin`` (Debian puts ``mariadbd`` in ``/usr/sbin``, which a
    non-root ``PATH`` lacks).
    """
    override = os.environ.get(BINDIR_VARIABLE)
    directories = [override] if override else [*os.get_exec_path(), "/usr/sbin", "/usr/bin"]

    def first(names: tuple[str, ...]) -> Path | None:
        for name in names:
            for directory in directories:
                candidate = Path(directory) / name
                if os.access(candidate, os.X_OK):
                    return candidate
        return None

    server, installer = first(_SERVERS), first(_INSTALLERS)
    return (server, installer) if server and installer else None


def connect(url: URL, **options: Any) -> pymysql.connections.Connection[Any]:
    """Open a synchronous autocommit PyMySQL connection to the database named by ``url``.

    The URL's driver part is ignored, so an async test URL works as well.
    """
    return pymysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=url.database,
        autocommit=True,
        connect_timeout=10,
        charset="utf8mb4",
        **options,
    )


def server_url_from_env(value: str) -> URL:
    """The admin URL of an external server given as ``TEST_MARIADB_URL`` (driver removed)."""
    url = make_url(value)
    if url.get_backend_name() not in ("mysql", "mariadb"):
        raise ValueError(f"{URL_VARIABLE} must be a mysql:// or mariadb:// URL, not {url!r}")
    return url.set(drivername="mysql", database=None)


class TemporaryServer:
    """A throwaway MariaDB server in a temporary directory, listening on 127.0.0.1 only.

    ``start()`` returns the driver-less URL of the server (user ``root``, no password);
    ``stop()`` kills the server and deletes the directory.  ``stop()`` is idempotent and
    also cleans up after a failed ``start()``.
    """

    def __init__(self, server: Path, installer: Path) -> None:
        self.server = server
        self.installer = installer
        self.directory: Path | None = None
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self.version: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            for name in _RUN_AS:
                try:
                    entry = pwd.getpwnam(name)
                except KeyError:
                    continue
                self._user, self._owner = name, (entry.pw_uid, entry.pw_gid)
                break
            else:
                raise MariaDBUnavailable(
                    f"tests run as root and there is no user to run the server as ({_RUN_AS})"
                )

    @property
    def log_file(self) -> Path:
        assert self.directory is not None, "server not started"
        return self.directory / "server.log"

    def _log_tail(self) -> str:
        if self.directory is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")[-4000:]

    def start(self, timeout: float = 60.0) -> URL:
        """Create the data directory and start the server; return its admin URL once it answers."""
        started = time.monotonic()
        self.directory = Path(
            tempfile.mkdtemp(prefix="asgi-sqla-mariadb-", dir=_postgres._scratch_parent())
        )
        if self._owner is not None:
            os.chown(self.directory, *self._owner)
        user = [f"--user={self._user}"] if self._user else []
        install = subprocess.run(
            [
                str(self.installer),
                "--no-defaults",
                f"--datadir={self.directory / 'data'}",
                # root@localhost logs in with a (here empty) password, not through the
                # unix_socket plugin, which would need the OS user to be root.
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                *user,
            ],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if install.returncode != 0:
            raise RuntimeError(f"{self.installer.name} failed:\n{install.stdout}\n{install.stderr}")
        for _attempt in range(_START_ATTEMPTS):
            self.port = _postgres._free_loopback_port()
            if self._launch(started + timeout):
                break
        else:
            raise RuntimeError(f"no free port found in {_START_ATTEMPTS} attempts")
        self.startup_seconds = time.monotonic() - started
        return self.url

    @property
    def url(self) -> URL:
        return URL.create("mysql", username="root", host="127.0.0.1", port=self.port)

    def _launch(self, deadline: float) -> bool:
        """Start the server on ``self.port``; False if the port was taken meanwhile."""
        assert self.directory is not None
        self._stop_process()
        if self.log_file.exists():
            self.log_file.unlink()
        user = [f"--user={self._user}"] if self._user else []
        self._process = subprocess.Popen(
            [
                str(self.server),
                "--no-defaults",  # the machine's /etc/mysql/my.cnf is not ours
                f"--datadir={self.directory / 'data'}",
                f"--socket={self.directory / 'mysqld.sock'}",
                f"--pid-file={self.directory / 'mysqld.pid'}",
                f"--log-error={self.log_file}",
                "--bind-address=127.0.0.1",
                f"--port={self.port}",
                "--skip-name-resolve",
                # Speed: nothing is flushed at commit, no binary log, small buffers.
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-doublewrite=0",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--max-connections=300",
                *user,
            ],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if self._watchdog is None:
            self._start_watchdog()
        while True:
            try:
                with connect(self.url) as conn, conn.cursor() as cursor:
                    cursor.execute("SELECT VERSION()")
                    row = cursor.fetchone()
                    self.version = str(row[0]) if row else None
                return True
            except pymysql.err.OperationalError:
                if self._process.poll() is not None:
                    log = self._log_tail()
                    if "Address already in use" in log:
                        return False
                    raise RuntimeError(f"{self.server.name} exited at start:\n{log}") from None
                if time.monotonic() > deadline:
                    log = self._log_tail()
                    raise RuntimeError(f"{self.server.name} did not answer:\n{log}") from None
                time.sleep(0.02)  # polling interval, bounded by the deadline

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()  # like `pg_ctl stop -m immediate`: the data is thrown away
            process.wait(timeout=60)

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        directory = self.directory
        if directory is None:
            return
        try:
            self._stop_process()
        finally:
            self.directory = None
            shutil.rmtree(directory, ignore_errors=True)
            if self._watchdog is not None:
                self._watchdog.communicate(timeout=60)  # EOF: it finds nothing left to do
                self._watchdog = None

    def _start_watchdog(self) -> None:
        """Start a process that kills the server and deletes the directory if we die.

        As in ``_postgres.TemporaryCluster._start_watchdog``: it waits for EOF on a pipe
        from this process, which the kernel closes however this process ends.
        """
        assert self.directory is not None
        assert self._process is not None
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.directory), str(self._process.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


_WATCHDOG = f"""
import os, shutil, signal, sys
sys.stdin.buffer.read()
directory, pid = sys.argv[1], int(sys.argv[2])
if os.path.exists(directory):
    try:
        os.kill(pid, {int(signal.SIGKILL)})
    except OSError:
        pass
shutil.rmtree(directory, ignore_errors=True)
"""


def free_port_url() -> URL:
    """The URL of a loopback port nobody listens on: every connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return URL.create("mysql", username="root", host="127.0.0.1", port=port, database="absent")


class DatabaseFactory:
    """Creates and drops throwaway databases over one reused autocommit admin connection.

    The admin connection is re-opened if a test killed it.
    """

    def __init__(self, server: URL) -> None:
        self.server = server
        self._connection: pymysql.connections.Connection[Any] | None = None

    def execute(self, statement: str, args: Any = None) -> list[tuple[Any, ...]]:
        """Run ``statement`` on the admin connection; return its rows."""
        for attempt in range(2):
            conn = self._connection
            if conn is None or not conn.open:
                conn = self._connection = connect(self.server)
            try:
                with conn.cursor() as cursor:
                    cursor.execute(statement, args)
                    return list(cursor.fetchall())
            except pymysql.err.OperationalError:
                if conn.open or attempt:
                    raise
                self._connection = None
        raise AssertionError("unreachable")

    def create(self) -> URL:
        """Create an empty database with a unique name; return its driver-less URL."""
        name = f"t_{uuid.uuid4().hex}"
        self.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        return self.server.set(database=name)

    def drop(self, url: URL) -> None:
        """Drop the database of ``url``, killing any session still using it first.

        A session left with an open transaction holds metadata locks that would make
        ``DROP DATABASE`` wait (MariaDB has no ``WITH (FORCE)``); so would a prepared XA
        transaction, rolled back here.
        """
        assert url.database, url
        sessions = self.execute(
            "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
            (url.database,),
        )
        for (session,) in sessions:
            try:
                self.execute(f"KILL CONNECTION {int(session)}")
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != 1094:  # ER_NO_SUCH_THREAD: it ended meanwhile
                    raise
        # An XA transaction a failed test left prepared would hold its locks (the drop
        # would wait for them); XA transactions belong to the server, not a database.
        for _format, gtrid_length, _bqual_length, data in self.execute("XA RECOVER"):
            xid = data[:gtrid_length].decode() if isinstance(data, bytes) else data
            self.execute("XA ROLLBACK %s", (xid,))
        self.execute(f"DROP DATABASE IF EXISTS `{url.database}`")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
