"""Tenants and their API keys: who is calling, what they may see, what they may spend.

A key belongs to a tenant; several keys may share one (rotation: add the new key, move clients, remove the old).
Every stored row carries its tenant and every read is scoped to the caller's tenant; an admin key sees and manages
every tenant. Keys come from three settings, all optional:

- `API_KEYS=keyA,keyB`: each key its own tenant, named after the key's id (`key-<12 hex of its SHA-256>`), role
  `user`, no paid-provider grant;
- `ADMIN_API_KEYS=...`: role `admin`, tenant `admin`, every grant;
- `API_KEYS_FILE=keys.toml`: `[[keys]]` entries with `tenant`, `key` (the key, or `sha256:<hex>` of it), `role`
  (`user` or `admin`) and `grants` (paid providers the key may create jobs for), and optional `[tenants.<name>]`
  tables with an `egress_rate_limit` of their own (the global `EGRESS_RATE_LIMIT` applies as well).

Entries take the key itself or `sha256:<hex digest>` of it, so the configuration need not hold the secrets. A
presented key is hashed and compared, in constant time, with every digest, match or not; keys are never logged, only
their ids (`key:<16 hex>`). With no key configured at all, the server is open: every caller is the one tenant
`default`, with every right, as a single machine needs.
"""

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from server.core import provider_names
from server.core.rate_policy import RatePolicy, parse_policies

Role = Literal["user", "admin"]
PAID_PROVIDERS = frozenset(provider_names.PAID_PROVIDERS)
# Rows written before tenants existed, and every row of an open server (no API keys), belong to this tenant.
DEFAULT_TENANT = "default"
ADMIN_TENANT = "admin"
# Where requests refused for want of a valid key are recorded: not a name a tenant can have, so no tenant sees them.
UNAUTHENTICATED = "(unauthenticated)"
UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>'"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyFileError(ValueError):
    """API_KEYS_FILE cannot be used; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    tenant: str
    role: Role
    grants: frozenset[str]
    key_id: str | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_spend(self, provider: str) -> bool:
        """Whether this key may create work for `provider` (our own models cost nothing and need no grant)."""
        return provider not in PAID_PROVIDERS or self.admin or provider in self.grants

    def scope(self, tenant: str | None = None) -> str | None:
        """The tenant a read is limited to: the caller's own, or for an admin `tenant` (None: every tenant).
        Raises `PermissionError` when a user asks for another tenant's data."""
        if self.admin:
            return tenant
        if tenant is not None and tenant != self.tenant:
            raise PermissionError("only an admin key may read another tenant's data")
        return self.tenant


OPEN = Principal(DEFAULT_TENANT, "admin", PAID_PROVIDERS)


@dataclass(frozen=True)
class _Entry:
    digest: str
    principal: Principal


@dataclass
class KeyRing:
    entries: list[_Entry] = field(default_factory=list)
    egress: dict[str, dict[str, RatePolicy]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, api_keys: str, admin_api_keys: str, keys_file: Path | None) -> "KeyRing":
        ring = cls()
        for token in _split(api_keys):
            entry_digest = _entry_digest(token)
            ring.entries.append(_Entry(entry_digest, Principal(f"key-{entry_digest[:12]}", "user", frozenset())))
        for token in _split(admin_api_keys):
            ring.entries.append(_Entry(_entry_digest(token), Principal(ADMIN_TENANT, "admin", PAID_PROVIDERS)))
        if keys_file is not None:
            ring._load(keys_file)
        seen: set[str] = set()
        for entry in ring.entries:
            if entry.digest in seen:
                raise KeyFileError("the same key is configured twice: each key belongs to one tenant and role")
            seen.add(entry.digest)
        return ring

    def _load(self, path: Path) -> None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise KeyFileError(f"cannot read {path}: {exc}") from None
        keys = document.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(entry, dict) for entry in keys):
            raise KeyFileError(f"{path}: `keys` must be an array of tables ([[keys]])")
        for number, entry in enumerate(keys, 1):
            where = f"{path}, keys entry {number}"
            unknown = set(entry) - {"tenant", "key", "role", "grants"}
            if unknown:
                raise KeyFileError(
                    f"{where}: unknown field {sorted(unknown)[0]!r} (expected tenant, key, role, grants)"
                )
            tenant, key, role = entry.get("tenant"), entry.get("key"), entry.get("role", "user")
            grants = entry.get("grants", [])
            if not isinstance(tenant, str) or not TENANT_NAME.match(tenant):
                raise KeyFileError(
                    f"{where}: `tenant` must be 1-64 characters of A-Z a-z 0-9 . _ - (first a letter or digit)"
                )
            if not isinstance(key, str) or not key.strip():
                raise KeyFileError(f"{where}: `key` must be the key, or sha256:<hex digest> of it")
            if role not in ("user", "admin"):
                raise KeyFileError(f"{where}: `role` must be 'user' or 'admin'")
            if not isinstance(grants, list) or not set(grants) <= PAID_PROVIDERS:
                raise KeyFileError(f"{where}: `grants` must list providers among {', '.join(sorted(PAID_PROVIDERS))}")
            granted = PAID_PROVIDERS if role == "admin" else frozenset(grants)
            self.entries.append(_Entry(_entry_digest(key, where), Principal(tenant, role, granted)))
        tenants = document.get("tenants", {})
        if not isinstance(tenants, dict):
            raise KeyFileError(f"{path}: `tenants` must be a table of tables ([tenants.<name>])")
        for name, options in tenants.items():
            where = f"{path}, [tenants.{name}]"
            if not isinstance(options, dict) or set(options) - {"egress_rate_limit"}:
                raise KeyFileError(f"{where}: the only option is egress_rate_limit")
            try:
                self.egress[name] = parse_policies(str(options.get("egress_rate_limit", "")))
            except ValueError as exc:
                raise KeyFileError(f"{where}: egress_rate_limit: {exc}") from None
        unknown_tenants = set(self.egress) - {entry.principal.tenant for entry in self.entries}
        if unknown_tenants:
            raise KeyFileError(f"{path}: [tenants.{sorted(unknown_tenants)[0]}] names a tenant that has no key")
        if document.keys() - {"keys", "tenants"}:
            raise KeyFileError(
                f"{path}: unknown table {sorted(document.keys() - {'keys', 'tenants'})[0]!r} "
                "(expected [[keys]] and [tenants.<name>])"
            )

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else the server is open)."""
        return bool(self.entries)

    @property
    def anonymous_allowed(self) -> bool:
        """Callers without a key are served when no ordinary (non-admin) key exists: with only admin keys, the
        admin operations are protected and the rest stays open, as before tenants existed."""
        return not any(entry.principal.role == "user" for entry in self.entries)

    @property
    def anonymous(self) -> Principal:
        """Who a caller without a key is, where that is allowed."""
        return OPEN if not self.enabled else Principal(DEFAULT_TENANT, "user", PAID_PROVIDERS)

    def identify(self, token: str | None) -> Principal | None:
        """The principal of a valid key, None for a missing or unknown one.

        Every entry is compared, match or not, so timing does not reveal which entry matched.
        """
        if not token:
            return None
        candidate = digest(token)
        found: Principal | None = None
        for entry in self.entries:
            if hmac.compare_digest(candidate, entry.digest):
                found = entry.principal
        if found is None:
            return None
        return Principal(found.tenant, found.role, found.grants, f"key:{candidate[:16]}")

    def tenants(self) -> list[str]:
        """Every tenant a key belongs to."""
        return sorted({entry.principal.tenant for entry in self.entries})


def _split(entries: str) -> Iterable[str]:
    return (entry.strip() for entry in entries.split(",") if entry.strip())


def _entry_digest(entry: str, where: str = "API_KEYS") -> str:
    entry = entry.strip()
    if entry.startswith("sha256:"):
        hexdigest = entry.removeprefix("sha256:").lower()
        if not DIGEST.match(hexdigest):
            raise KeyFileError(f"{where}: sha256: must be followed by the 64 hex digits of the key's SHA-256")
        return hexdigest
    return digest(entry)
