import pytest

from server.core.rate_policy import RatePolicy, parse_policies, parse_policy


def test_policies_parse_with_and_without_burst():
    assert parse_policy("default", "60/minute") == RatePolicy("default", 60, 60, 60)
    assert parse_policy("g", " 10 / second ; burst = 3 ") == RatePolicy("g", 10, 1, 3)
    assert parse_policy("x", "off") is None and parse_policy("x", "") is None
    assert parse_policy("d", "5/minute").header == '"d";q=5;w=60'


@pytest.mark.parametrize("text", ["60", "60/fortnight", "0/minute", "5/minute;burst=0", "five/minute", "5/minute;b=2"])
def test_bad_policies_are_rejected_with_an_example(text):
    with pytest.raises(ValueError, match="expected N/second"):
        parse_policy("p", text)


def test_provider_lists_parse_and_skip_off():
    assert parse_policies("gemini=10/minute, openai=off,anthropic=2/second") == {
        "gemini": RatePolicy("gemini", 10, 60, 10),
        "anthropic": RatePolicy("anthropic", 2, 1, 2),
    }
    with pytest.raises(ValueError, match="name=policy"):
        parse_policies("10/minute")
