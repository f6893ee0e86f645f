"""Signed webhook calls: a job's `webhook_url` when it finishes, and `ALERT_WEBHOOK_URL` when an alert starts.

The body is JSON; `X-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact body bytes with
`BATCH_WEBHOOK_SECRET` (absent when no secret is set), so a receiver can check the sender and the content.
Delivery runs in a background task, never blocking the worker, and is retried with exponential backoff;
a job's delivery state is stored (`webhook_state`: pending, delivered, failed). A delivery task that fails
unexpectedly (say, the database is down when its outcome is stored) is logged with its traceback and counted
(`background_task_failures_total{task="webhook-sender"}`), the sender reads `restarting` in `/batch/health` until
the job's webhook is delivered again: the worker resumes every pending delivery at each tick, so a delivery that a
crash or a restart interrupted is made again. Delivery is therefore at least once: receivers tell repeats apart by
`job_id`. Every send goes through the destination policy
(`server/core/destinations.py`): to a checked public address, never following a redirect; a refused destination
or a redirect is a failure at once (retrying would change nothing). Logs show the URL's scheme and host only.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Coroutine

import httpx
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock, metrics
from server.core.destinations import DestinationPolicy, RefusedDestination, public_form
from server.db.batch_models import BatchJob

log = logging.getLogger(__name__)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def job_summary(job: BatchJob) -> dict:
    return {
        "event": "batch.job.finished",
        "job_id": job.id,
        "name": job.name,
        "provider": job.provider,
        "model": job.model,
        "job_type": job.job_type,
        "status": job.status,
        "usage": {"input_tokens": job.input_tokens, "output_tokens": job.output_tokens},
        "cost_usd": job.cost_usd,
        "realtime_cost_usd": job.realtime_cost_usd,
        "savings_usd": job.savings_usd,
        "completed_at": job.completed_at.isoformat() if job.completed_at else None,
        "metadata": job.job_metadata,
    }


class Webhooks:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        secret: str | None,
        destinations: DestinationPolicy,
        attempts: int = 6,
        backoff_s: float = 2.0,
        timeout_s: float = 10.0,
    ):
        self.sessions = sessions
        self.secret = secret
        self.destinations = destinations
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._tasks: dict[str, asyncio.Task] = {}
        # Job ids whose delivery task failed unexpectedly and waits to be resumed.
        self._crashed: set[str] = set()
        self.failures = 0
        self.last_error: str | None = None

    async def post(self, url: str, payload: dict) -> bool:
        """POST `payload` to `url` with retries; True once a 2xx answer came back."""
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        headers = {"content-type": "application/json"}
        if self.secret:
            headers["x-signature"] = signature(self.secret, body)
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            for attempt in range(self.attempts):
                try:
                    answer = await self._send(client, url, body, headers)
                    if answer.is_success:
                        return True
                    problem = f"HTTP {answer.status_code}"
                    if answer.is_redirect:
                        log.warning(
                            "webhook to %s answered a redirect (%s), which is never followed", public_form(url), problem
                        )
                        return False
                except RefusedDestination as exc:
                    log.warning("webhook to %s refused: %s", public_form(url), exc)
                    return False
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
                if attempt + 1 < self.attempts:
                    await asyncio.sleep(self.backoff_s * 2**attempt)
        log.warning("webhook to %s failed after %d attempts (%s)", public_form(url), self.attempts, problem)
        return False

    async def _send(self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """One POST to the address the policy checked, with the URL's own host as Host header and TLS name."""
        target = await self.destinations.resolve(url)
        original = httpx.URL(url)
        return await client.post(
            original.copy_with(host=target.address),
            content=body,
            headers={**headers, "host": original.netloc.decode("ascii")},
            extensions={"sni_hostname": target.host},
        )

    def _spawn(self, key: str, work: Coroutine, *, resumable: bool) -> None:
        """Run `work` in the background; `resumable`: a job's delivery, which `resume` makes again if it fails."""
        task = asyncio.create_task(work)
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._ended(key, task, resumable))

    def _ended(self, key: str, task: asyncio.Task, resumable: bool) -> None:
        self._tasks.pop(key, None)
        if task.cancelled() or (exc := task.exception()) is None:
            self._crashed.discard(key)
            return
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        metrics.BACKGROUND_TASK_FAILURES.labels("webhook-sender").inc()
        log.error(
            "background task webhook-sender failed%s",
            "; the delivery is made again at the worker's next tick" if resumable else "",
            exc_info=exc,
        )
        if resumable:
            self._crashed.add(key)

    def status(self) -> dict:
        """As a supervised loop's (`Supervisor.status`): `restarting` while a failed delivery waits to be resumed."""
        return {
            "state": "restarting" if self._crashed else "running",
            "failures": self.failures,
            "last_error": self.last_error,
        }

    def post_later(self, url: str, payload: dict) -> None:
        """`post` in the background."""
        self._spawn(uuid.uuid4().hex, self.post(url, payload), resumable=False)

    def job_finished(self, job: BatchJob) -> None:
        """Deliver the job's webhook in the background (no-op without a webhook_url, or if already under way)."""
        if job.webhook_url and job.id not in self._tasks:
            self._spawn(job.id, self._deliver(job, job.webhook_url), resumable=True)

    async def _deliver(self, job: BatchJob, url: str) -> None:
        delivered = await self.post(url, job_summary(job))
        await self._state(job.id, "delivered" if delivered else "failed")

    async def _state(self, job_id: str, state: str) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(BatchJob).where(BatchJob.id == job_id).values(webhook_state=state, updated_at=clock.now())
            )

    async def resume(self) -> None:
        """Deliver again what is pending and not under way here: left by a previous process, or by a failed task."""
        async with self.sessions() as session:
            pending = (await session.scalars(select(BatchJob).where(BatchJob.webhook_state == "pending"))).all()
        for job in pending:
            self.job_finished(job)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
