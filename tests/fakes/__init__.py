"""Fake OpenAI, Anthropic and Gemini servers speaking the real wire formats, for tests that drive the official SDKs
through their base URLs: `with FakeOpenAI().serve() as fake: OpenAI(base_url=f"{fake.base_url}/v1", ...)`."""

from tests.fakes.anthropic_batch import FakeAnthropic
from tests.fakes.behaviour import BatchBehaviour
from tests.fakes.gemini import FakeGemini, GeminiSettings
from tests.fakes.openai_batch import FakeOpenAI

__all__ = ["BatchBehaviour", "FakeAnthropic", "FakeGemini", "FakeOpenAI", "GeminiSettings"]
