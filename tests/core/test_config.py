import pytest
from pydantic import ValidationError

from server.core.config import Settings, former_names, settings_errors


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
        ("SCHEDULER_MAX_SIZE", "0", "expected an integer >= 1 and <= 1024"),
        # A former name is still read, and an error names the variable as the user wrote it.
        ("BATCH_MAX_SIZE", "lots", "expected an integer >= 1 and <= 1024"),
        ("BATCH_STALL_S", "-1", "expected a number > 0"),
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


FORMER_NAMES = {
    "SCHEDULER_MAX_SIZE": ("BATCH_MAX_SIZE", "7"),
    "SCHEDULER_MAX_WAIT_MS": ("BATCH_MAX_WAIT_MS", "2.5"),
    "SCHEDULER_QUEUE_LIMIT": ("BATCH_QUEUE_LIMIT", "9"),
    "SCHEDULER_LOOP_MAX_FAILURES": ("BATCH_LOOP_MAX_FAILURES", "3"),
    "SCHEDULER_LOOP_FAILURE_WINDOW_S": ("BATCH_LOOP_FAILURE_WINDOW_S", "11"),
    "SCHEDULER_STALL_S": ("BATCH_STALL_S", "13"),
}


@pytest.mark.parametrize(("name", "former"), FORMER_NAMES.items())
def test_a_renamed_setting_is_still_read_under_its_former_name(monkeypatch, name, former):
    old, value = former
    monkeypatch.setenv(old, value)
    assert float(getattr(Settings(_env_file=None), name.lower())) == float(value)
    assert former_names(name.lower()) == (old.lower(),)


def test_the_new_name_wins_when_both_are_set(monkeypatch):
    monkeypatch.setenv("BATCH_QUEUE_LIMIT", "5")
    monkeypatch.setenv("SCHEDULER_QUEUE_LIMIT", "6")
    assert Settings(_env_file=None).scheduler_queue_limit == 6


def test_every_former_name_is_listed_here():
    renamed = {name.upper() for name in Settings.model_fields if former_names(name)}
    assert renamed == set(FORMER_NAMES)
