"""Two server processes sharing Redis: 50 concurrent identical report requests make one Gemini call."""

import asyncio
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

from server.bench.run import server_process
from tests.fakes import FakeGemini
from tests.support.servers import RedisServer, free_port


async def test_fifty_concurrent_reports_over_two_processes_make_one_gemini_call(
    standins, redis_server: RedisServer, tmp_path: Path
):
    generator, classifier = standins
    with FakeGemini().serve() as fake, ExitStack() as stack:
        fake.settings.generate_hangs, fake.settings.hang_s = 1, 1.0  # the call is in flight while the others arrive
        urls = []
        for name in ("a", "b"):
            port = free_port()
            env = {
                "GENERATOR_MODEL": str(generator),
                "SENTIMENT_MODEL": str(classifier),
                "MODEL_SOURCE": "local",
                "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / name}.db",
                "REDIS_URL": redis_server.url,
                "TORCH_NUM_THREADS": "1",
                "LOG_LEVEL": "warning",
                "INGRESS_RATE_LIMIT": "off",
                "BATCH_WORKER": "off",
                "GEMINI_API_KEY": "k",
                "GEMINI_BASE_URL": fake.base_url,
            }
            url, _ = stack.enter_context(
                server_process(
                    [sys.executable, "-m", "server", "serve", "--port", str(port)], env, port, tmp_path / f"{name}.log"
                )
            )
            urls.append(url)
        body = {"start": "2026-11-24T10:00:00Z", "end": "2026-11-24T11:00:00Z", "focus": "errors"}
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
            answers = await asyncio.gather(
                *(client.post(f"{urls[i % 2]}/analyze/performance", json=body) for i in range(50))
            )
    assert [a.status_code for a in answers] == [200] * 50
    assert {a.json()["source"] for a in answers} == {"gemini"}
    assert len({a.json()["generated_at"] for a in answers}) == 1
    assert sum(not a.json()["cached"] for a in answers) == 1
    assert len(fake.calls("POST", r"/v1beta/models/[^/]+:generateContent")) == 1
