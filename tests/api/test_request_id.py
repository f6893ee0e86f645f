import logging
import re

import httpx
import pytest

from server.core.logging import RequestIdFilter
from server.main import create_app

GENERATED = re.compile(r"[0-9a-f]{32}")


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected(caplog: pytest.LogCaptureFixture):
    """Every record written, stamped by the same filter as the server's handler."""
    caplog.set_level(logging.INFO)
    handler = Collected()
    logging.getLogger().addHandler(handler)
    yield handler.records
    logging.getLogger().removeHandler(handler)


async def test_a_well_formed_client_id_is_echoed_and_stamps_the_access_line(app_client, collected):
    response = await app_client.post("/predict", json={"text": "nice"}, headers={"X-Request-ID": "trace.1_A-b"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace.1_A-b"
    [access] = [r for r in collected if r.name == "server.access" and r.request_id == "trace.1_A-b"]
    assert (access.method, access.route, access.status) == ("POST", "/predict", 200) and access.duration_ms > 0


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "", "semi;colon", "é"])
async def test_a_malformed_id_is_replaced_not_echoed(app_client, sent):
    response = await app_client.get("/", headers={"X-Request-ID": sent.encode("utf-8")})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


async def test_each_request_without_an_id_gets_a_new_one(app_client):
    ids = {(await app_client.get("/health")).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(GENERATED.fullmatch(i) for i in ids)


async def test_lines_written_inside_a_request_carry_its_id_and_others_none(app_client, collected):
    logging.getLogger("server.test").info("outside")
    await app_client.get("/history", headers={"X-Request-ID": "inside-1"})
    by_message = {r.getMessage(): r.request_id for r in collected}
    assert by_message["outside"] is None
    assert [r.route for r in collected if r.request_id == "inside-1" and r.name == "server.access"] == ["/history"]


async def test_routes_answered_outside_fastapis_routes_are_labelled_by_their_template(settings, collected):
    # /openapi.json is a plain Starlette route, and a 429 is answered before routing: neither is `unmatched`.
    app = create_app(settings.model_copy(update={"ingress_rate_limit": "1/minute"}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        await client.get("/openapi.json", headers={"X-Request-ID": "spec"})
        await client.get("/history/abc", headers={"X-Request-ID": "first"})
        limited = await client.get("/history/abc", headers={"X-Request-ID": "limited"})
        await client.get("/no/such/path", headers={"X-Request-ID": "nowhere"})
    assert limited.status_code == 429
    routes = {r.request_id: r.route for r in collected if r.name == "server.access"}
    assert (routes["spec"], routes["limited"], routes["nowhere"]) == (
        "/openapi.json",
        "/history/{record_id}",
        "unmatched",
    )


async def test_refusals_by_the_outer_middlewares_carry_an_id_too(settings):
    app = create_app(settings.model_copy(update={"api_keys": "k", "ingress_rate_limit": "1/minute"}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        statuses = [await client.get("/history", headers={"X-Request-ID": "r0"})]
        statuses += [
            (await client.get("/history", headers={"X-Request-ID": f"r{n}", "Authorization": "Bearer k"}))
            for n in (1, 2)
        ]
    assert [(r.status_code, r.headers["x-request-id"]) for r in statuses] == [(401, "r0"), (200, "r1"), (429, "r2")]


async def test_an_unexpected_error_answers_json_500_with_the_request_id(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):

        async def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        app.state.runtime.generation.generate = broken
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/generate", json={"prompts": ["x"]}, headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500 and response.json() == {"detail": "internal server error"}
    assert response.headers["x-request-id"] == "trace-500"
