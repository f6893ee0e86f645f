"""OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, over the same services as
/generate (cache, limits, API keys, records), answering in OpenAI's shapes, errors included."""
