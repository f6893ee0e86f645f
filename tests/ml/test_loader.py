import socket
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from server.ml import loader
from server.ml.generator import TextGenerator
from server.ml.loader import ModelUnavailable, locate


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the hub at a local port where nothing listens: a real refused connection, no internet."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def test_a_directory_is_used_as_is_and_stand_ins_say_so(standins):
    location = locate(str(standins[0]), "generator", "local", Path("/nonexistent"))
    assert location.path == str(standins[0]) and location.standin
    assert location.name == "offline-stand-in:gpt2"


def test_local_mode_never_downloads_and_says_how_to_fix(tmp_path, unreachable_hub):
    with pytest.raises(ModelUnavailable, match="models fetch"):
        locate("gpt2", "generator", "local", tmp_path)


def test_hub_mode_fails_clearly_when_the_hub_is_unreachable(tmp_path, unreachable_hub):
    with pytest.raises(ModelUnavailable, match="cannot be reached"):
        locate("gpt2", "generator", "hub", tmp_path)


def test_auto_mode_builds_stand_ins_once_and_warns_at_every_start(tmp_path, unreachable_hub, caplog):
    first = locate("gpt2", "generator", "auto", tmp_path)
    assert first.standin and first.path == str(tmp_path / "offline" / "generator")
    assert first.name == "offline-stand-in:gpt2"
    assert "OFFLINE STAND-IN" in caplog.text
    weights = tmp_path / "offline" / "generator" / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    caplog.clear()
    again = locate("gpt2", "generator", "auto", tmp_path)
    assert again == first and weights.stat().st_mtime_ns == built_at
    assert "OFFLINE STAND-IN" in caplog.text
    assert TextGenerator.load(again, str(tmp_path)).name == "offline-stand-in:gpt2"


def test_hub_cache_is_used_without_the_network(tmp_path, unreachable_hub):
    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    location = locate("org/model", "classifier", "local", tmp_path)
    assert location.local_files_only and location.path == "org/model" and not location.standin


def test_revision_changes_when_the_weights_change(tmp_path, standins):
    import shutil

    copy = Path(shutil.copytree(standins[0], tmp_path / "copy"))
    location = locate(str(copy), "generator", "local", tmp_path)
    before = loader.weights_revision(object(), location)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes() + b"\0")
    assert loader.weights_revision(object(), location) != before
