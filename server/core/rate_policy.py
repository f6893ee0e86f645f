"""Rate policies written as `60/minute` or `10/second;burst=5` (burst defaults to the count).

Pure parsing, in core because the settings validate INGRESS_RATE_LIMIT* and EGRESS_RATE_LIMIT with it at start.
"""

import re
from dataclasses import dataclass

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
FORMS = "expected N/second|minute|hour|day[;burst=B] (e.g. '60/minute', '10/second;burst=5') or 'off'"
SYNTAX = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*(?:;\s*burst\s*=\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class RatePolicy:
    """`count` requests per `period_s` on average, at most `burst` at once."""

    name: str
    count: int
    period_s: int
    burst: int

    @property
    def interval_s(self) -> float:
        """GCRA's emission interval: one request's share of the period."""
        return self.period_s / self.count

    @property
    def header(self) -> str:
        """This policy in a `RateLimit-Policy` header (draft-ietf-httpapi-ratelimit-headers)."""
        return f'"{self.name}";q={self.count};w={self.period_s}'


def parse_policy(name: str, text: str) -> RatePolicy | None:
    """The policy `text` describes, or None for `off` (and empty); ValueError for anything else."""
    if text.strip().lower() in ("", "off"):
        return None
    match = SYNTAX.match(text.lower())
    if not match or int(match[1]) < 1 or (match[3] is not None and int(match[3]) < 1):
        raise ValueError(f"rate limit {text!r} for {name!r}: {FORMS}")
    count = int(match[1])
    return RatePolicy(name, count, PERIODS[match[2]], int(match[3]) if match[3] else count)


def parse_policies(text: str) -> dict[str, RatePolicy]:
    """`name=policy` pairs separated by commas (as in EGRESS_RATE_LIMIT), entries set to `off` omitted."""
    policies = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = entry.partition("=")
        if not sep:
            raise ValueError(f"{entry!r}: expected name=policy, e.g. gemini=10/minute")
        policy = parse_policy(name.strip(), value)
        if policy:
            policies[name.strip()] = policy
    return policies
