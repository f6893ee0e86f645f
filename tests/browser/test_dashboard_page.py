"""`/dashboard` in headless Chromium against the real server: after real traffic (generations, a cache hit, a 429
from a tight per-client limit, a local batch job run to completion) the page shows what the JSON endpoints say,
without a console error or a failed request; thresholds round-trip and their errors show inline; the report names
its source; polling pauses while the tab is hidden; the page fits 360 px."""

import json

import pytest

from tests.browser.conftest import Server, Watched
from tests.browser.dashboard import wait_for_json_figures, wait_until

# Hides the tab on demand (`window.__hidden`): headless Chromium's tabs are always visible.
HIDEABLE = """
Object.defineProperty(Document.prototype, "hidden", {configurable: true, get: () => window.__hidden === true});
Object.defineProperty(Document.prototype, "visibilityState", {configurable: true,
  get: () => (window.__hidden === true ? "hidden" : "visible")});
"""
SET_HIDDEN = "hidden => { window.__hidden = hidden; document.dispatchEvent(new Event('visibilitychange')); }"
REFRESH_S = 5


@pytest.fixture(scope="module")
def server(serve) -> Server:
    # Unlimited but for a tight per-client limit on /predict: the page's own reads are never refused.
    return serve(INGRESS_RATE_LIMIT="off", INGRESS_RATE_LIMIT_PREDICT="2/minute", BATCH_SCHEDULE="0 0 1 1 *")


@pytest.fixture(scope="module")
def traffic(server: Server) -> dict:
    """Generations (one a cache hit), predictions (the third refused by the limit), a local batch job run to the
    end and an item left queued; returns once the records are written."""
    with server.client() as client:
        hits = [
            client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 3})
            .raise_for_status()
            .headers["x-cache"]
            for prompt in ("alpha", "beta", "alpha")
        ]
        assert hits == ["MISS", "MISS", "HIT"]
        assert [client.post("/predict", json={"text": "fine"}).status_code for _ in range(3)] == [200, 200, 429]
        job = (
            client.post(
                "/batch/jobs",
                json={
                    "name": "nightly summaries",
                    "provider": "local",
                    "model": "gpt2",
                    "kind": "generate",
                    "job_type": "summaries",
                    "schedule": "now",
                    "requests": [
                        {"custom_id": f"doc-{n}", "body": {"prompt": f"Document {n}:", "max_tokens": 3}}
                        for n in range(3)
                    ],
                },
            )
            .raise_for_status()
            .json()
        )
        wait_until(
            lambda: client.get(f"/batch/jobs/{job['id']}").json()["status"] == "completed",
            "the local batch job completes",
            timeout_s=90,
        )
        client.post(
            "/batch/queue",
            json={
                "job_type": "scoring",
                "provider": "local",
                "model": "sst2",
                "kind": "predict",
                "data": {"text": "great"},
            },
        ).raise_for_status()
        wait_until(lambda: client.get("/metrics/count").json()["total"] == 5, "the request records are written")
    return {"job": job["id"]}


def open_dashboard(watched: Watched, server: Server) -> None:
    watched.page.goto(f"{server.url}/dashboard")
    watched.page.wait_for_selector("#refresh-state[data-state='live']")


@pytest.fixture
def strict_cache_ratio(server):
    """A minimum cache hit ratio above the traffic's 2 of 5, so the page has a threshold breach to show."""
    with server.client() as client:
        before = {k: v for k, v in client.get("/metrics/thresholds").json().items() if k != "updated"}
        client.put("/metrics/thresholds", json=before | {"min_cache_hit_ratio": 0.5}).raise_for_status()
        yield
        client.put("/metrics/thresholds", json=before).raise_for_status()


def test_the_page_shows_the_json_figures_without_an_error(server, traffic, strict_cache_ratio, watched, artifacts):
    open_dashboard(watched, server)
    with server.client() as client:
        figures = wait_for_json_figures(
            watched.page,
            client,
            required={
                "serving.requests",
                "serving.p95",
                "serving.cache_hit_ratio",
                "serving.mean_batch_size",
                "limits.ingress.predict.denied",
                "limits.egress.gemini.allowed",
                "batch.processed",
                "batch.savings",
                "savings.provider.local",
                "savings.job_type.summaries",
                "queue.by_job_type.scoring",
            },
        )
        alerts = client.get("/batch/alerts").json()
        breaches = client.post(
            "/metrics/aggregated", json=json.loads(watched.page.locator("#serving").get_attribute("data-request"))
        ).json()["breaches"]
        jobs = client.get("/batch/jobs?limit=10").json()["items"]
    # What the traffic did, as the page shows it: 6 requests, no server error (the 429 is the client's, counted by
    # the limits), 2 of 5 items from the cache (the repeated generation and the repeated prediction).
    assert figures["serving.requests"][0] == 6 and figures["serving.errors"][0] == 0
    assert figures["serving.cache_hit_ratio"][0] == pytest.approx(2 / 5)
    assert figures["limits.ingress.predict.denied"][0] == 1 and figures["batch.processed"][0] == 3
    assert figures["batch.savings"][0] > 0 and figures["queue.by_job_type.scoring"][0] == 1
    page = watched.page
    assert page.locator("#alert-list > li").count() == len(alerts) + len(breaches) >= 1
    assert page.locator("[data-alert='threshold:min_cache_hit_ratio']").is_visible()
    assert page.locator("#activity > li").count() == len(jobs) == 2
    assert page.locator(f"#activity [data-job='{traffic['job']}']").inner_text().count("completed") == 1
    for chart in ("traffic", "latency", "savings-provider", "savings-type"):
        assert page.locator(f"#chart-{chart} canvas").is_visible(), chart
    assert "offline stand-in" in page.locator("#models").inner_text()
    page.screenshot(path=artifacts / "dashboard.png", full_page=True)
    watched.assert_clean()


def test_the_day_window_shows_its_own_figures(server, traffic, watched):
    open_dashboard(watched, server)
    watched.page.click("[data-window='day']")
    wait_until(
        lambda: (
            json.loads(watched.page.locator("#serving").get_attribute("data-request") or "{}").get("bucket") == "hour"
        ),
        "the page asks for the last day by hour",
    )
    with server.client() as client:
        figures = wait_for_json_figures(watched.page, client, required={"serving.requests"})
    assert figures["serving.requests"][0] == 6
    watched.assert_clean()


def test_the_page_fits_a_360_px_screen(server, traffic, watched, artifacts):
    watched.page.set_viewport_size({"width": 360, "height": 800})
    open_dashboard(watched, server)
    watched.page.wait_for_selector("#chart-savings-provider canvas")
    assert watched.page.evaluate("document.documentElement.scrollWidth") <= 360
    for card in watched.page.locator("main .card").all():
        box = card.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, box
    watched.page.screenshot(path=artifacts / "dashboard-360px.png", full_page=True)
    watched.assert_clean()


def test_a_threshold_edit_round_trips(server, watched):
    open_dashboard(watched, server)
    page = watched.page
    with server.client() as client:
        before = client.get("/metrics/thresholds").json()
        wait_until(
            lambda: page.input_value("#t-p95_latency_ms") == f"{before['p95_latency_ms']:g}",
            "the form shows the stored thresholds",
        )
        page.fill("#t-p95_latency_ms", "750")
        page.fill("#t-min_cache_hit_ratio", "0.25")
        page.fill("#t-error_rate", "")
        page.click("#threshold-form button[type='submit']")
        page.wait_for_selector("#threshold-status[data-state='saved']")
        stored = client.get("/metrics/thresholds").json()
        assert (stored["p95_latency_ms"], stored["min_cache_hit_ratio"], stored["error_rate"]) == (750, 0.25, None)
        assert "p95_latency_ms" in page.inner_text("#threshold-status")
        page.reload()
        wait_until(lambda: page.input_value("#t-p95_latency_ms") == "750", "the reloaded form shows the change")
        assert page.input_value("#t-min_cache_hit_ratio") == "0.25" and page.input_value("#t-error_rate") == ""
        client.put("/metrics/thresholds", json={k: v for k, v in before.items() if k != "updated"}).raise_for_status()
    watched.assert_clean()


def test_invalid_thresholds_show_their_errors_beside_their_fields(server, watched):
    open_dashboard(watched, server)
    page = watched.page
    with server.client() as client:
        before = client.get("/metrics/thresholds").json()
        wait_until(lambda: page.input_value("#t-max_queue_depth") != "", "the form is filled")
        page.fill("#t-error_rate", "1.5")
        page.fill("#t-p95_latency_ms", "-3")
        page.fill("#t-max_queue_depth", "lots")
        page.click("#threshold-form button[type='submit']")
        page.wait_for_selector("#threshold-status[data-state='error']")
        assert client.get("/metrics/thresholds").json() == before
    assert page.inner_text("[data-error-for='error_rate']") == "Input should be less than or equal to 1"
    assert page.inner_text("[data-error-for='p95_latency_ms']") == "Input should be greater than 0"
    assert "valid integer" in page.inner_text("[data-error-for='max_queue_depth']")
    assert page.inner_text("[data-error-for='p99_latency_ms']") == ""
    assert page.get_attribute("#t-error_rate", "aria-invalid") == "true"
    # The typed values stay for correcting, even across refreshes.
    page.click("#refresh-now")
    page.wait_for_selector("#refresh-state[data-state='live']")
    assert page.input_value("#t-error_rate") == "1.5"
    assert [(status, method) for status, method, _ in watched.http_errors] == [(422, "PUT")]
    assert watched.failed_requests == [] and watched.page_errors == [] and watched.csp_violations() == []


def test_the_report_shows_its_source(server, traffic, watched):
    open_dashboard(watched, server)
    page = watched.page
    page.fill("#focus", "latency")
    page.click("#analyze")
    page.wait_for_selector("#report-source[data-source]")
    with server.client() as client:
        report = client.post("/analyze/performance", json={"focus": "latency"}).raise_for_status().json()
    assert (report["source"], report["reason"]) == ("fallback", "no_key")
    assert page.get_attribute("#report-source", "data-source") == report["source"]
    assert "Rule-based fallback (GEMINI_API_KEY is not set)" in page.inner_text("#report-source")
    assert page.inner_text("#report-summary") == report["summary"]
    assert page.locator("#report-findings > li").count() == len(report["findings"])
    watched.assert_clean()


def test_polling_pauses_while_the_tab_is_hidden(server, watched):
    watched.page.context.add_init_script(HIDEABLE)
    open_dashboard(watched, server)
    page = watched.page
    page.evaluate(SET_HIDDEN, True)
    assert page.get_attribute("#refresh-state", "data-state") == "paused"
    asked = len(watched.api_requests())
    # Longer than a polling interval, and nothing asked: no assertion on how long anything took.
    page.wait_for_timeout((REFRESH_S + 1.5) * 1000)
    assert len(watched.api_requests()) == asked
    with page.expect_request(lambda request: request.url.endswith("/metrics/aggregated")):
        page.evaluate(SET_HIDDEN, False)
    page.wait_for_selector("#refresh-state[data-state='live']")
    watched.assert_clean()


def test_the_page_refreshes_itself(server, traffic, watched):
    open_dashboard(watched, server)
    page = watched.page
    with server.client() as client:
        wait_for_json_figures(page, client, required={"serving.requests"})
        shown = int(page.get_attribute("[data-figure='serving.requests']", "data-value"))
        answered = client.get("/metrics/count").json()["total"]
        client.post("/generate", json={"prompts": ["gamma"], "max_new_tokens": 3}).raise_for_status()
        wait_until(lambda: client.get("/metrics/count").json()["total"] == answered + 1, "the request is recorded")
    # No click: the next poll shows it.
    page.wait_for_selector(
        f"[data-figure='serving.requests'][data-value='{shown + 1}']", timeout=(REFRESH_S + 10) * 1000
    )
    watched.assert_clean()


def test_a_rate_limited_page_waits_and_says_so(serve, watched):
    limited = serve(INGRESS_RATE_LIMIT="3/minute")
    watched.page.goto(f"{limited.url}/dashboard")
    watched.page.wait_for_selector("#refresh-state[data-state='limited']")
    assert watched.page.inner_text("#refresh-state").startswith("Rate limited: next refresh in ")
    assert watched.page.is_hidden("#page-error") and watched.page_errors == []
    assert {status for status, _, _ in watched.http_errors} == {429}
