"""Exactly once against the paid providers: a batch create whose outcome the client cannot know (the provider created
the batch, then its answer was lost: a gateway's 502, a cut connection, an answer slower than the client's timeout)
or that was refused with a Retry-After longer than the lease is never repeated blind. Every chunk ends with exactly
one provider batch, every item with one result, and the cost is booked once."""

import asyncio
import time

import httpx
import pytest
from sqlalchemy import select

from server.db.batch_models import ProviderBatch
from server.services.offload.pricing import PriceTable
from tests.api.test_batch_providers import FAKES, chat, serving
from tests.fakes import FakeAnthropic

FINAL = ("completed", "partially_completed", "failed", "cancelled", "expired")
FAULTS = ["502_after", "reset_after", "stall_after", "retry_after_long"]
ITEMS, PER_BATCH = 6, 3


async def run_until_final(client: httpx.AsyncClient, job_id: str, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await client.app.state.runtime.batch.run_once()
        job = (await client.get(f"/batch/jobs/{job_id}")).json()
        if job["status"] in FINAL:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job still {job['status']} after {seconds} s")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("provider", list(FAKES))
async def test_a_create_with_an_unknown_outcome_is_never_repeated_blind(settings, database_url, provider, fault):
    fake_class, model, _ = FAKES[provider]
    with fake_class().serve() as fake:
        fake.settings.create_faults = [fault]
        fake.settings.stall_s = 3.0
        # Longer than the lease and than a call may hold on: the create is left to a later tick.
        fake.settings.long_retry_after_s = 2.0
        async with serving(
            settings,
            database_url,
            provider,
            fake,
            batch_provider_timeout_s=1.0,
            batch_lease_ttl_s=1.0,
            **{f"batch_{provider}_max_requests": PER_BATCH},
        ) as client:
            client.app.state.runtime.batch.worker.calls.max_backoff_s = 0.5
            job = (
                await client.post(
                    "/batch/jobs",
                    json={
                        "name": "once",
                        "provider": provider,
                        "model": model,
                        "kind": "chat",
                        "schedule": "now",
                        "requests": [chat(f"q{i}") for i in range(ITEMS)],
                    },
                )
            ).json()
            done = await run_until_final(client, job["id"])
            assert done["status"] == "completed" and done["counts"]["succeeded"] == ITEMS
            responses = (await client.get(f"/batch/jobs/{job['id']}/responses")).json()["items"]
            assert sorted(r["custom_id"] for r in responses) == [f"q{i}" for i in range(ITEMS)]
            items = (await client.get(f"/batch/jobs/{job['id']}/requests")).json()["items"]
            assert [item["attempts"] for item in items] == [1] * ITEMS
            expected = PriceTable.load().cost(provider, model, ITEMS * 12, ITEMS * 7)
            assert done["usage"] == {"input_tokens": ITEMS * 12, "output_tokens": ITEMS * 7}
            assert done["cost_usd"] == pytest.approx(expected.cost_usd)
            assert (await client.get("/batch/stats")).json()["provider_batches"] == {"fetched": ITEMS // PER_BATCH}
    assert fake.settings.create_faults == [] and fake.batches_created == ITEMS // PER_BATCH


async def test_anthropic_waits_for_a_batch_it_cannot_identify_yet_instead_of_creating_another(settings, database_url):
    with FakeAnthropic().serve() as fake:
        fake.settings.create_faults = ["502_after"]
        fake.settings.polls_to_complete = 4
        async with serving(settings, database_url, "anthropic", fake, batch_anthropic_max_requests=PER_BATCH) as client:
            job = (
                await client.post(
                    "/batch/jobs",
                    json={
                        "name": "wait",
                        "provider": "anthropic",
                        "model": FAKES["anthropic"][1],
                        "kind": "chat",
                        "schedule": "now",
                        "requests": [chat(f"q{i}") for i in range(ITEMS)],
                    },
                )
            ).json()
            await client.app.state.runtime.batch.run_once()
            # The first chunk's batch exists, unrecorded and without results yet: it is not created again.
            assert fake.batches_created == ITEMS // PER_BATCH
            async with client.app.state.runtime.sessions() as session:
                notes = (
                    await session.scalars(
                        select(ProviderBatch.error).where(
                            ProviderBatch.job_id == job["id"], ProviderBatch.status == "submitting"
                        )
                    )
                ).all()
            assert len(notes) == 1 and notes[0].startswith("waiting to tell whether the provider holds it")
            done = await run_until_final(client, job["id"])
            assert done["status"] == "completed" and done["counts"]["succeeded"] == ITEMS
    assert fake.batches_created == ITEMS // PER_BATCH
