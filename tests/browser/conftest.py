"""The real server (uvicorn in its own process, on a free loopback port) and Debian's headless Chromium, driven by
Playwright through `executable_path`: nothing is downloaded (never `playwright install`).

Every page records what went wrong on it (console errors, uncaught exceptions, failed requests, HTTP errors,
Content-Security-Policy violations) for the tests to assert on.
"""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright

from server.core.config import Settings
from tests.support.servers import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
START_TIMEOUT_S = 120
# Runs before the page's own scripts; CDP-injected, so the page's CSP does not apply to it.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
  event => window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`));
"""


@dataclass
class Server:
    url: str
    log: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def start_server(directory: Path, standins: tuple[Path, Path], **settings: str) -> tuple[subprocess.Popen, Server]:
    """`uvicorn server.main:app` with the tiny models, SQLite, the in-process cache and limits (no REDIS_URL) and the
    batch worker in process, configured by `settings` over the defaults only: no setting of the caller's environment
    is passed on, and it runs in `directory`, so no `.env` of the checkout applies."""
    generator, classifier = standins
    port = free_port()
    inherited = {name: value for name, value in os.environ.items() if name.lower() not in Settings.model_fields}
    env = {
        **inherited,
        "PYTHONPATH": str(PROJECT_ROOT),
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "MODELS_CACHE_DIR": str(directory / "cache"),
        "DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'server.db'}",
        "TORCH_NUM_THREADS": "1",
        "RECORD_FLUSH_INTERVAL_MS": "20",
        "RECORD_SPILL_DIR": str(directory / "spill"),
        "BATCH_POLL_INTERVAL_S": "0.2",
        "LOG_LEVEL": "warning",
        **settings,
    }
    log = directory / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "server.main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=directory,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", log)
    try:
        _wait_until_serving(process, server)
    except BaseException:
        stop_server(process)
        raise
    return process, server


def _wait_until_serving(process: subprocess.Popen, server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            try:
                process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log.read_text()}")
    raise TimeoutError(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{server.log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def serve(standins: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`serve(**settings)`: a server for this module, stopped after it."""
    running: list[subprocess.Popen] = []

    def start(**settings: str) -> Server:
        process, server = start_server(tmp_path_factory.mktemp("server"), standins, **settings)
        running.append(process)
        return server

    yield start
    for process in running:
        stop_server(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Per module: Playwright's sync API holds an event loop while it runs, which would stop the async tests of
    other modules (pytest-asyncio) from starting theirs."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError("chromium not found: install Debian's package (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests leave what a person may want to look at (screenshots)."""
    return tmp_path_factory.mktemp("artifacts")


@dataclass
class Watched:
    """A page and what went wrong on it so far."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    http_errors: list[tuple[int, str, str]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def csp_violations(self) -> list[str]:
        return self.page.evaluate("window.__cspViolations")

    def assert_clean(self) -> None:
        """Nothing went wrong: no console error, no exception, no failed or refused request, no CSP violation, no
        problem reported on the page."""
        assert self.console_errors == [] and self.page_errors == [], (self.console_errors, self.page_errors)
        assert self.failed_requests == [] and self.http_errors == [], (self.failed_requests, self.http_errors)
        assert self.csp_violations() == []
        assert self.page.is_hidden("#page-error"), self.page.inner_text("#page-error")

    def api_requests(self) -> list[Request]:
        """The page's own reads and writes (not its HTML, scripts, styles and icon)."""
        return [r for r in self.requests if r.resource_type == "fetch"]


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    """A fresh page (its own context: empty sessionStorage), 1280 px wide."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    page.set_default_timeout(30_000)
    watched = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.console_errors.append(message.text)

    def on_response(response: Response) -> None:
        if response.status >= 400:
            watched.http_errors.append((response.status, response.request.method, response.url))

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
    page.on("requestfailed", lambda request: watched.failed_requests.append(f"{request.url} {request.failure}"))
    page.on("response", on_response)
    page.on("request", lambda request: watched.requests.append(request))
    yield watched
    context.close()
