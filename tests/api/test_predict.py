import asyncio

from tests.api.gates import Gate, until_queued


async def test_single_text_gives_one_object(app_client):
    response = await app_client.post("/predict", json={"text": "I love this"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "text", "label", "score", "model_name", "created_at", "cached"}
    assert body["label"] in {"POSITIVE", "NEGATIVE"} and 0.5 <= body["score"] <= 1.0
    assert body["model_name"].startswith("offline-stand-in:")


async def test_texts_give_a_list_in_order_matching_the_model(app_client):
    classifier = app_client.app.state.runtime.classifier
    texts = ["great", "awful", "fine, I guess"]
    body = (await app_client.post("/predict", json={"texts": texts})).json()
    assert [item["text"] for item in body] == texts
    direct = classifier.classify(texts)
    assert [(item["label"], round(item["score"], 5)) for item in body] == [(d.label, round(d.score, 5)) for d in direct]


async def test_concurrent_texts_share_batches_and_duplicates_are_computed_once(app_client):
    runtime = app_client.app.state.runtime
    gate = Gate(runtime.sentiment.batcher)
    first = asyncio.create_task(app_client.post("/predict", json={"text": "warm up"}))
    await gate.wait_entered()
    requests = [asyncio.create_task(app_client.post("/predict", json={"texts": [f"text {i % 5}"]})) for i in range(20)]
    await until_queued(runtime.sentiment.batcher, 5)
    gate.open.set()
    assert [r.status_code for r in await asyncio.gather(*requests)] == [200] * 20
    await first
    assert [sorted(batch) for batch in gate.batches] == [["warm up"], [f"text {i}" for i in range(5)]]


async def test_bad_input_is_422(app_client):
    for body in (
        {},
        {"text": "a", "texts": ["b"]},
        {"text": ""},
        {"texts": []},
        {"texts": ["x"] * 65},
        {"text": 3},
        {"text": "y" * 5000},
    ):
        assert (await app_client.post("/predict", json=body)).status_code == 422, body
