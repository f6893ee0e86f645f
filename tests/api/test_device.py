"""`/` and `/health` say where each model runs and how much of the device's memory is in use and free; a device
the machine lacks stops the start in one line."""

import os
import subprocess
import sys

import pytest
import torch

from server.core.config import PROJECT_ROOT
from server.ml.device import DeviceRefused
from tests.support.app import serving


async def test_root_and_health_report_the_cpu_and_its_memory(app_client):
    root = (await app_client.get("/")).json()
    health = (await app_client.get("/health")).json()["checks"]
    for models in (root["models"], health["models"]["detail"]):
        assert {role: (m["device"], m["dtype"]) for role, m in models.items()} == {
            "generator": ("cpu", "float32"),
            "sentiment": ("cpu", "float32"),
        }
    for devices in (root["devices"], health["devices"]["detail"]):
        assert list(devices) == ["cpu"]
        cpu = devices["cpu"]
        assert cpu["device"] == "cpu" and 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]
        assert cpu["memory_used_bytes"] + cpu["memory_free_bytes"] == cpu["memory_total_bytes"]
    assert health["devices"]["status"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
async def test_a_gpu_setting_on_a_machine_without_one_stops_the_start(settings):
    with pytest.raises(DeviceRefused, match="^DEVICE=cuda but this torch"):
        async with serving(settings.model_copy(update={"device": "cuda"})):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_serve_refuses_a_gpu_it_lacks_in_one_line_before_listening(tmp_path):
    env = {**os.environ, "DEVICE": "cuda", "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"}
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "1"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("DEVICE=cuda but this torch") and line.endswith("or set DEVICE=cpu")
