"""One structured-output call through the real google-genai SDK to the fake Gemini server."""

import json

import pytest

from server.providers.base import ProviderError
from server.providers.gemini_report import GeminiJson, InvalidAnswer
from server.services.analytics.report import ReportBody

GENERATE = r"/v1beta/models/[^/]+:generateContent"


def client(fake, timeout_s: float = 10.0) -> GeminiJson:
    return GeminiJson("test-key", "gemini-2.5-flash-lite", timeout_s=timeout_s, base_url=fake.base_url)


async def test_the_answer_is_validated_against_the_schema_sent(fake_gemini):
    answer = {
        "summary": "fine",
        "severity": "warning",
        "recommendations": ["add a replica"],
        "findings": [{"title": "p95", "detail": "p95 is 1.2 s", "severity": "warning"}],
    }
    fake_gemini.settings.generate_answer = json.dumps(answer)
    report = await client(fake_gemini).generate("how are we doing?", ReportBody)
    assert report == ReportBody.model_validate(answer)
    [call] = fake_gemini.calls("POST", GENERATE)
    config = json.loads(call.body)["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config.get("responseSchema") or config.get("responseJsonSchema")
    assert set(schema["required"]) >= {"summary", "severity", "findings", "recommendations"}
    assert call.path.endswith("gemini-2.5-flash-lite:generateContent")


async def test_an_answer_that_breaks_the_schema_is_invalid(fake_gemini):
    fake_gemini.settings.generate_bad_json = 1
    with pytest.raises(InvalidAnswer):
        await client(fake_gemini).generate("report", ReportBody)


async def test_errors_carry_status_and_retry_after(fake_gemini):
    fake_gemini.settings.generate_503s = 1
    fake_gemini.settings.generate_429s = 1
    fake_gemini.settings.retry_after_s = 7
    with pytest.raises(ProviderError) as limited:
        await client(fake_gemini).generate("report", ReportBody)
    assert (limited.value.status, limited.value.retry_after_s) == (429, 7)
    with pytest.raises(ProviderError) as unavailable:
        await client(fake_gemini).generate("report", ReportBody)
    assert unavailable.value.status == 503


async def test_a_hanging_answer_is_cut_at_the_timeout(fake_gemini):
    fake_gemini.settings.generate_hangs = 1
    fake_gemini.settings.hang_s = 30
    with pytest.raises(ProviderError) as hung:
        await client(fake_gemini, timeout_s=0.3).generate("report", ReportBody)
    assert hung.value.status is None and "Timeout" in str(hung.value)
