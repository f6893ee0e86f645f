"""The Batch API service: model routing, the status mapping, input file checks, and a 20,000-line batch whose
checking, storing and output writing stay within a memory bound."""

import asyncio
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import update

from server.core.clock import now
from server.core.tenants import OPEN
from server.db.batch_models import BatchItem, BatchJob, OpenAIBatch
from server.services.offload.files import read_lines
from server.services.offload.openai_batches import ModelRoutes, Route, check_file, openai_status
from server.services.offload.registry import ProviderRegistry
from tests.support.app import serving

ROUTES = ModelRoutes.parse("gpt-*=openai,claude-*=anthropic,my-model=gemini")
LOCAL = frozenset({"gpt2", "offline-stand-in:gpt2"})
REGISTRY = ProviderRegistry(frozenset({"local", "openai", "anthropic"}))


def test_routes_pick_the_served_model_then_provider_prefixes_then_the_table():
    assert ROUTES.route("gpt2", LOCAL) == Route("local", "gpt2")
    assert ROUTES.route("gpt-4o-mini", LOCAL) == Route("openai", "gpt-4o-mini")
    assert ROUTES.route("claude-haiku-4-5", LOCAL) == Route("anthropic", "claude-haiku-4-5")
    assert ROUTES.route("my-model", LOCAL) == Route("gemini", "my-model")
    assert ROUTES.route("my-model-2", LOCAL) is None
    assert ROUTES.route("anthropic/special", LOCAL) == Route("anthropic", "special")
    assert ROUTES.route("llama-3", LOCAL) is None
    with pytest.raises(ValueError, match="pattern=provider"):
        ModelRoutes.parse("gpt-*=local")
    with pytest.raises(ValueError, match="pattern=provider"):
        ModelRoutes.parse("gpt-*")


@pytest.mark.parametrize(
    ("status", "cancel", "finalized", "errors", "expected"),
    [
        ("queued", False, False, None, "validating"),
        ("in_progress", False, False, None, "in_progress"),
        ("submitted", True, False, None, "cancelling"),
        ("completed", False, False, None, "finalizing"),
        ("completed", False, True, None, "completed"),
        ("partially_completed", False, True, None, "completed"),
        ("failed", False, True, None, "completed"),
        ("cancelled", True, False, None, "cancelling"),
        ("cancelled", True, True, None, "cancelled"),
        ("expired", False, True, None, "expired"),
        ("failed", False, False, [{"code": "invalid_json_line"}], "failed"),
    ],
)
def test_job_statuses_map_to_openai_statuses(status, cancel, finalized, errors, expected):
    job = BatchJob(status=status, cancel_requested=cancel)
    batch = OpenAIBatch(errors=errors, finalized_at=now() if finalized else None)
    assert openai_status(job, batch) == expected


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def line(custom_id: str, model: str = "gpt-4o-mini", url: str = "/v1/chat/completions", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
    }


def test_a_clean_file_is_routed_and_counted(tmp_path):
    plan = check_file(
        write(tmp_path / "in.jsonl", [line("a"), "", line("b")]), "/v1/chat/completions", LOCAL, ROUTES, REGISTRY
    )
    assert (plan.errors, plan.route, plan.lines) == ([], Route("openai", "gpt-4o-mini"), 2)


def test_each_bad_line_is_named(tmp_path):
    lines = [
        line("a"),
        "[1]",
        line("a"),
        line("b", url="/v1/embeddings"),
        {**line("c"), "method": "GET"},
        line("d", model="claude-x"),
        line("e", temperature=9),
        line("bad id!"),
        {"custom_id": "f"},
    ]
    plan = check_file(write(tmp_path / "in.jsonl", lines), "/v1/chat/completions", LOCAL, ROUTES, REGISTRY)
    assert [(e["line"], e["code"]) for e in plan.errors] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_endpoint"),
        (5, "invalid_method"),
        (6, "mismatched_model"),
        (7, "invalid_request"),
        (8, "invalid_custom_id"),
        (9, "invalid_method"),
        (9, "mismatched_endpoint"),
        (9, "missing_required_parameter"),
    ]
    assert plan.errors[5]["param"] == "body.temperature"


def test_unroutable_models_unsupported_endpoints_and_empty_files_fail(tmp_path):
    path = tmp_path / "in.jsonl"
    unknown = check_file(write(path, [line("a", model="llama")]), "/v1/chat/completions", LOCAL, ROUTES, REGISTRY)
    assert [e["code"] for e in unknown.errors] == ["model_not_found"]
    # The served generator has no chat template: chat for it is refused, as are embeddings by Anthropic.
    local_chat = check_file(write(path, [line("a", model="gpt2")]), "/v1/chat/completions", LOCAL, ROUTES, REGISTRY)
    assert [e["code"] for e in local_chat.errors] == ["unsupported_endpoint"]
    embedding = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "claude-x", "input": "hi"},
    }
    refused = check_file(write(path, [embedding]), "/v1/embeddings", LOCAL, ROUTES, REGISTRY)
    assert [e["code"] for e in refused.errors] == ["unsupported_endpoint"]
    unconfigured = check_file(
        write(path, [line("a", model="my-model")]), "/v1/chat/completions", LOCAL, ROUTES, REGISTRY
    )
    assert "GEMINI_API_KEY" in unconfigured.errors[0]["message"]
    empty = check_file(write(path, ["", ""]), "/v1/chat/completions", LOCAL, ROUTES, REGISTRY)
    assert [(e["line"], e["code"]) for e in empty.errors] == [(None, "empty_file")]


def test_a_completion_line_is_checked_with_openais_defaults(tmp_path):
    completion = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "gpt2", "prompt": "hi", "echo": True},
    }
    plan = check_file(write(tmp_path / "in.jsonl", [completion]), "/v1/completions", LOCAL, ROUTES, REGISTRY)
    assert [(e["code"], e["param"]) for e in plan.errors] == [("invalid_request", "body.echo")]


def rss_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


LINES = 20_000
PROMPT = "The quick brown fox jumps over the lazy dog. " * 10
# Holding the 20,000 lines (about 10 MB of JSON) as parsed dicts and ORM rows at once takes well over 100 MB; the
# chunked check, insert and output writing grew it by about 10 MiB when measured.
RSS_GROWTH_BOUND_MIB = 40


async def test_a_20000_line_batch_is_checked_stored_and_written_in_bounded_memory(settings, tmp_path):
    """The file path at full size: check, insert, output file. The generation itself is not run here (20,000 items
    through the tiny model take minutes on 2 cores; tests/api/test_openai_batches.py runs it): the items are given
    their results in the database, as the local runner stores them."""
    source = tmp_path / "big.jsonl"
    write(
        source,
        [
            {
                "custom_id": f"line-{i:05d}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "gpt2", "prompt": f"{i} {PROMPT}", "max_tokens": 1, "temperature": 0},
            }
            for i in range(LINES)
        ],
    )
    async with serving(settings.model_copy(update={"batch_worker": "off", "files_dir": tmp_path / "files"})) as client:
        batches = client.app.state.runtime.openai_batches

        async def chunks():
            for chunk in read_lines(source):
                yield chunk

        stored = await batches.files.create(OPEN.tenant, "big.jsonl", "batch", chunks())
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
        before = rss_kib("VmRSS")
        view = await batches.create(OPEN, stored.id, "/v1/completions", None)
        assert view.counts.total == LINES and view.status == "validating"
        async with batches.sessions() as session, session.begin():
            await session.execute(
                update(BatchItem)
                .where(BatchItem.job_id == view.job.id)
                .values(
                    status="succeeded",
                    output={"text": " x", "finish_reason": "length"},
                    input_tokens=12,
                    output_tokens=1,
                    completed_at=now(),
                )
            )
        assert await batches.offload.jobs.transition(view.job.id, ["queued"], "completed", completed_at=now())
        done = await batches.get(view.job.id, None)
        growth_mib = (rss_kib("VmHWM") - before) / 1024
        assert done.status == "completed" and done.batch.error_file_id is None
        assert growth_mib < RSS_GROWTH_BOUND_MIB, f"peak RSS grew {growth_mib:.0f} MiB"
        seen = set()
        for raw in await asyncio.to_thread(lambda: list(read_lines(batches.files.path(done.batch.output_file_id)))):
            result = json.loads(raw)
            assert result["response"]["body"]["choices"][0]["text"] == " x"
            seen.add(result["custom_id"])
        assert seen == {f"line-{i:05d}" for i in range(LINES)}


async def test_a_batch_whose_items_cannot_all_be_stored_leaves_no_job(settings, tmp_path, monkeypatch):
    source = write(
        tmp_path / "in.jsonl",
        [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "gpt2", "prompt": "hi"},
            }
            for i in range(3)
        ],
    )

    async def cut_short(path, batch):
        yield [(1, source.read_bytes().splitlines()[0])]
        raise OSError("disk gone")

    async with serving(settings.model_copy(update={"batch_worker": "off", "files_dir": tmp_path / "files"})) as client:
        batches = client.app.state.runtime.openai_batches

        async def chunks():
            yield source.read_bytes()

        stored = await batches.files.create(OPEN.tenant, "in.jsonl", "batch", chunks())
        monkeypatch.setattr("server.services.offload.openai_batches.aiter_lines", cut_short)
        with pytest.raises(OSError, match="disk gone"):
            await batches.create(OPEN, stored.id, "/v1/completions", None)
        assert (await batches.offload.jobs.list_jobs(tenant=None))[0] == []
