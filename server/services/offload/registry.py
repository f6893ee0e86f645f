"""Which batch providers this server can use, and for which kinds of request.

`local` (our own models) is always there; an external provider is configured when its API key is set.
A job for an unconfigured provider, or a kind its API does not offer, is refused at creation (422).
"""

from dataclasses import dataclass

from server.core.provider_names import KINDS
from server.services.errors import FieldError, InputError


@dataclass(frozen=True)
class ProviderRegistry:
    configured: frozenset[str]

    def check(self, provider: str, kind: str) -> None:
        if provider not in self.configured:
            raise InputError(
                [
                    FieldError(
                        ("body", "provider"),
                        f"provider {provider!r} is not configured on this server: set {provider.upper()}_API_KEY",
                    )
                ]
            )
        kinds = KINDS.get(provider, ())
        if kind not in kinds:
            raise InputError(
                [
                    FieldError(
                        ("body", "kind"),
                        f"provider {provider!r} takes kinds {', '.join(kinds) or '(none)'}, not {kind!r}",
                    )
                ]
            )
