"""Cache keys: sha256 of canonical JSON of everything that determines a cached output.

A key covers the endpoint, the model id and its weights revision (changed weights never serve old
entries), the normalised input and every output-changing parameter. Canonical JSON (sorted keys, no
whitespace) makes the key independent of parameter order.
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
    return f"cache:{endpoint}:{hashlib.sha256(canonical.encode()).hexdigest()}"
