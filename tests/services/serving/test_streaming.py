"""Streamed text is never taken back: what may still change (an incomplete UTF-8 character, a possible start of a
stop string) is held until it cannot, a prompt's chunks add up to its completion, and each token is reported once."""

import asyncio

import pytest

from server.ml.sampling import TokenLogprob
from server.services.serving.streaming import GenerationStream, IncrementalText, ItemDone, TextChunk

# A byte-level vocabulary: "é" is two tokens (0xC3 0xA9), so a prefix of it is an incomplete character.
VOCAB: dict[int, bytes] = {
    1: b"Hel",
    2: b"lo",
    3: b" wor",
    4: b"ld",
    5: b"\xc3",
    6: b"\xa9",
    7: b"\n",
    8: b"#",
    9: b"##",
    10: b"!",
}


def decode(tokens: list[int]) -> str:
    return b"".join(VOCAB[t] for t in tokens).decode("utf-8", errors="replace")


def pushed(text: IncrementalText, tokens: list[int]) -> list[tuple[str, list[int]]]:
    out = []
    for token in tokens:
        if released := text.push([token], []):
            out.append((released[0], released[1]))
    return out


def test_settled_text_is_released_as_it_grows_and_adds_up_to_the_completion():
    text = IncrementalText(decode)
    assert pushed(text, [1, 2, 3, 4]) == [("Hel", [1]), ("lo", [2]), (" wor", [3]), ("ld", [4])]
    assert text.finish([1, 2, 3, 4], "Hello world", None) is None


def test_an_incomplete_character_is_held_until_its_last_byte_arrives():
    """Its token is reported at once (the client counts tokens); its text waits for the character to be whole."""
    text = IncrementalText(decode)
    assert pushed(text, [1, 5]) == [("Hel", [1]), ("", [5])]
    assert text.push([6], []) == ("é", [6], [])


def test_a_possible_start_of_a_stop_string_is_held_and_released_once_it_is_not_one():
    text = IncrementalText(decode, stops=["###"])
    assert pushed(text, [1, 8]) == [("Hel", [1]), ("", [8])]
    assert text.push([2], []) == ("#lo", [2], [])


def test_text_from_a_stop_string_on_is_never_sent():
    text = IncrementalText(decode, stops=["\n\n", "###"])
    sent = "".join(chunk for chunk, _ in pushed(text, [1, 2, 8, 9, 3, 4]))
    assert sent == "Hello"
    assert text.finish([1, 2, 8, 9], "Hello", None) is None


def test_the_finish_sends_the_held_text_and_the_tokens_not_reported_yet():
    text = IncrementalText(decode, stops=["###"])
    assert "".join(chunk for chunk, _ in pushed(text, [1, 2, 8])) == "Hello"
    assert text.finish([1, 2, 8, 10], "Hello#!", None) == ("#!", [10], [])


def test_the_finish_of_a_cached_answer_sends_the_whole_text_in_one_chunk():
    text = IncrementalText(decode)
    rest = text.finish([1, 2], "Hello", None)
    assert rest is not None and rest[:2] == ("Hello", [1, 2])


def test_each_tokens_logprob_is_reported_once_with_its_token():
    text = IncrementalText(decode)
    probs = [TokenLogprob(t, -0.1 * t) for t in (1, 5, 6)]
    assert text.push([1, 5], probs[:2]) == ("Hel", [1, 5], probs[:2])
    assert text.push([6], probs[2:]) == ("é", [6], probs[2:])
    assert text.finish([1, 5, 6], "Helé", probs) is None


async def test_events_come_per_prompt_in_order_and_end_with_each_prompts_result():
    stream = GenerationStream(2, decode, ())

    async def request() -> None:
        stream.admitted.set()
        stream.tokens(0, [1], [])
        stream.tokens(1, [3], [])
        stream.tokens(0, [2], [])
        stream.done(1, [3, 4], " world", result="r1")
        stream.done(0, [1, 2], "Hello", result="r0")

    await stream.started(asyncio.create_task(request()))
    events = [event async for event in stream.events()]
    for index, completion, result in ((0, "Hello", "r0"), (1, " world", "r1")):
        mine = [event for event in events if event.index == index]
        assert all(isinstance(event, TextChunk) for event in mine[:-1])
        assert "".join(event.text for event in mine[:-1] if isinstance(event, TextChunk)) == completion
        assert mine[-1] == ItemDone(index, result)


async def test_a_request_refused_before_admission_raises_from_started():
    stream = GenerationStream(1, decode, ())

    async def refused() -> None:
        raise OverflowError("queue full")

    with pytest.raises(OverflowError, match="queue full"):
        await stream.started(asyncio.create_task(refused()))


async def test_a_failure_after_admission_ends_the_events_with_the_error():
    stream = GenerationStream(1, decode, ())

    async def failing() -> None:
        stream.admitted.set()
        stream.tokens(0, [1], [])
        await asyncio.sleep(0)
        raise RuntimeError("the model failed")

    await stream.started(asyncio.create_task(failing()))
    received = []
    with pytest.raises(RuntimeError, match="the model failed"):
        async for event in stream.events():
            received.append(event)
    assert received == [TextChunk(0, "Hel", [1])]


async def test_closing_the_events_early_cancels_the_request():
    stream = GenerationStream(1, decode, ())
    cancelled = asyncio.Event()

    async def endless() -> None:
        stream.admitted.set()
        try:
            for _ in range(10_000):
                stream.tokens(0, [1], [])
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(endless())
    await stream.started(task)
    events = stream.events()
    assert isinstance(await anext(events), TextChunk)
    await events.aclose()
    await asyncio.wait_for(cancelled.wait(), 30)
    assert task.cancelled() or task.done()
