import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.core.config import Settings, settings_errors
from server.core.tenants import OPEN, KeyFileError, KeyRing, Principal


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_each_plain_key_is_its_own_tenant_without_grants_and_admin_keys_are_admins():
    ring = KeyRing.from_settings("alpha, " + sha("beta"), "root", None)
    alpha, beta, root = (ring.identify(key) for key in ("alpha", "beta", "root"))
    assert alpha.tenant != beta.tenant and alpha.tenant.startswith("key-")
    assert alpha.role == beta.role == "user" and not alpha.may_spend("openai") and alpha.may_spend("local")
    assert root.admin and root.may_spend("anthropic")
    assert alpha.key_id == "key:" + hashlib.sha256(b"alpha").hexdigest()[:16], "an id, never the key"
    assert ring.identify("gamma") is None and ring.identify(None) is None
    assert not ring.anonymous_allowed


def test_the_file_gives_tenants_several_keys_roles_grants_and_egress(tmp_path):
    path = keys_file(
        tmp_path,
        f"""
[[keys]]
tenant = "acme"
key = "acme-old"
grants = ["openai"]

[[keys]]
tenant = "acme"
key = "{sha("acme-new")}"
grants = ["openai", "gemini"]

[[keys]]
tenant = "ops"
key = "ops-key"
role = "admin"

[tenants.acme]
egress_rate_limit = "openai=5/minute"
""",
    )
    ring = KeyRing.from_settings("", "", path)
    old, new, ops = (ring.identify(key) for key in ("acme-old", "acme-new", "ops-key"))
    assert old.tenant == new.tenant == "acme", "rotation: two keys, one tenant"
    assert old.may_spend("openai") and not old.may_spend("gemini") and new.may_spend("gemini")
    assert not new.may_spend("anthropic")
    assert ops.admin and ops.may_spend("anthropic")
    assert ring.egress["acme"]["openai"].count == 5
    assert ring.tenants() == ["acme", "ops"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[keys]]\ntenant = "a"\n', "`key` must be"),
        ('[[keys]]\ntenant = "a b"\nkey = "k"\n', "`tenant` must be"),
        ('[[keys]]\ntenant = "a"\nkey = "k"\nrole = "owner"\n', "`role` must be"),
        ('[[keys]]\ntenant = "a"\nkey = "k"\ngrants = ["local"]\n', "`grants` must list"),
        ('[[keys]]\ntenant = "a"\nkey = "k"\nsecret = 1\n', "unknown field 'secret'"),
        ('[[keys]]\ntenant = "a"\nkey = "sha256:abc"\n', "64 hex digits"),
        ('[[keys]]\ntenant = "a"\nkey = "k"\n[[keys]]\ntenant = "b"\nkey = "k"\n', "configured twice"),
        ('[[keys]]\ntenant = "a"\nkey = "k"\n[tenants.z]\negress_rate_limit = "openai=1/minute"\n', "has no key"),
        ('[[keys]]\ntenant = "a"\nkey = "k"\n[tenants.a]\negress_rate_limit = "openai=often"\n', "egress_rate_limit"),
        ("not toml at all [", "cannot read"),
    ],
)
def test_a_broken_keys_file_is_refused_with_the_entry_and_the_reason(tmp_path, text, message):
    with pytest.raises(KeyFileError, match=message.replace("[", r"\[")):
        KeyRing.from_settings("", "", keys_file(tmp_path, text))


def test_the_settings_refuse_a_broken_keys_file_in_one_line_without_the_key(tmp_path):
    path = keys_file(tmp_path, '[[keys]]\ntenant = "a"\nkey = "topsecret"\nrole = "root"\n')
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, api_keys_file=path)
    [line] = settings_errors(caught.value)
    assert "role" in line and "topsecret" not in line


def test_no_key_at_all_is_one_open_tenant_and_only_admin_keys_leave_the_rest_open():
    assert not KeyRing.from_settings("", "", None).enabled
    assert KeyRing.from_settings("", "", None).anonymous == OPEN and OPEN.admin
    admins_only = KeyRing.from_settings("", "root", None)
    assert admins_only.anonymous_allowed and not admins_only.anonymous.admin


def test_scope_is_the_callers_tenant_unless_an_admin_asks():
    user = Principal("acme", "user", frozenset())
    admin = Principal("ops", "admin", frozenset())
    assert user.scope() == "acme" and user.scope("acme") == "acme"
    with pytest.raises(PermissionError):
        user.scope("other")
    assert admin.scope() is None and admin.scope("acme") == "acme"
