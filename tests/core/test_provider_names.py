from typing import get_args

from server.core import tenants
from server.core.provider_names import KINDS, LOCAL, PAID_PROVIDERS, PROVIDERS, Provider


def test_the_one_list_names_every_provider_with_its_kinds():
    assert set(get_args(Provider)) == set(PROVIDERS) == set(KINDS)
    assert all(KINDS[name] for name in PROVIDERS)


def test_only_the_external_providers_cost_money_and_need_a_grant():
    assert LOCAL not in PAID_PROVIDERS
    assert tenants.PAID_PROVIDERS == frozenset(PAID_PROVIDERS)
    user = tenants.Principal("t", "user", frozenset())
    assert user.may_spend(LOCAL)
    assert not any(user.may_spend(name) for name in PAID_PROVIDERS)
