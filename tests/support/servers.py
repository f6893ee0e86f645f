"""Real PostgreSQL, Redis and HAProxy servers for tests, on free ports in temporary directories, and our own server
as a process."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.core.config import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise FileNotFoundError(f"{name} not found: install PostgreSQL (apt-get install -y postgresql)")
    return str(candidates[-1])


class PostgresServer:
    """initdb + pg_ctl in a temp dir. PostgreSQL refuses to run as root, so root runs it as `postgres`
    (in a directory of its own under /tmp: pytest's temp dirs are closed to other users)."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.port = free_port()
        self.data = self.directory / "pgdata"
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        command = [*(["runuser", "-u", self.user, "--"] if self.user else []), *args]
        subprocess.run(command, check=True, capture_output=True)

    def start(self) -> "PostgresServer":
        if not self.data.exists():
            self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "test", "--auth=trust", "-E", "UTF8")
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.directory / "log"),
            "-o",
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        return self

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "immediate", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://test@127.0.0.1:{self.port}/{database}"


class RedisServer:
    """redis-server on a free port, no persistence; `stop()` and `start()` again keep the port."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found: install it (apt-get install -y redis-server)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class HAProxyServer:
    """HAProxy on a free loopback port with deploy/haproxy.cfg, in front of `backends` (host:port each)."""

    CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"

    def __init__(self, backends: list[str]):
        self.directory = Path(tempfile.mkdtemp(prefix="haproxy-test-"))
        self.port = free_port()
        self.backends = backends
        self.process: subprocess.Popen | None = None

    def start(self) -> "HAProxyServer":
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise FileNotFoundError("haproxy not found: install it (apt-get install -y haproxy)")
        env = {
            **os.environ,
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "HAPROXY_STATS_SOCKET": str(self.socket),
            **{f"APP{i}": backend for i, backend in enumerate(self.backends, 1)},
        }
        log = (self.directory / "haproxy.log").open("w")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(self.CONFIG)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket(self) -> Path:
        return self.directory / "stats.sock"

    def states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy sees it (UP, DOWN, ...), from the runtime API."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket))
            sock.sendall(b"show stat\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {row[1]: row[17].split(" ")[0] for row in rows if row[0] == "app" and row[1].startswith("app")}


def start_server(
    standins, tmp_path: Path, command: tuple[str, ...] = ("-m", "server", "serve"), **settings: str
) -> tuple[subprocess.Popen, int]:
    """A server process (`python <command> --port N`) answering /health; its output in tmp_path/server.log."""
    generator, classifier = standins
    port = free_port()
    env = {
        **os.environ,
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'server.db'}",
        "RECORD_SPILL_DIR": str(tmp_path / "spill"),
        "TORCH_NUM_THREADS": "1",
        **settings,
    }
    process = subprocess.Popen(
        [sys.executable, *command, "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=(tmp_path / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError((tmp_path / "server.log").read_text())
