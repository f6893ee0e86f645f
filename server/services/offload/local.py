"""The `local` batch provider: items of local jobs computed by our own models when they are otherwise idle.

Items go through the same services as /generate and /predict (cache included) with `background=True`: the
micro-batcher dispatches them only when no interactive item waits, in small batches, so an interactive
request waits behind at most one small background batch. The runner keeps `concurrency` items in flight,
enough to fill a background batch without flooding the queue. It runs in the process holding the worker
lease; an item is claimed by compare-and-set (queued -> submitted) and its result stored only if it is still
claimed, so a result is never stored twice. Items a dead holder had claimed are queued again when the lease
is taken, and an item left claimed by a runner that failed (its result could not be stored, or the runner
was restarted by its supervisor) is queued again once it has not moved for `requeue_s`. Each finished item
wakes the worker, so a job whose items are all done is finished at once, not at the next poll.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.core.aio import wait_event
from server.core.provider_names import LOCAL
from server.db.batch_models import BatchItem, BatchJob
from server.db.session import affected
from server.services.errors import DeadlineExceeded, InputError, ModelFailed, Overloaded
from server.services.offload.jobs import IN_FLIGHT_STATUSES, JobStore, after_attempt, move_items
from server.services.serving.generation import GenerationOptions, GenerationService
from server.services.serving.sentiment import SentimentService

log = logging.getLogger(__name__)
RETRYABLE = (Overloaded, DeadlineExceeded, ModelFailed)


def generation_options(body: dict) -> GenerationOptions:
    return GenerationOptions(
        max_new_tokens=body.get("max_tokens", body.get("max_new_tokens")),
        max_length=body.get("max_length"),
        temperature=float(body.get("temperature", 0.0)),
        top_p=float(body.get("top_p", 1.0)),
        seed=body.get("seed"),
    )


class LocalRunner:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        jobs: JobStore,
        generation: GenerationService,
        sentiment: SentimentService,
        *,
        concurrency: int,
        max_attempts: int,
        holds_lease: Callable[[], bool],
        item_done: Callable[[], None],
        requeue_s: float,
        idle_poll_s: float = 1.0,
    ):
        self.sessions = sessions
        self.jobs = jobs
        self.generation = generation
        self.sentiment = sentiment
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.holds_lease = holds_lease
        self.item_done = item_done
        self.idle_poll_s = idle_poll_s
        self.requeue_s = requeue_s
        self._next_sweep = 0.0
        self._claimed: set[str] = set()
        self._running: set[asyncio.Task] = set()
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def run_forever(self) -> None:
        held = False
        try:
            while True:
                self._wakeup.clear()
                if self.holds_lease() and not held:
                    await self.requeue_orphans()
                held = self.holds_lease()
                if held and time.monotonic() >= self._next_sweep:
                    await self.requeue_stale()
                    self._next_sweep = time.monotonic() + self.requeue_s / 4
                started = await self.run_available() if held else 0
                if not started:
                    await wait_event(self._wakeup, self.idle_poll_s)
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def requeue_orphans(self) -> int:
        """Queue again the local items a previous lease holder had claimed and not finished."""
        local_jobs = select(BatchJob.id).where(BatchJob.provider == LOCAL)
        async with self.sessions() as session, session.begin():
            moved = await session.execute(
                move_items(
                    BatchItem.job_id.in_(local_jobs),
                    BatchItem.status == "submitted",
                    to="queued",
                    attempts=BatchItem.attempts - 1,
                )
            )
        return affected(moved)

    async def requeue_stale(self) -> int:
        """Queue again the local items claimed more than `requeue_s` ago that this runner is not computing."""
        local_jobs = select(BatchJob.id).where(BatchJob.provider == LOCAL)
        now = clock.now()
        async with self.sessions() as session, session.begin():
            moved = await session.execute(
                move_items(
                    BatchItem.job_id.in_(local_jobs),
                    BatchItem.status == "submitted",
                    BatchItem.updated_at < now - timedelta(seconds=self.requeue_s),
                    BatchItem.id.not_in(list(self._claimed)),
                    to="queued",
                )
            )
        count = affected(moved)
        if count:
            log.warning("%d local batch items left claimed for over %g s were queued again", count, self.requeue_s)
        return count

    async def run_available(self) -> int:
        """Start as many waiting items as there is room for; returns how many were started."""
        room = self.concurrency - len(self._running)
        if room <= 0:
            return 0
        query = (
            select(BatchItem, BatchJob.kind, BatchJob.id)
            .join(BatchJob, BatchJob.id == BatchItem.job_id)
            .where(
                BatchJob.provider == LOCAL,
                BatchJob.status.in_(IN_FLIGHT_STATUSES),
                BatchJob.cancel_requested.is_(False),
                BatchItem.status == "queued",
            )
            .order_by(BatchJob.priority.desc(), BatchJob.created_at, BatchItem.custom_id)
            .limit(room)
        )
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        started = 0
        for item, kind, job_id in rows:
            if await self._claim(item.id):
                self._claimed.add(item.id)
                started += 1
                await self.jobs.transition(job_id, ["submitted"], "in_progress")
                task = asyncio.create_task(self._run(item, kind))
                self._running.add(task)
                task.add_done_callback(self._finished)

                def unclaim(_: asyncio.Task, item_id: str = item.id) -> None:
                    self._claimed.discard(item_id)

                task.add_done_callback(unclaim)
        return started

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._wakeup.set()
        self.item_done()

    async def wait_idle(self) -> None:
        """Until the items started so far are done (for run-once and tests)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def _claim(self, item_id: str) -> bool:
        async with self.sessions() as session, session.begin():
            claimed = await session.execute(
                move_items(
                    BatchItem.id == item_id,
                    BatchItem.status == "queued",
                    to="submitted",
                    attempts=BatchItem.attempts + 1,
                )
            )
        return affected(claimed) == 1

    async def _compute(self, body: dict, kind: str, tenant: str) -> tuple[dict, int, int]:
        if kind == "generate":
            [result] = await self.generation.generate(
                [body["prompt"]], generation_options(body), tenant=tenant, background=True
            )
            return (
                {"text": result.completion, "finish_reason": result.finish_reason},
                result.prompt_tokens,
                result.completion_tokens,
            )
        [prediction] = await self.sentiment.predict([body["text"]], tenant=tenant, background=True)
        return {"label": prediction.label, "score": prediction.score}, 0, 0

    async def _run(self, item: BatchItem, kind: str) -> None:
        values: dict
        retryable = False
        try:
            output, input_tokens, output_tokens = await self._compute(item.body, kind, item.tenant)
            outcome = "succeeded"
            values = {"output": output, "error": None, "input_tokens": input_tokens, "output_tokens": output_tokens}
        except asyncio.CancelledError:
            raise
        except (InputError, KeyError, TypeError, ValueError) as exc:
            outcome, values = "failed", {"error": f"invalid request: {exc}"}
        except RETRYABLE as exc:
            outcome, values, retryable = "failed", {"error": str(exc)}, True
        except Exception as exc:
            log.exception("local batch item %s failed", item.id)
            outcome, values = "failed", {"error": f"{type(exc).__name__}: {exc}"}
        # `item` was read before its claim counted this attempt.
        status = after_attempt(
            outcome,
            attempts=item.attempts + 1,
            max_attempts=self.max_attempts,
            retryable=retryable,
            cancel_requested=False,
        )
        try:
            async with self.sessions() as session, session.begin():
                await session.execute(
                    move_items(BatchItem.id == item.id, BatchItem.status == "submitted", to=status, **values)
                )
        except Exception:
            log.exception(
                "storing the result of local batch item %s failed; it is queued again after %g s",
                item.id,
                self.requeue_s,
            )
