import json
import logging
import sys
from pathlib import Path

import httpx

from server.bench.run import server_process
from server.core.logging import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter, log_config
from tests.support.servers import free_port


def record(message: str = "hello %s", *args, exc_info=None, **extra) -> logging.LogRecord:
    made = logging.LogRecord("server.test", logging.INFO, __file__, 1, message, args or ("world",), exc_info)
    made.__dict__.update(extra)
    RequestIdFilter().filter(made)
    return made


def test_a_record_written_while_serving_a_request_carries_its_id():
    token = REQUEST_ID.set("req-1")
    try:
        inside = record()
    finally:
        REQUEST_ID.reset(token)
    assert inside.request_id == "req-1" and record().request_id is None


def test_json_lines_hold_the_fields_and_access_lines_their_request():
    token = REQUEST_ID.set("req-2")
    try:
        access = record("%s %s", "GET", "/x", method="GET", route="/x", status=200, duration_ms=1.5)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(JsonFormatter().format(access))
    assert entry["time"].endswith("Z") and entry["level"] == "INFO" and entry["logger"] == "server.test"
    assert entry["message"] == "GET /x" and entry["request_id"] == "req-2"
    assert (entry["method"], entry["route"], entry["status"], entry["duration_ms"]) == ("GET", "/x", 200, 1.5)
    assert "method" not in json.loads(JsonFormatter().format(record()))


def test_a_json_entry_is_one_line_whatever_the_message_holds():
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        failed = record("bad \ud800 input\n%s", "next", exc_info=sys.exc_info())
    text = JsonFormatter().format(failed)
    assert "\n" not in text and text.isascii()
    entry = json.loads(text)
    assert entry["message"] == "bad \ud800 input\nnext" and "ValueError: line one" in entry["exception"]


def test_text_lines_show_the_request_id_only_inside_a_request():
    token = REQUEST_ID.set("req-3")
    try:
        inside = TextFormatter().format(record())
    finally:
        REQUEST_ID.reset(token)
    assert inside.endswith("INFO server.test [req-3]: hello world")
    assert TextFormatter().format(record()).endswith("INFO server.test: hello world")


def test_libraries_are_quiet_at_info_and_heard_at_debug():
    quiet, verbose = log_config("info", "text")["loggers"], log_config("debug", "json")["loggers"]
    assert quiet["alembic"]["level"] == logging.WARNING and verbose["alembic"]["level"] == logging.DEBUG
    assert quiet["uvicorn.access"] == {"handlers": [], "propagate": False}
    assert quiet["uvicorn"]["handlers"] == [] and quiet["uvicorn"]["propagate"] is True


def test_a_real_server_writes_only_json_lines_with_request_ids_and_no_library_noise(standins, tmp_path: Path):
    generator, classifier = standins
    port, log_path = free_port(), tmp_path / "server.log"
    env = {
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
        "RECORD_SPILL_DIR": str(tmp_path / "spill"),
        "TORCH_NUM_THREADS": "1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }
    command = [sys.executable, "-m", "server", "serve", "--port", str(port)]
    with server_process(command, env, port, log_path) as (url, _):
        kept = httpx.post(f"{url}/predict", json={"text": "fine"}, headers={"X-Request-ID": "client-id.42_a-b"})
        replaced = httpx.post(
            f"{url}/generate",
            json={"prompts": ["hi"], "max_new_tokens": 2},
            headers={"X-Request-ID": "no spaces allowed"},
        )
        generated = httpx.get(f"{url}/history")
    assert kept.headers["x-request-id"] == "client-id.42_a-b"
    assert replaced.headers["x-request-id"] != "no spaces allowed"
    assert len(replaced.headers["x-request-id"]) == 32 and len(generated.headers["x-request-id"]) == 32
    assert replaced.headers["x-request-id"] != generated.headers["x-request-id"]

    lines = log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message", "request_id"} <= entry.keys() for entry in entries)
    access = {entry["request_id"]: entry for entry in entries if entry["logger"] == "server.access"}
    predicted = access["client-id.42_a-b"]
    assert (predicted["method"], predicted["route"], predicted["status"]) == ("POST", "/predict", 200)
    assert predicted["duration_ms"] > 0 and predicted["message"].startswith("POST /predict 200")
    assert access[replaced.headers["x-request-id"]]["route"] == "/generate"
    assert access[generated.headers["x-request-id"]]["route"] == "/history"
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)
    assert not [entry for entry in entries if entry["logger"].startswith(("alembic", "uvicorn.access"))]
    assert not [line for line in lines if "Loading weights" in line or "it/s]" in line or not line.strip()]
    assert any(entry["message"].startswith("database migrated to") for entry in entries)


def test_a_first_start_that_builds_the_offline_stand_ins_writes_no_blank_lines(tmp_path: Path):
    port, log_path = free_port(), tmp_path / "server.log"
    env = {
        "MODELS_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_SOURCE": "auto",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
        "RECORD_SPILL_DIR": str(tmp_path / "spill"),
        "TORCH_NUM_THREADS": "1",
        "LOG_LEVEL": "info",
    }
    with server_process([sys.executable, "-m", "server", "serve", "--port", str(port)], env, port, log_path):
        pass
    lines = log_path.read_text().splitlines()
    assert any("OFFLINE STAND-IN" in line for line in lines)
    assert [line for line in lines if not line.strip()] == []
