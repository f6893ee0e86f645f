"""Adapters for the external AI providers' APIs (OpenAI, Anthropic, Gemini), behind one protocol (`base`)."""
