from server.services.cache.keys import cache_key


def test_parameter_order_does_not_matter():
    a = cache_key("generate", "gpt2", "rev1", [1, 2, 3], {"temperature": 0.0, "max_new_tokens": 5})
    b = cache_key("generate", "gpt2", "rev1", [1, 2, 3], {"max_new_tokens": 5, "temperature": 0.0})
    assert a == b


def test_every_output_changing_part_changes_the_key():
    base = cache_key("generate", "gpt2", "rev1", [1, 2, 3], {"max_new_tokens": 5})
    assert base != cache_key("generate", "gpt2", "rev2", [1, 2, 3], {"max_new_tokens": 5})
    assert base != cache_key("generate", "gpt2-medium", "rev1", [1, 2, 3], {"max_new_tokens": 5})
    assert base != cache_key("generate", "gpt2", "rev1", [1, 2, 4], {"max_new_tokens": 5})
    assert base != cache_key("generate", "gpt2", "rev1", [1, 2, 3], {"max_new_tokens": 6})
    assert base != cache_key("predict", "gpt2", "rev1", [1, 2, 3], {"max_new_tokens": 5})


def test_text_inputs_are_unicode_normalised_by_the_caller_contract():
    from server.services.cache.keys import normalise_text

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    assert cache_key("predict", "m", "r", normalise_text(composed), {}) == cache_key(
        "predict", "m", "r", normalise_text(decomposed), {}
    )
    assert normalise_text("Hello ") != normalise_text("hello")
