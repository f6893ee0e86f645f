"""Cache keys: sha256 of canonical JSON of everything that determines a cached output.

A key covers the endpoint, the model id and its weights revision (changed weights never serve old
entries), the normalised input and every output-changing parameter. Canonical JSON (sorted keys, no
whitespace) makes the key independent of parameter order. Keys read `cache:{endpoint}:{model tag}:{sha256}`, so
cached answers can be counted and removed by endpoint and model (`key_pattern`).
"""

import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence


def normalise_text(text: str) -> str:
    """Unicode NFC: the same text typed two ways is one key (whitespace and case do change outputs)."""
    return unicodedata.normalize("NFC", text)


def cache_key(endpoint: str, model: str, revision: str, model_input: str | Sequence[int],
              params: Mapping[str, object]) -> str:
    payload = {"endpoint": endpoint, "model": model, "revision": revision,
               "input": model_input if isinstance(model_input, str) else list(model_input), "params": dict(params)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"cache:{endpoint}:{model_tag(model)}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def model_tag(model: str) -> str:
    """The model's part of its keys: a short digest, so a key pattern never meets a glob character of a name."""
    return hashlib.sha256(model.encode()).hexdigest()[:12]


def key_pattern(endpoint: str | None = None, model: str | None = None) -> str:
    """A glob (Redis MATCH, fnmatch) for the keys of `endpoint` and `model` (None: any)."""
    return f"cache:{endpoint or '*'}:{model_tag(model) if model else '*'}:*"
