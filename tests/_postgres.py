"""Private test helpers: provide a real PostgreSQL server and throwaway databases.

Used by ``tests/conftest.py``; tests normally use its fixtures, not this module.

* :func:`find_bindir` looks for the server binaries (``initdb``, ``pg_ctl``, ``postgres``).
* :class:`TemporaryCluster` runs a disposable cluster in a temporary directory on a free
  loopback port, tuned for speed (no fsync).  PostgreSQL refuses to run as root, so when the
  tests run as root the cluster is owned by, and run as, the ``postgres`` user.
* :class:`DatabaseFactory` creates and drops one fresh database per test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from sqlalchemy import URL, make_url

#: Overrides the binary search: the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.
BINDIR_VARIABLE = "TEST_POSTGRES_BINDIR"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_START_ATTEMPTS = 5  # a free port can be taken by someone else before the server binds it


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be provided on this machine; the message says why."""


def find_bindir() -> Path | None:
    """Return the first directory holding the PostgreSQL server binaries, or None.

    Looks at ``$TEST_POSTGRES_BINDIR`` only, if set; otherwise at ``pg_config --bindir``,
    ``/usr/lib/postgresql/<version>/bin`` (newest version first), then ``PATH``.
    """
    override = os.environ.get(BINDIR_VARIABLE)
    if override:
        candidates = [Path(override)]
    else:
        candidates = []
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
                ).stdout.strip()
                if out:
                    candidates.append(Path(out))
        debian = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
        candidates.extend(sorted(debian, key=_debian_version, reverse=True))
        initdb = shutil.which("initdb")
        if initdb:
            candidates.extend([Path(initdb).parent, Path(initdb).resolve().parent])
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES):
            return directory
    return None


def _debian_version(bindir: Path) -> float:
    try:
        return float(bindir.parent.name)
    except ValueError:
        return 0.0


def connect(url: URL) -> psycopg.Connection[TupleRow]:
    """Open a synchronous autocommit psycopg connection to the database named by ``url``.

    The URL's driver part is ignored, so an async test URL works as well.
    """
    params: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    for key, value in url.query.items():
        params[key] = value if isinstance(value, str) else value[-1]
    params.setdefault("connect_timeout", 10)
    return psycopg.connect(autocommit=True, **{k: v for k, v in params.items() if v is not None})


def server_url_from_env(value: str) -> URL:
    """The admin URL of an external server given as ``TEST_DATABASE_URL`` (driver removed)."""
    url = make_url(value)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"TEST_DATABASE_URL must be a postgresql:// URL, not {url!r}")
    return url.set(drivername="postgresql")


class TemporaryCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.

    ``start()`` returns the driver-less URL of its ``postgres`` database (user ``postgres``,
    trust authentication); ``stop()`` kills the server and deletes the directory.  ``stop()``
    is idempotent and also cleans up after a failed ``start()``.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.directory: Path | None = None
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._run_as: list[str] = []
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "tests run as root, PostgreSQL refuses to, and there is no 'postgres' user"
                ) from None
            self._owner = (entry.pw_uid, entry.pw_gid)
            runuser = shutil.which("runuser")
            if runuser:
                self._run_as = [runuser, "-u", "postgres", "--"]
            elif su := shutil.which("su"):
                self._run_as = [su, "postgres", "-s", "/bin/sh", "-c"]
            else:
                raise PostgresUnavailable("running as root, but neither runuser nor su exists")

    @property
    def data_directory(self) -> Path:
        assert self.directory is not None, "cluster not started"
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        assert self.directory is not None, "cluster not started"
        return self.directory / "server.log"

    def _command(self, *args: str) -> list[str]:
        """``bindir/args[0] args[1:]``, run as the postgres user when we are root."""
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._run_as and self._run_as[-1] == "-c":  # su takes one shell command string
            return [*self._run_as, shlex.join(command)]
        return [*self._run_as, *command]

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._command(*args),
            cwd=self.directory,  # readable by the postgres user, unlike perhaps our cwd
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 60.0) -> URL:
        """Create and start the cluster; return the admin URL once it accepts connections."""
        started = time.monotonic()
        self.directory = Path(tempfile.mkdtemp(prefix="asgi-sqla-pg-", dir=_scratch_parent()))
        if self._owner is not None:
            os.chown(self.directory, *self._owner)
        self._start_watchdog()
        initdb = self._run(
            "initdb",
            "--pgdata",
            str(self.data_directory),
            "--username=postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        socket_directory = str(self.directory).replace("'", "''")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{socket_directory}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "max_prepared_transactions": "10",
            # CREATE DATABASE writes the new database to the WAL: recycle it early, it may be
            # in RAM (see _scratch_parent).
            "min_wal_size": "32MB",
            "max_wal_size": "128MB",
        }
        with (self.data_directory / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by tests/_postgres.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

        for _attempt in range(_START_ATTEMPTS):
            self.port = _free_loopback_port()
            # -w: pg_ctl polls until the server accepts connections, up to -t seconds.
            result = self._run(
                "pg_ctl",
                "start",
                "--pgdata",
                str(self.data_directory),
                "--log",
                str(self.log_file),
                "--wait",
                f"--timeout={int(timeout)}",
                "-o",
                f"-p {self.port}",
                timeout=timeout + 10,
            )
            if result.returncode == 0:
                break
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            if "could not bind" not in log:
                raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{log}")
            self.log_file.unlink()
        else:
            raise RuntimeError(f"no free port found in {_START_ATTEMPTS} attempts")

        url = URL.create(
            "postgresql", username="postgres", host="127.0.0.1", port=self.port, database="postgres"
        )
        _wait_until_accepting(url, deadline=started + timeout)
        self.startup_seconds = time.monotonic() - started
        return url

    def _stop_args(self) -> tuple[str, ...]:
        return ("pg_ctl", "stop", "--pgdata", str(self.data_directory), "-m", "immediate")

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``) and remove its directory."""
        directory = self.directory
        if directory is None:
            return
        try:
            if (self.data_directory / "postmaster.pid").exists():
                self._run(*self._stop_args(), timeout=60)
        finally:
            self.directory = None
            shutil.rmtree(directory, ignore_errors=True)
            if self._watchdog is not None:
                self._watchdog.communicate(timeout=60)  # EOF: it finds nothing left to do
                self._watchdog = None

    def _start_watchdog(self) -> None:
        """Start a process that stops the server and deletes the directory if we die.

        It waits for EOF on its stdin, a pipe from this process: EOF comes from ``stop()``,
        or from the kernel when this process ends in any way, even by SIGTERM or SIGKILL
        (when ``stop()`` and ``atexit`` never run).  Its own session spares it the Ctrl-C
        meant for pytest.
        """
        assert self.directory is not None
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(self.directory),
                *self._command(*self._stop_args()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


_WATCHDOG = """
import os, shutil, subprocess, sys
sys.stdin.buffer.read()
directory, stop = sys.argv[1], sys.argv[2:]
if os.path.exists(os.path.join(directory, "data", "postmaster.pid")):
    subprocess.run(stop, cwd=directory, capture_output=True, timeout=60, check=False)
shutil.rmtree(directory, ignore_errors=True)
"""


def _scratch_parent() -> str | None:
    """Where to put the cluster: ``/dev/shm`` if it has room and ``TMPDIR`` is not set.

    Even with fsync off, creating and dropping a database per test costs ~15 ms on tmpfs but
    can cost ~300 ms on a disk (measured on an ext4 VM disk mounted with ``discard``).
    """
    shm = "/dev/shm"
    if os.environ.get("TMPDIR") or not os.access(shm, os.W_OK | os.X_OK):
        return None  # tempfile's default
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return shm if free >= 1 << 30 else None


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_accepting(url: URL, deadline: float) -> None:
    """Poll until a query succeeds on ``url``; raise the last error after ``deadline``."""
    while True:
        try:
            with connect(url) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling interval, bounded by the deadline


class DatabaseFactory:
    """Creates and drops throwaway databases over one reused autocommit admin connection.

    Databases are copied from ``template0``, so they are empty whatever ``template1`` holds
    on an external server.  The admin connection is re-opened if a test killed it.
    """

    def __init__(self, server: URL) -> None:
        self.server = server
        self._connection: psycopg.Connection[TupleRow] | None = None

    def _execute(self, statement: sql.Composed) -> None:
        for attempt in range(2):
            conn = self._connection
            if conn is None or conn.closed:
                conn = self._connection = connect(self.server)
            try:
                conn.execute(statement)
                return
            except psycopg.OperationalError:
                if not (conn.broken or conn.closed) or attempt:
                    raise
                conn.close()
                self._connection = None

    def create(self) -> URL:
        """Create an empty database with a unique name; return its driver-less URL."""
        name = f"t_{uuid.uuid4().hex}"
        self._execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        return self.server.set(database=name)

    def drop(self, url: URL) -> None:
        """Drop the database of ``url``, terminating any sessions still connected to it."""
        assert url.database, url
        self._execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(url.database))
        )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# -- streaming replication -----------------------------------------------------------------


class StreamingReplica(TemporaryCluster):
    """A hot standby of the server at ``primary`` (an admin URL), on a free loopback port.

    ``start()`` copies the primary with ``pg_basebackup -R`` (which writes
    ``standby.signal`` and ``primary_conninfo``, so the copy starts as a standby that
    streams WAL from the primary) and starts it; it returns the standby's admin URL.
    A :class:`TemporaryCluster` needs nothing more to be a primary: ``wal_level =
    replica`` and ``max_wal_senders = 10`` are PostgreSQL's defaults since version 10,
    and initdb's ``pg_hba.conf`` allows replication connections from 127.0.0.1 with the
    ``--auth`` method (trust here); the copy keeps the primary's settings.  ``stop()``
    (inherited) stops it and deletes its directory; ``pause()`` and ``resume()`` stop it
    and start it again on the same port; ``promote()`` makes it a primary (a failover).
    """

    def __init__(self, bindir: Path, primary: URL) -> None:
        super().__init__(bindir)
        self.primary = primary

    def start(self, timeout: float = 60.0) -> URL:
        started = time.monotonic()
        if not os.access(self.bindir / "pg_basebackup", os.X_OK):
            raise PostgresUnavailable(f"no pg_basebackup in {self.bindir}")
        self.directory = Path(
            tempfile.mkdtemp(prefix="asgi-sqla-pg-replica-", dir=_scratch_parent())
        )
        if self._owner is not None:
            os.chown(self.directory, *self._owner)
        self._start_watchdog()
        backup = self._run(
            "pg_basebackup",
            "--pgdata",
            str(self.data_directory),
            f"--host={self.primary.host}",
            f"--port={self.primary.port}",
            f"--username={self.primary.username}",
            "--write-recovery-conf",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
            timeout=timeout,
        )
        if backup.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed:\n{backup.stdout}\n{backup.stderr}")
        for _attempt in range(_START_ATTEMPTS):
            self.port = _free_loopback_port()
            if self._pg_ctl_start(timeout):
                break
        else:
            raise RuntimeError(f"no free port found in {_START_ATTEMPTS} attempts")
        url = self.url
        _wait_until_accepting(url, deadline=started + timeout)
        self.startup_seconds = time.monotonic() - started
        return url

    @property
    def url(self) -> URL:
        return URL.create(
            "postgresql", username="postgres", host="127.0.0.1", port=self.port, database="postgres"
        )

    def _pg_ctl_start(self, timeout: float) -> bool:
        """Start the server on ``self.port``; False if the port was taken meanwhile."""
        assert self.directory is not None
        # The copied postgresql.conf points unix_socket_directories at the primary's
        # directory: -k gives the standby its own.
        result = self._run(
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.data_directory),
            "--log",
            str(self.log_file),
            "--wait",
            f"--timeout={int(timeout)}",
            "-o",
            f"-p {self.port} -k {shlex.quote(str(self.directory))}",
            timeout=timeout + 10,
        )
        if result.returncode == 0:
            return True
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        if "could not bind" not in log:
            raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{log}")
        self.log_file.unlink()
        return False

    def pause(self) -> None:
        """Stop the standby (fast shutdown), keeping its data directory and port."""
        result = self._run("pg_ctl", "stop", "--pgdata", str(self.data_directory), "-m", "fast")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}\n{result.stderr}")

    def promote(self, timeout: float = 60.0) -> None:
        """Make the standby a primary (``pg_ctl promote --wait``): it accepts writes after."""
        result = self._run(
            "pg_ctl",
            "promote",
            "--pgdata",
            str(self.data_directory),
            "--wait",
            f"--timeout={int(timeout)}",
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed:\n{result.stdout}\n{result.stderr}")

    def resume(self, timeout: float = 60.0) -> None:
        """Start the standby again on the same port, after :meth:`pause`."""
        if not self._pg_ctl_start(timeout):
            raise RuntimeError(f"port {self.port} was taken while the standby was stopped")
        _wait_until_accepting(self.url, deadline=time.monotonic() + timeout)


def wait_for_replay(primary: URL, replica: URL, timeout: float = 10.0) -> None:
    """Wait until ``replica`` has replayed everything ``primary`` has written so far.

    Flushes the primary's WAL, reads its position, then polls the standby's replay
    position (``pg_last_wal_replay_lsn()``) until it has reached it.  The flush: with
    ``synchronous_commit = off`` (as on :class:`TemporaryCluster`) a commit returns
    before its WAL is written, and the standby only gets what is; committing a
    transaction that has an id, with ``synchronous_commit = on``, writes everything
    before it at once instead of at the WAL writer's next round (up to 200 ms).  The
    transaction writes a logical decoding message: a WAL record that changes no data.
    """
    with connect(primary) as conn:
        conn.execute("SET synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'asgi-sqla-tests', 'flush')")
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    target = row[0]
    deadline = time.monotonic() + timeout
    with connect(replica) as conn:
        while True:
            caught_up = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
            ).fetchone()
            if caught_up is not None and caught_up[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay up to {target} in {timeout} s")
            time.sleep(0.005)  # polling interval, bounded by the deadline
