"""Small, randomly initialised stand-in models, built locally and deterministically (no network).

They exist so that the server runs (and its tests pass) on machines that cannot reach the model hub.
Their outputs are meaningless; `STANDIN_MARKER` in the model directory tells the loader to say so.
"""

import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    PreTrainedTokenizerFast,
)

STANDIN_MARKER = "offline_standin.json"
CORPUS = Path(__file__).with_name("standin_corpus.txt")
EOS = "<|endoftext|>"
GPT2_124M = {"n_embd": 768, "n_layer": 12, "n_head": 12}
TINY_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 2}
DISTILBERT_BASE = {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072}
TINY_DISTILBERT = {"dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128}


def _train_bpe(vocab_size: int, special_tokens: list[str]) -> ByteLevelBPETokenizer:
    bpe = ByteLevelBPETokenizer()
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    # show_progress=False: its bars print blank lines into the server's log at the first start.
    bpe.train_from_iterator(
        lines, vocab_size=vocab_size, min_frequency=1, special_tokens=special_tokens, show_progress=False
    )
    return bpe


def standin_marker_exists(directory: Path) -> bool:
    return (directory / STANDIN_MARKER).exists()


def _mark(directory: Path, kind: str, source: str) -> None:
    (directory / STANDIN_MARKER).write_text(json.dumps({"kind": kind, "stands_in_for": source}, indent=2))


def build_generator(
    directory: Path, *, architecture: dict[str, int] | None = None, stands_in_for: str = "gpt2", seed: int = 0
) -> Path:
    """Write a GPT-2 model with random weights and a locally trained byte-level BPE tokenizer.

    `architecture` overrides the tiny default; `GPT2_124M` gives GPT-2's own compute (the vocabulary is then
    GPT-2's 50257 rows, whatever the tokenizer's size, so the LM head costs what the real one does).
    """
    directory.mkdir(parents=True, exist_ok=True)
    bpe = _train_bpe(vocab_size=600, special_tokens=[EOS])
    tokenizer = GPT2Tokenizer(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    shape = architecture or TINY_GPT2
    vocab_size = 50257 if architecture else len(tokenizer)
    torch.manual_seed(seed)
    # transformers types **kwargs as any of the config's parameters; `shape` holds only its int sizes.
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=1024,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,  # type: ignore[arg-type]
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _mark(directory, "generator", stands_in_for)
    return directory


def build_classifier(
    directory: Path, *, architecture: dict[str, int] | None = None, stands_in_for: str = "distilbert", seed: int = 0
) -> Path:
    """Write a DistilBERT sentiment classifier (labels NEGATIVE/POSITIVE) with random weights, tiny unless
    `architecture` (`DISTILBERT_BASE`: the compute of the default sentiment model, its 30522-row vocabulary too)."""
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bpe = _train_bpe(vocab_size=600, special_tokens=specials)
    backend = bpe._tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    torch.manual_seed(seed)
    # As for GPT2Config: the architecture holds only the config's int sizes.
    config = DistilBertConfig(
        vocab_size=30522 if architecture else len(tokenizer),
        **(architecture or TINY_DISTILBERT),  # type: ignore[arg-type]
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    DistilBertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _mark(directory, "classifier", stands_in_for)
    return directory


def build_standins(root: Path, generator_for: str = "gpt2", classifier_for: str = "distilbert") -> tuple[Path, Path]:
    """Both stand-ins under `root` (normally `models_cache/offline/`)."""
    return (
        build_generator(root / "generator", stands_in_for=generator_for),
        build_classifier(root / "classifier", stands_in_for=classifier_for),
    )
