"""The batch providers, named once: the paid ones (external batch APIs, which keys must be granted) and `local`
(our own models when idle), with the kinds of request each one's API takes. Adding a provider starts here
(docs/development.md)."""

from typing import Literal, get_args

PaidProvider = Literal["openai", "anthropic", "gemini"]
Provider = Literal[PaidProvider, "local"]
PAID_PROVIDERS: tuple[str, ...] = get_args(PaidProvider)
LOCAL = "local"
PROVIDERS: tuple[str, ...] = (LOCAL, *PAID_PROVIDERS)
KINDS: dict[str, tuple[str, ...]] = {
    LOCAL: ("generate", "predict"),
    "openai": ("chat", "embedding"),
    "anthropic": ("chat",),
    "gemini": ("chat",),
}
