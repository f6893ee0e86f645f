from server.api.pagination import encode_cursor


async def test_history_is_newest_first_and_pages_by_cursor_and_offset(client):
    for i in range(5):
        await client.post("/generate", json={"prompts": [f"prompt {i}"], "max_new_tokens": 2})
    await client.app.state.runtime.recorder.flush()
    first = (await client.get("/history", params={"limit": 2})).json()
    assert [item["prompt"] for item in first["items"]] == ["prompt 4", "prompt 3"]
    second = (await client.get("/history", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [item["prompt"] for item in second["items"]] == ["prompt 2", "prompt 1"]
    last = (await client.get("/history", params={"limit": 2, "cursor": second["next_cursor"]})).json()
    assert [item["prompt"] for item in last["items"]] == ["prompt 0"] and last["next_cursor"] is None
    by_offset = (await client.get("/history", params={"limit": 2, "offset": 3})).json()
    assert [item["prompt"] for item in by_offset["items"]] == ["prompt 1", "prompt 0"]
    item = first["items"][0]
    assert item["params"] == {"max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0, "seed": None}
    assert item["usage"]["completion_tokens"] == 2 and item["created_at"].endswith("Z")


async def test_history_items_use_the_field_names_of_the_answers(client):
    [answer] = (await client.post("/generate", json={"prompts": ["same names"], "max_new_tokens": 2})).json()
    prediction = (await client.post("/predict", json={"text": "so good"})).json()
    await client.app.state.runtime.recorder.flush()
    [stored] = (await client.get("/history")).json()["items"]
    assert stored["kind"] == "generation"
    for field in ("id", "prompt", "generated_text", "completion", "model_name", "finish_reason", "usage", "cached"):
        assert stored[field] == answer[field], field
    [stored_prediction] = (await client.get("/history", params={"kind": "predictions"})).json()["items"]
    assert stored_prediction["kind"] == "prediction"
    for field in ("id", "text", "label", "score", "model_name", "cached"):
        assert stored_prediction[field] == prediction[field], field
    assert (await client.get(f"/history/{answer['id']}")).json() == stored
    assert (await client.get(f"/history/{prediction['id']}")).json() == stored_prediction
    missing = await client.get("/history/0123456789abcdef")
    assert missing.status_code == 404 and "0123456789abcdef" in missing.json()["detail"]


async def test_bad_paging_parameters_are_422(client):
    for params in (
        {"limit": 0},
        {"limit": 1000},
        {"cursor": "abc"},
        # A row id is not a cursor: cursors are the opaque tokens every list of this API hands out.
        {"cursor": "5"},
        {"cursor": encode_cursor("0")},
        {"cursor": encode_cursor("1e3")},
        {"cursor": encode_cursor("2026-01-01T00:00:00", "job-id")},
        {"offset": -1},
        {"cursor": encode_cursor("5"), "offset": 0},
        {"kind": "everything"},
    ):
        assert (await client.get("/history", params=params)).status_code == 422
