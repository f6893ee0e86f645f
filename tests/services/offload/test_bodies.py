import pytest

from server.services.errors import FieldError, InputError
from server.services.offload.bodies import SCHEMAS, check_bodies, check_model

LOC = ("body", "requests")
USER = {"role": "user", "content": "Hello"}


def refused(provider: str, kind: str, *bodies: dict | object) -> list[FieldError]:
    with pytest.raises(InputError) as caught:
        check_bodies(provider, kind, [(f"r{i}", body) for i, body in enumerate(bodies)], LOC)
    return caught.value.errors


def accepted(provider: str, kind: str, *bodies: dict) -> None:
    check_bodies(provider, kind, [(f"r{i}", body) for i, body in enumerate(bodies)], LOC)


def test_valid_bodies_of_every_schema_are_accepted():
    accepted(
        "local",
        "generate",
        {"prompt": "Once"},
        {"prompt": "Once", "max_tokens": 256, "temperature": 0.7, "top_p": 0.9, "seed": 0},
        {"prompt": "Once", "max_new_tokens": 1, "max_length": 2},
        # An int is a float too.
        {"prompt": "Once", "temperature": 1},
    )
    accepted("local", "predict", {"text": "great"})
    for provider in ("openai", "anthropic"):
        accepted(
            provider,
            "chat",
            {"messages": [USER]},
            # Fields the adapters do not read go to the provider as given.
            {"model": "m", "messages": [{"role": "system", "content": "Be brief", "name": "s"}, USER], "stop": ["x"]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "temperature": 2.0},
        )
    accepted("gemini", "chat", {"messages": [USER, {"role": "model", "content": "Hi"}], "max_tokens": 5})
    accepted("openai", "embedding", {"input": "one"}, {"input": ["one", "two"], "model": "e"})


def test_each_error_names_the_request_its_position_and_its_field():
    errors = refused(
        "local",
        "generate",
        {"prompt": "fine"},
        {"prompt": "x", "max_tokens": 257},
        {"prompt": "x", "temperature": 1.0, "colour": "red"},
    )
    assert [e.loc for e in errors] == [(*LOC, 1, "max_tokens"), (*LOC, 2, "colour")]
    assert errors[0].msg == "request 'r1': max_tokens: Input should be less than or equal to 256"
    assert errors[1].msg == "request 'r2': colour: Extra inputs are not permitted"


def test_every_error_of_a_body_is_reported_not_only_the_first():
    body = {"prompt": "x", "max_new_tokens": 0, "max_length": 1, "temperature": 5.5, "top_p": 0.0, "seed": -1}
    errors = refused("local", "generate", body)
    assert {e.loc[-1] for e in errors} == {"max_new_tokens", "max_length", "temperature", "top_p", "seed"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "max_tokens": "20"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "temperature": float("inf")}, "temperature"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "lone \ud800"}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_local_generate_is_as_strict_as_the_interactive_api(body, field):
    [error] = refused("local", "generate", body)
    assert error.loc == (*LOC, 0, field)
    assert error.msg.startswith(f"request 'r0': {field}: ")


def test_a_body_that_is_not_an_object_is_named_as_the_body():
    [error] = refused("local", "predict", ["not", "an", "object"])
    assert error.loc == (*LOC, 0)
    assert error.msg.startswith("request 'r0': body: ")


def test_local_predict_needs_exactly_a_text():
    [missing] = refused("local", "predict", {})
    assert missing.loc == (*LOC, 0, "text") and missing.msg == "request 'r0': text: Field required"
    [extra] = refused("local", "predict", {"text": "ok", "prompt": "no"})
    assert extra.loc == (*LOC, 0, "prompt")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"messages": []}, ("messages",)),
        ({}, ("messages",)),
        ({"messages": [{"role": "tool", "content": "x"}]}, ("messages", 0, "role")),
        ({"messages": [{"content": "x"}]}, ("messages", 0, "role")),
        ({"messages": [USER], "max_tokens": 0}, ("max_tokens",)),
        ({"messages": [USER], "max_tokens": "5"}, ("max_tokens",)),
        ({"messages": [USER], "temperature": 2.5}, ("temperature",)),
        ({"messages": [USER], "top_p": 0}, ("top_p",)),
        ({"messages": [USER], "top_p": float("nan")}, ("top_p",)),
    ],
)
def test_chat_bodies_are_refused_for_what_the_adapters_read(provider, body, loc):
    errors = refused(provider, "chat", body)
    assert [e.loc for e in errors] == [(*LOC, 0, *loc)]
    assert errors[0].msg.startswith(f"request 'r0': {'.'.join(map(str, loc))}: ")


def test_a_chat_message_content_is_text_or_a_list_of_parts():
    errors = refused("openai", "chat", {"messages": [USER, {"role": "user", "content": 5}]})
    assert errors and all(e.loc[: len(LOC) + 4] == (*LOC, 0, "messages", 1, "content") for e in errors)


def test_gemini_takes_only_the_fields_its_adapter_reads():
    [extra] = refused("gemini", "chat", {"messages": [USER], "model": "g"})
    assert extra.loc == (*LOC, 0, "model") and "Extra inputs are not permitted" in extra.msg
    [parts] = refused("gemini", "chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert parts.loc == (*LOC, 0, "messages", 0, "content")
    [role] = refused("gemini", "chat", {"messages": [{"role": "tool", "content": "x"}]})
    assert role.loc == (*LOC, 0, "messages", 0, "role")


@pytest.mark.parametrize("body", [{"input": []}, {"input": ""}, {"input": ["one", ""]}, {"input": 5}, {}])
def test_an_embedding_needs_a_non_empty_input(body):
    errors = refused("openai", "embedding", body)
    assert errors and all(e.loc[: len(LOC) + 2] == (*LOC, 0, "input") for e in errors)


def test_a_refused_embedding_input_is_located_by_its_position_in_the_list():
    [error] = refused("openai", "embedding", {"input": ["one", ""]})
    assert error.loc == (*LOC, 0, "input", 1)


@pytest.mark.parametrize("content", [5, None, ["text"], {"type": "text"}])
def test_a_message_content_neither_text_nor_parts_is_one_error_at_the_content(content):
    [error] = refused("openai", "chat", {"messages": [{"role": "user", "content": content}]})
    assert error.loc == (*LOC, 0, "messages", 0, "content")
    assert error.msg == (
        "request 'r0': messages.0.content: Input should be a string or a list of content parts (objects)"
    )


def test_message_text_follows_the_storable_string_rules():
    [error] = refused("anthropic", "chat", {"messages": [{"role": "user", "content": "a\x00b"}]})
    assert error.loc == (*LOC, 0, "messages", 0, "content")
    assert "NUL" in error.msg


def test_kinds_without_a_schema_are_left_to_the_registry():
    check_bodies("anthropic", "embedding", [("r0", {"anything": object()})], LOC)
    check_bodies("mistral", "chat", [("r0", {})], LOC)
    assert ("anthropic", "embedding") not in SCHEMAS


def test_a_local_generate_job_must_name_a_served_model():
    served = frozenset({"gpt2", "/models/gpt2"})
    check_model("local", "generate", "gpt2", served, ("body", "model"))
    check_model("local", "generate", "/models/gpt2", served, ("body", "model"))
    with pytest.raises(InputError) as caught:
        check_model("local", "generate", "llama", served, ("body", "model"))
    [error] = caught.value.errors
    assert error.loc == ("body", "model")
    assert error.msg == "model 'llama' is not served here: use /models/gpt2 or gpt2 (GET /v1/models)"


@pytest.mark.parametrize(("provider", "kind"), [("local", "predict"), ("openai", "chat"), ("gemini", "chat")])
def test_the_model_is_only_checked_for_local_generate_jobs(provider, kind):
    check_model(provider, kind, "anything", frozenset({"gpt2"}), ("body", "model"))
