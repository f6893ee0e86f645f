import pytest

from server.core.destinations import DestinationPolicy, RefusedDestination, parse_allowlist, public_form

STRICT = DestinationPolicy(allow_http=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/internal-admin",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://192.168.1.5/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://240.0.0.1/",
    ],
)
async def test_internal_addresses_are_refused_at_check_and_at_resolution(url):
    with pytest.raises(RefusedDestination, match="internal address"):
        STRICT.check(url)
    with pytest.raises(RefusedDestination, match="internal address"):
        await STRICT.resolve(url)


async def test_a_host_name_is_judged_by_every_address_it_resolves_to():
    STRICT.check("http://localhost:9/hook")  # a name: judged once resolved
    with pytest.raises(RefusedDestination, match=r"localhost \(127\.0\.0\.1\)"):
        await STRICT.resolve("http://localhost:9/hook")


async def test_an_allowlisted_name_address_or_network_is_accepted():
    for allowed in ("localhost", "127.0.0.1", "127.0.0.0/8", "::ffff:127.0.0.0/104"):
        policy = DestinationPolicy.from_settings(True, allowed)
        target = await policy.resolve(
            "http://localhost:9/hook"
            if allowed == "localhost"
            else "http://[::ffff:127.0.0.1]:9/"
            if ":" in allowed
            else "http://127.0.0.1:9/"
        )
        assert target.port == 9


def test_https_only_unless_http_is_allowed_and_no_credentials_or_other_schemes():
    with pytest.raises(RefusedDestination, match="https"):
        DestinationPolicy().check("http://hooks.example.com/x")
    for url, reason in (
        ("ftp://hooks.example.com/", "https://"),
        ("https://u:p@hooks.example.com/", "credentials"),
        ("https:///path", "needs a host"),
        ("https://[::1/", "not a usable URL"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com/\x7f", "not a usable URL: Invalid non-printable"),
    ):
        with pytest.raises(RefusedDestination, match=reason):
            DestinationPolicy().check(url)
    assert DestinationPolicy().check("https://hooks.example.com/x?token=1") == ("hooks.example.com", 443)


async def test_a_name_that_does_not_resolve_is_refused():
    with pytest.raises(RefusedDestination, match="does not resolve"):
        await DestinationPolicy().resolve("https://no-such-host.invalid/hook")


def test_public_form_keeps_scheme_and_host_only():
    assert public_form("https://hooks.slack.com/services/T0/B0/SECRET?x=1") == "https://hooks.slack.com"
    assert public_form("http://user:pw@[::1]:8080/p") == "http://[::1]:8080"
    assert public_form(None) is None


def test_the_allowlist_setting_is_checked():
    assert parse_allowlist("hooks.internal, 10.0.0.0/8,[::1]")[0] == frozenset({"hooks.internal"})
    with pytest.raises(ValueError, match="neither"):
        parse_allowlist("10.0.0.0/33x")
