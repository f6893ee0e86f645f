"""A streamed generation request: token chunks per prompt as they are decoded, then each prompt's final answer.

Events come in order for each prompt (`index`): `TextChunk`s, then one `ItemDone`; prompts interleave. A chunk's
text is never taken back: text that may still change is held until it cannot: an incomplete UTF-8 character at
the end, or an ending that could be the start of a stop string. The chunks of a prompt add up to its completion.
Prompts answered from the cache (or computed without token streaming) send their whole text in one chunk.
A chunk carries the log-probabilities of its tokens when the request asked for them.
"""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from server.ml.sampling import TokenLogprob


@dataclass(frozen=True)
class TextChunk:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ItemDone:
    index: int
    result: object


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


StreamEvent = TextChunk | ItemDone


@dataclass
class IncrementalText:
    """The text of a growing list of tokens, released only once it is final (see the module's docstring)."""

    decode: Callable[[list[int]], str]
    stops: Sequence[str] = ()
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_tokens: int = 0
    sent: str = ""

    def _settled(self, text: str) -> str:
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            return text[: min(cuts)]
        text = text.rstrip("\ufffd")
        held = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return text[: len(text) - held]

    def _release(self, text: str) -> tuple[str, list[int], list[TokenLogprob]] | None:
        new_tokens = self.tokens[self.sent_tokens :]
        fresh = text[len(self.sent) :] if text.startswith(self.sent) else ""
        if not fresh and not new_tokens:
            return None
        self.sent += fresh
        new_logprobs = self.logprobs[self.sent_tokens :]
        self.sent_tokens = len(self.tokens)
        return fresh, new_tokens, new_logprobs

    def push(
        self, token_ids: list[int], logprobs: list[TokenLogprob]
    ) -> tuple[str, list[int], list[TokenLogprob]] | None:
        """New settled text, and the tokens (with their log-probabilities, if reported) not reported yet, if any."""
        self.tokens.extend(token_ids)
        self.logprobs.extend(logprobs)
        return self._release(self._settled(self.decode(self.tokens)))

    def finish(
        self, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None
    ) -> tuple[str, list[int], list[TokenLogprob]] | None:
        """The rest of the final answer (its tokens and text) not sent yet."""
        if len(token_ids) >= len(self.tokens):
            self.tokens = list(token_ids)
            self.logprobs = list(logprobs or ())
        return self._release(text)


class GenerationStream:
    """The events of one streamed request. The service feeds it (`tokens`, `done`, `admitted`); the HTTP layer
    iterates `events()` once `started()` returned."""

    def __init__(self, count: int, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.texts = [IncrementalText(decode, stops) for _ in range(count)]
        self.admitted = asyncio.Event()
        self._queue: asyncio.Queue[StreamEvent | _End] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def tokens(self, index: int, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        if chunk := self.texts[index].push(token_ids, logprobs):
            self._queue.put_nowait(TextChunk(index, *chunk))

    def done(
        self, index: int, token_ids: list[int], text: str, result: object, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        if chunk := self.texts[index].finish(token_ids, text, logprobs):
            self._queue.put_nowait(TextChunk(index, *chunk))
        self._queue.put_nowait(ItemDone(index, result))

    async def started(self, task: asyncio.Task) -> None:
        """Wait until the request was admitted (or raise why it was not): errors before this are plain HTTP
        errors, errors after it are events of the stream."""
        self._task = task
        task.add_done_callback(lambda t: self._queue.put_nowait(_End(None if t.cancelled() else t.exception())))
        admitted = asyncio.ensure_future(self.admitted.wait())
        try:
            await asyncio.wait({admitted, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            admitted.cancel()
        if task.done() and not self.admitted.is_set():
            task.result()

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Every event, then raise the request's error if it failed; closing the iterator cancels the request."""
        try:
            while not isinstance(event := await self._queue.get(), _End):
                yield event
            if event.error is not None:
                raise event.error
        finally:
            if self._task is not None and not self._task.done():
                self._task.cancel()
