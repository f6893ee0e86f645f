import pytest

from server.core.provider_names import KINDS, LOCAL, PAID_PROVIDERS, PROVIDERS
from server.services.errors import InputError
from server.services.offload.registry import ProviderRegistry

EVERY_KIND = sorted({kind for kinds in KINDS.values() for kind in kinds})
ALL_CONFIGURED = ProviderRegistry(frozenset(PROVIDERS))


def refusal(registry: ProviderRegistry, provider: str, kind: str):
    with pytest.raises(InputError) as caught:
        registry.check(provider, kind)
    [error] = caught.value.errors
    return error


@pytest.mark.parametrize(("provider", "kind"), [(p, k) for p in PROVIDERS for k in KINDS[p]])
def test_a_configured_provider_takes_each_of_its_kinds(provider, kind):
    ALL_CONFIGURED.check(provider, kind)


@pytest.mark.parametrize("provider", PAID_PROVIDERS)
def test_an_unconfigured_provider_is_refused_naming_the_key_to_set(provider):
    error = refusal(ProviderRegistry(frozenset({LOCAL})), provider, KINDS[provider][0])
    assert error.loc == ("body", "provider")
    assert repr(provider) in error.msg
    assert f"{provider.upper()}_API_KEY" in error.msg


def test_an_unconfigured_provider_is_refused_before_its_kind_is_judged():
    error = refusal(ProviderRegistry(frozenset({LOCAL})), "anthropic", "embedding")
    assert error.loc == ("body", "provider")


@pytest.mark.parametrize(
    ("provider", "kind"),
    [(p, k) for p in PROVIDERS for k in EVERY_KIND if k not in KINDS[p]] + [("openai", "completion")],
)
def test_a_kind_the_provider_does_not_offer_is_refused_listing_those_it_does(provider, kind):
    error = refusal(ALL_CONFIGURED, provider, kind)
    assert error.loc == ("body", "kind")
    assert repr(kind) in error.msg
    assert all(offered in error.msg for offered in KINDS[provider])


def test_only_the_configured_providers_are_usable():
    registry = ProviderRegistry(frozenset({LOCAL, "gemini"}))
    registry.check("gemini", "chat")
    registry.check(LOCAL, "predict")
    assert refusal(registry, "openai", "chat").loc == ("body", "provider")


def test_a_configured_name_with_no_kinds_is_refused_not_a_crash():
    error = refusal(ProviderRegistry(frozenset({"mistral"})), "mistral", "chat")
    assert error.loc == ("body", "kind")
    assert error.msg == "provider 'mistral' takes kinds (none), not 'chat'"
