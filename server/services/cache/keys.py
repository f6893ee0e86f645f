"""Cache keys: sha256 of canonical JSON of everything that determines a cached output.

A key covers the endpoint, the model id and its weights revision (changed weights never serve old
entries), the normalised input, every output-changing parameter and its scope: the tenant whose answer it is
(`CACHE_SCOPE=tenant`, the default: another tenant's identical request is a miss, so a hit reveals nothing about
other tenants' prompts) or None for answers shared by every tenant (`CACHE_SCOPE=global`). Canonical JSON (sorted
keys, no whitespace) makes the key independent of parameter order. Keys read
`cache:{endpoint}:{model tag}:{scope tag}:{sha256}`, so cached answers can be counted and removed by endpoint, model
and scope (`key_pattern`); the stampede lock and in-process coalescing are keyed by the same key, so they follow the
same scope.
"""

import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence


def normalise_text(text: str) -> str:
    """Unicode NFC: the same text typed two ways is one key (whitespace and case do change outputs)."""
    return unicodedata.normalize("NFC", text)


SHARED = "shared"


def cache_key(
    endpoint: str,
    model: str,
    revision: str,
    model_input: str | Sequence[int],
    params: Mapping[str, object],
    scope: str | None = None,
) -> str:
    payload = {
        "endpoint": endpoint,
        "model": model,
        "revision": revision,
        "scope": scope,
        "input": model_input if isinstance(model_input, str) else list(model_input),
        "params": dict(params),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"cache:{endpoint}:{model_tag(model)}:{scope_tag(scope)}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def scope_tag(scope: str | None) -> str:
    """The scope's part of its keys: `shared`, or a short digest of the tenant (names never reach Redis)."""
    return SHARED if scope is None else "t" + hashlib.sha256(scope.encode()).hexdigest()[:12]


def model_tag(model: str) -> str:
    """The model's part of its keys: a short digest, so a key pattern never meets a glob character of a name."""
    return hashlib.sha256(model.encode()).hexdigest()[:12]


def key_pattern(endpoint: str | None = None, model: str | None = None, scope_tags: str | None = None) -> str:
    """A glob (Redis MATCH, fnmatch) for the keys of `endpoint`, `model` and the scope tag `scope_tags` (None: any)."""
    return f"cache:{endpoint or '*'}:{model_tag(model) if model else '*'}:{scope_tags or '*'}:*"
