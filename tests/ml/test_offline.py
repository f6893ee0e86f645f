from safetensors.torch import load_file
from transformers import AutoConfig

from server.ml.offline import DISTILBERT_BASE, GPT2_124M, build_classifier, build_generator


def test_stand_ins_are_deterministic(tmp_path):
    a = load_file(build_generator(tmp_path / "a") / "model.safetensors")
    b = load_file(build_generator(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_classifier_stand_in_has_sentiment_labels(tmp_path):
    config = AutoConfig.from_pretrained(build_classifier(tmp_path / "c"))
    assert set(config.id2label.values()) == {"NEGATIVE", "POSITIVE"}


def test_benchmark_architecture_has_gpt2_124m_compute(tmp_path):
    config = AutoConfig.from_pretrained(build_generator(tmp_path / "g", architecture=GPT2_124M))
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.n_positions) == (
        12,
        768,
        12,
        50257,
        1024,
    )


def test_benchmark_classifier_has_distilbert_base_compute(tmp_path):
    config = AutoConfig.from_pretrained(build_classifier(tmp_path / "c", architecture=DISTILBERT_BASE))
    assert (config.n_layers, config.dim, config.n_heads, config.hidden_dim, config.vocab_size) == (
        6,
        768,
        12,
        3072,
        30522,
    )
