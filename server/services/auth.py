"""Bearer API keys from `API_KEYS`: plain keys, or `sha256:<hex digest>` entries so that the
configuration need not hold the secrets themselves. Keys are compared in constant time."""

import hashlib
import hmac


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiKeys:
    def __init__(self, entries: str):
        self._digests = [entry.strip().removeprefix("sha256:").lower() if entry.strip().startswith("sha256:")
                         else digest(entry.strip()) for entry in entries.split(",") if entry.strip()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, token: str | None) -> str | None:
        """A stable, non-secret id for a valid key (for rate limiting and logs), None for an invalid one.

        Every entry is compared, match or not, so timing does not reveal which entry matched.
        """
        if not token:
            return None
        candidate = digest(token)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(candidate, known)
        return f"key:{candidate[:16]}" if matched else None
