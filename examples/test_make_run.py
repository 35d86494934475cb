"""``make run`` for every example, and the curl lines of ``docs/guides/examples.md`` against it.

Each test takes the uvicorn command ``make run FRAMEWORK=<name>`` would run (``make -n``
prints it without running anything), starts it on a free port with a database in
``tmp_path``, and runs the page's curl lines with curl: each must print the reply the
page shows.  The server's log must show the package's records in uvicorn's format
(``examples/logging.json``), and a database that does not answer at startup must be
reported once.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from examples.test_notes_api import EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guides" / "examples.md"
#: How long a server may take to start or stop (importing a framework takes a second).
TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("curl") is None, reason="needs make and curl"
)


@pytest.fixture(params=list(EXAMPLES))
def example_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_run_command(framework: str, port: int) -> list[str]:
    """The command ``make run`` runs, as ``make -n`` prints it (its last line)."""
    # Under `make test` this make is a sub-make: without the parent's variables (and
    # with --no-print-directory) it prints only the recipe, as it does from a shell.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    printed = subprocess.run(
        [
            *("make", "--no-print-directory", "-n", "run"),
            *(f"FRAMEWORK={framework}", f"PORT={port}", f"VENV={sys.prefix}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    command = shlex.split(printed.strip().splitlines()[-1])
    assert Path(command[0]).name == "uvicorn", printed
    return command


def curl_lines() -> list[tuple[str, str]]:
    """The page's curl lines, each with the reply shown under it."""
    lines = PAGE.read_text().splitlines()
    pairs = [
        (line.removeprefix("$ "), lines[i + 1])
        for i, line in enumerate(lines)
        if line.startswith("$ curl ")
    ]
    assert len(pairs) >= 10, pairs
    return pairs


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def make_run(framework: str, tmp_path: Path, database_url: str) -> Iterator[RunningServer]:
    """``make run``'s command in a process of its own; stopped with SIGINT at the end."""
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "DATABASE_URL": database_url}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            make_run_command(framework, port), cwd=ROOT, env=env, stdout=log, stderr=log
        )
    server = RunningServer(process, log_path, port)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            process.kill()
            process.wait()


def wait_until_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log
        try:
            httpx.get(f"http://127.0.0.1:{server.port}/notes/count", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)  # polling for the port to open, not waiting for an event
    raise AssertionError(f"the server did not answer in {TIMEOUT} s:\n{server.log}")


def sqlite_url(framework: str, path: Path) -> str:
    driver = "sqlite" if EXAMPLES[framework].sync else "sqlite+aiosqlite"
    return f"{driver}:///{path}"


def test_the_curl_lines_of_the_guide_give_the_replies_it_shows(
    example_name: str, tmp_path: Path
) -> None:
    url = sqlite_url(example_name, tmp_path / "notes.db")

    with make_run(example_name, tmp_path, url) as server:
        wait_until_ready(server)
        for command, shown in curl_lines():
            argv = shlex.split(command.replace("localhost:8000", f"127.0.0.1:{server.port}"))
            printed = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            # `-w ' %{http_code}\n'` appends the status; Quart ends its JSON with "\n".
            body, _, status = printed.rstrip("\n").rpartition(" ")
            assert f"{body.rstrip()} {status}" == shown, (command, printed)

    assert server.process.returncode == 0, server.log
    log = server.log
    # The failed commit's record, in uvicorn's format (examples/logging.json), once.
    commit_failed = "The transaction failed to commit"
    assert log.count(commit_failed) == 1, log
    assert re.search(rf"^ERROR: +asgi_sqla: {commit_failed}", log, re.MULTILINE), log


def test_a_database_that_does_not_answer_is_reported_once_and_stops_the_server(
    example_name: str, tmp_path: Path
) -> None:
    driver = "psycopg" if EXAMPLES[example_name].sync else "asyncpg"
    url = f"postgresql+{driver}://app:pa55word@127.0.0.1:{free_port()}/notes"

    with make_run(example_name, tmp_path, url) as server:
        server.process.wait(TIMEOUT)

    log = server.log
    assert server.process.returncode != 0, log
    assert log.count("did not answer at startup") == 1, log
    assert re.search(
        r"^ERROR: +(Sync)?Database\('postgresql\+\w+://app:\*\*\*@", log, re.MULTILINE
    ), log
    assert "pa55word" not in log
