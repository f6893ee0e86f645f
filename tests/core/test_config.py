import pytest
from pydantic import ValidationError

from server.core.config import Settings, settings_errors


def errors_for(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    return settings_errors(raised.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("INGRESS_RATE_LIMIT", "5/min", "expected N/second|minute|hour|day[;burst=B] (e.g. '60/minute'"),
        ("INGRESS_RATE_LIMIT_GENERATE", "fast", "expected N/second|minute|hour|day[;burst=B]"),
        ("EGRESS_RATE_LIMIT", "garbage", "expected name=policy, e.g. gemini=10/minute"),
        ("EGRESS_RATE_LIMIT", "openai=lots", "expected N/second|minute|hour|day[;burst=B]"),
        ("PORT", "abc", "expected an integer >= 1 and <= 65535"),
        ("PORT", "70000", "expected an integer >= 1 and <= 65535"),
        ("MODEL_SOURCE", "foo", "expected one of 'auto', 'local', 'hub'"),
        ("GENERATOR_PRECISION", "int4", "expected one of 'fp32', 'int8'"),
        ("SENTIMENT_PRECISION", "fp16", "expected one of 'fp32', 'int8'"),
        ("LOG_LEVEL", "loud", "expected one of 'critical', 'error', 'warning', 'info', 'debug', 'trace'"),
        ("LOG_FORMAT", "xml", "expected one of 'text', 'json'"),
        ("REQUEST_TIMEOUT_S", "0", "expected a number > 0"),
        ("CACHE_ALLOW_CLIENT_BYPASS", "maybe", "expected true or false"),
        ("REDIS_URL", "localhost:6379", "expected redis://"),
        ("DATABASE_URL", "mysql://db/x", "expected sqlite+aiosqlite:///"),
    ],
)
def test_a_bad_setting_is_one_line_with_variable_value_and_accepted_forms(monkeypatch, name, value, expected):
    lines = errors_for(monkeypatch, **{name: value})
    assert len(lines) == 1
    assert lines[0].startswith(f"invalid setting {name}={value!r}: ") and expected in lines[0]


def test_each_bad_setting_gets_its_own_line(monkeypatch):
    lines = errors_for(monkeypatch, PORT="abc", INGRESS_RATE_LIMIT="5/min", MODEL_SOURCE="foo")
    assert sorted(line.split("=", 1)[0] for line in lines) == [
        "invalid setting INGRESS_RATE_LIMIT",
        "invalid setting MODEL_SOURCE",
        "invalid setting PORT",
    ]


def test_a_database_password_is_not_repeated(monkeypatch):
    [line] = errors_for(monkeypatch, DATABASE_URL="postgresql://app:hunter2@db:5432/app")
    assert "hunter2" not in line and "postgresql://app:***@db:5432/app" in line


def test_log_levels_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    assert Settings(_env_file=None).log_level == "warning"
