from collections.abc import Iterator

import pytest

from tests.fakes import FakeGemini


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    with FakeGemini().serve() as fake:
        yield fake
