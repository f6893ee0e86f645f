"""The prompt policy: prompts containing a blocked term are refused before any model work (BLOCKED_TERMS).

A term matches case-insensitively, on word boundaries, after Unicode NFKC normalisation of both the term
and the prompt, so full-width letters, ligatures and other compatibility forms cannot smuggle a term past
it; runs of white space inside a term match any run of white space.
"""

import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from server.core import metrics
from server.services.errors import BlockedPrompt


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def read_terms(setting: str) -> list[str]:
    """The terms of a BLOCKED_TERMS value: comma-separated, or `@path` to a file of one term per line
    (blank lines and lines starting with `#` are skipped)."""
    if setting.startswith("@"):
        lines = Path(setting[1:]).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [term.strip() for term in setting.split(",") if term.strip()]


class PromptPolicy:
    def __init__(self, terms: Iterable[str]):
        patterns = sorted(
            {r"\s+".join(map(re.escape, normalise(term).split())) for term in terms}, key=len, reverse=True
        )
        self._pattern = re.compile(rf"(?<!\w)(?:{'|'.join(patterns)})(?!\w)") if patterns else None

    @classmethod
    def from_setting(cls, setting: str) -> "PromptPolicy":
        return cls(read_terms(setting))

    def check(self, endpoint: str, prompts: Sequence[str]) -> None:
        """Raise `BlockedPrompt` naming the first prompt that contains a blocked term."""
        if self._pattern is None:
            return
        for index, prompt in enumerate(prompts):
            if self._pattern.search(normalise(prompt)):
                metrics.POLICY_REJECTIONS.labels(endpoint).inc()
                raise BlockedPrompt(index)
