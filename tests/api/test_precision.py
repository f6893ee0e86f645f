import re

from tests.support.app import serving
from tests.support.models import SCREEN

# What the loads may have done with their memory on whatever machine runs the tests (server/ml/allocator.py).
PAGES = r"\d+ of \d+ MiB moved to 2 MiB pages|nothing to move|left on 4 KiB pages|left as they are"

INT8 = {"generator_precision": "int8", "sentiment_precision": "int8"}


async def test_int8_models_answer_and_say_so_in_names_root_and_health(settings):
    async with serving(settings.model_copy(update=INT8)) as client:
        generated = await client.post("/generate", json={"prompts": ["Once upon a time"], "max_new_tokens": 4})
        predicted = await client.post("/predict", json={"texts": ["great", "awful"]})
        root = (await client.get("/")).json()["models"]
        health = (await client.get("/health")).json()["checks"]["models"]["detail"]
    assert generated.status_code == 200 and predicted.status_code == 200
    assert generated.json()[0]["model_name"] == "offline-stand-in:gpt2:int8"
    assert {item["model_name"] for item in predicted.json()} == {"offline-stand-in:distilbert:int8"}
    for models in (root, health):
        for role in ("generator", "sentiment"):
            assert models[role]["precision"] == "int8"
            assert models[role]["name"].endswith(":int8") and models[role]["revision"].endswith(":int8")
            assert models[role]["kernels"] in ("onednn", "fbgemm", "mixed")
            assert "int8: oneDNN where it beat fbgemm's int8 GEMM over" in models[role]["kernels_reason"]


async def test_fp32_on_kernels_measured_here_is_the_default_and_keeps_its_names(app_client):
    generated = await app_client.post("/generate", json={"prompts": ["Once upon a time"], "max_new_tokens": 2})
    assert generated.json()[0]["model_name"] == "offline-stand-in:gpt2"
    root = (await app_client.get("/")).json()["models"]
    assert {role: (m["precision"], m["name"]) for role, m in root.items()} == {
        "generator": ("fp32", "offline-stand-in:gpt2"),
        "sentiment": ("fp32", "offline-stand-in:distilbert"),
    }
    for model in root.values():
        assert model["kernels"] in ("onednn", "torch", "mixed")
        assert "oneDNN where it beat torch's GEMM over" in model["kernels_reason"]
        assert re.match(PAGES, model["memory_pages"])
    assert re.match(SCREEN, root["generator"]["head_screen"])
    assert root["sentiment"]["head_screen"] == "off: not a generator"


async def test_torch_kernels_are_a_setting_away(settings):
    torch_kernels = {"generator_fp32_kernels": "torch", "sentiment_fp32_kernels": "torch"}
    async with serving(settings.model_copy(update=torch_kernels)) as client:
        root = (await client.get("/")).json()["models"]
        assert (await client.post("/predict", json={"text": "great"})).status_code == 200
    assert {role: m["kernels"] for role, m in root.items()} == {"generator": "torch", "sentiment": "torch"}


async def test_one_prompt_has_one_cache_entry_per_precision(settings, redis_server):
    """Replicas sharing a Redis, one in fp32 and one in int8: neither is served the other's answers."""
    shared = settings.model_copy(update={"redis_url": redis_server.url})
    generate = {"prompts": ["Cache me per precision"], "max_new_tokens": 4}
    predict = {"text": "cache me per precision"}
    keys = {}
    for precision, overrides in (("fp32", {}), ("int8", INT8)):
        async with serving(shared.model_copy(update=overrides)) as client:
            for path, body in (("/generate", generate), ("/predict", predict)):
                first, again = [await client.post(path, json=body) for _ in range(2)]
                assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT"), (precision, path)
            keys[precision] = client.app.state.runtime.sentiment.key(predict["text"], scope=None)
    assert keys["fp32"] != keys["int8"]
