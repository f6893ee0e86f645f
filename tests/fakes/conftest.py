from collections.abc import Iterator

import pytest

from tests.fakes import FakeAnthropic, FakeGemini, FakeOpenAI


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().serve() as fake:
        yield fake


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic().serve() as fake:
        yield fake


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    with FakeGemini().serve() as fake:
        yield fake
