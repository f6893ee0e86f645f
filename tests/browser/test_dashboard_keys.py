"""`/dashboard` on a server with API keys, and with rate limits, egress quotas and the in-process batch worker off:
the page asks for the key once, keeps it for the tab, sends it only as a bearer token, says clearly when it is wrong,
and says which features are off."""

import pytest

from tests.browser.conftest import Server, Watched
from tests.browser.dashboard import wait_for_json_figures

KEY = "s3cret-dashboard-key"
KEY_STORAGE = "inference-server.dashboard.api-key"


USER_KEY = "s3cret-tenant-key"


@pytest.fixture(scope="module")
def server(serve) -> Server:
    """An operator's admin key, and an ordinary key of one tenant (so that a key is required)."""
    return serve(
        API_KEYS=USER_KEY, ADMIN_API_KEYS=KEY, INGRESS_RATE_LIMIT="off", EGRESS_RATE_LIMIT="", BATCH_WORKER="off"
    )


def enter_key(watched: Watched, key: str) -> None:
    watched.page.fill("#api-key", key)
    watched.page.click("#auth-form button[type='submit']")


def stored_key(watched: Watched) -> str | None:
    return watched.page.evaluate("name => sessionStorage.getItem(name)", KEY_STORAGE)


def test_the_page_asks_for_the_key_once_and_sends_it_as_a_bearer_token(server, watched):
    page = watched.page
    page.goto(f"{server.url}/dashboard")
    page.wait_for_selector("#auth:not([hidden])")
    assert page.get_attribute("#refresh-state", "data-state") == "key-needed"
    assert watched.api_requests() == []  # nothing asked without a key: no 401 to show
    enter_key(watched, KEY)
    page.wait_for_selector("#refresh-state[data-state='live']")
    assert page.is_hidden("#auth") and stored_key(watched) == KEY
    with server.client(KEY) as client:
        wait_for_json_figures(page, client, required={"serving.requests", "batch.jobs", "count.total"})
    page.reload()
    page.wait_for_selector("#refresh-state[data-state='live']")
    assert page.is_hidden("#auth")
    requests = watched.api_requests()
    assert requests and all(request.headers.get("authorization") == f"Bearer {KEY}" for request in requests)
    assert not any(KEY in request.url for request in watched.requests)
    watched.assert_clean()


def test_a_wrong_key_is_refused_with_a_clear_message(server, watched):
    page = watched.page
    page.goto(f"{server.url}/dashboard")
    enter_key(watched, "not-the-key")
    page.wait_for_selector("#auth-error:has-text('refused')")
    assert page.inner_text("#auth-error") == (
        "The server refused this key (401 Unauthorized). Check it and enter it again."
    )
    assert page.is_visible("#auth") and stored_key(watched) is None
    # One read tried the key: one refusal, not one per figure.
    assert watched.http_errors == [(401, "GET", f"{server.url}/metrics/thresholds")]
    enter_key(watched, KEY)
    page.wait_for_selector("#refresh-state[data-state='live']")
    assert page.is_hidden("#auth") and page.inner_text("#auth-error") == ""


def test_sections_whose_feature_is_off_say_so(server, watched):
    page = watched.page
    page.goto(f"{server.url}/dashboard")
    enter_key(watched, KEY)
    page.wait_for_selector("#refresh-state[data-state='live']")
    with server.client(KEY) as client:
        live = client.post(
            "/metrics/aggregated", json={"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}
        ).json()["live"]
        scheduler = client.get("/batch/scheduler").json()
    assert live["ingress"] == [] and live["egress"] == [] and scheduler["mode"] == "off"
    for note in ("#ingress-off", "#egress-off", "#batch-worker-off"):
        assert page.is_visible(note), note
    assert page.is_hidden("#ingress-table") and page.is_hidden("#egress-table")
    assert "Rate limiting is off" in page.inner_text("#ingress-off")
    assert "worker not running here" in page.inner_text("#batch-worker")
    watched.assert_clean()


def test_a_tenant_key_sees_its_own_figures_and_no_process_wide_ones(server, watched):
    page = watched.page
    page.goto(f"{server.url}/dashboard")
    enter_key(watched, USER_KEY)
    page.wait_for_selector("#refresh-state[data-state='live']")
    with server.client(USER_KEY) as client:
        wait_for_json_figures(page, client, required={"serving.requests", "batch.jobs", "count.total"})
    for note in page.query_selector_all(".admin-only"):
        assert note.is_visible()
    assert page.is_visible("#alerts-admin-only")
    assert page.is_hidden("#process-table") and page.is_hidden("#limits-tables")
    assert not any(request.url.endswith("/batch/alerts") for request in watched.api_requests())
    watched.assert_clean()
