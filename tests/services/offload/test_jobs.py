"""The state machine of jobs and items (jobs.py): compare-and-set moves, and what an attempt leaves an item in."""

import pytest
from sqlalchemy import select

from server.db.batch_models import BatchItem
from server.db.session import affected
from server.services.offload.jobs import JobSpec, JobStore, NewItem, after_attempt, move_items


@pytest.mark.parametrize(
    ("outcome", "attempts", "retryable", "cancel_requested", "status"),
    [
        ("succeeded", 1, True, False, "succeeded"),
        ("succeeded", 3, False, True, "succeeded"),
        ("failed", 1, True, False, "queued"),
        ("failed", 3, True, False, "failed"),
        ("failed", 1, False, False, "failed"),
        ("expired", 1, True, False, "queued"),
        ("expired", 1, True, True, "cancelled"),
        ("cancelled", 1, False, False, "cancelled"),
    ],
)
def test_an_attempt_leaves_an_item_retried_only_while_it_may_be_cured(
    outcome, attempts, retryable, cancel_requested, status
):
    assert (
        after_attempt(
            outcome, attempts=attempts, max_attempts=3, retryable=retryable, cancel_requested=cancel_requested
        )
        == status
    )


async def test_items_move_by_compare_and_set_and_only_final_moves_complete_them(sessions):
    jobs = JobStore(sessions)
    job = await jobs.create(
        JobSpec("j", "local", "gpt2", "generate"), [NewItem("a", {"prompt": "x"}), NewItem("b", {"prompt": "y"})]
    )
    queued = (BatchItem.job_id == job.id, BatchItem.status == "queued")
    async with sessions() as session, session.begin():
        assert affected(await session.execute(move_items(*queued, to="submitted"))) == 2
    async with sessions() as session, session.begin():
        # The items are no longer queued: a second claim moves nothing.
        assert affected(await session.execute(move_items(*queued, to="submitted"))) == 0
        submitted = (BatchItem.job_id == job.id, BatchItem.status == "submitted")
        await session.execute(move_items(*submitted, BatchItem.custom_id == "a", to="succeeded"))
        await session.execute(move_items(*submitted, BatchItem.custom_id == "b", to="queued", error="try again"))
    async with sessions() as session:
        items = {item.custom_id: item for item in (await session.scalars(select(BatchItem))).all()}
    assert items["a"].status == "succeeded" and items["a"].completed_at is not None
    assert items["b"].status == "queued" and items["b"].completed_at is None and items["b"].error == "try again"


async def test_a_job_moves_only_from_the_status_it_is_expected_in(sessions):
    jobs = JobStore(sessions)
    job = await jobs.create(JobSpec("j", "local", "gpt2", "generate"), [NewItem("a", {"prompt": "x"})])
    assert await jobs.transition(job.id, ["queued"], "submitted")
    assert not await jobs.transition(job.id, ["queued"], "submitted")
    assert await jobs.transition(job.id, ["submitted"], "in_progress")
    assert (await jobs.get(job.id)).status == "in_progress"
