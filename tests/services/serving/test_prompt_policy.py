import pytest

from server.services.errors import BlockedPrompt
from server.services.serving.prompt_policy import PromptPolicy, read_terms
from tests.support.metrics import metric


@pytest.mark.parametrize(
    "prompt",
    [
        "Tell me about Forbidden things",
        "FORBIDDEN",
        "ｆｏｒｂｉｄｄｅｎ fruit",
        "a (forbidden) word",
        "two  words\tapart here",
        "The ﬁnal one",
    ],
)
def test_a_term_matches_case_insensitively_on_word_boundaries_after_nfkc(prompt):
    policy = PromptPolicy(["forbidden", "two words", "final"])
    with pytest.raises(BlockedPrompt) as blocked:
        policy.check("generate", ["fine", prompt])
    assert blocked.value.index == 1


@pytest.mark.parametrize("prompt", ["unforbiddenly", "forbiddens", "two", "finale"])
def test_a_term_inside_a_longer_word_does_not_match(prompt):
    PromptPolicy(["forbidden", "two words", "final"]).check("generate", [prompt])


def test_no_terms_blocks_nothing():
    PromptPolicy([]).check("generate", ["anything at all"])


def test_terms_come_from_a_list_or_a_file(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("# one per line\nalpha\n\n  beta gamma  \n", encoding="utf-8")
    assert read_terms(f"@{terms}") == ["alpha", "beta gamma"]
    assert read_terms(" alpha, beta ,,") == ["alpha", "beta"]
    assert read_terms("") == []


async def test_a_blocked_prompt_is_a_400_before_any_model_work(app_client):
    runtime = app_client.app.state.runtime
    runtime.generation.policy = PromptPolicy(["secret plan"])
    computed = metric("model_items_total", model="generator")
    rejected = metric("policy_rejections_total", endpoint="generate")
    response = await app_client.post(
        "/generate", json={"prompts": ["hello", "The SECRET   plan is"], "max_new_tokens": 2}
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "prompt 1 contains blocked content", "index": 1}
    assert metric("model_items_total", model="generator") == computed
    assert metric("policy_rejections_total", endpoint="generate") == rejected + 1
    assert (
        await app_client.post("/generate", json={"prompts": ["a secretive planner"], "max_new_tokens": 2})
    ).status_code == 200


def test_the_setting_names_a_missing_file(tmp_path):
    from pydantic import ValidationError

    from server.core.config import Settings

    with pytest.raises(ValidationError, match="no file"):
        Settings(_env_file=None, blocked_terms=f"@{tmp_path / 'absent.txt'}")
