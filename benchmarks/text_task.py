"""A synthetic text task with ground truth: each sequence holds one key token whose identity
is its class, so the right token-level explanation is known (the key's position)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VOCAB = 48
LENGTH = 16
CLASSES = 4
PAD = 0  # reserved: never a key nor a distractor, the neutral token the deletion curves insert
KEYS = (1, 2, 3, 4)  # key token of class c is KEYS[c]
DISTRACTORS = (5, VOCAB)  # [low, high) ids of the filler tokens
WEIGHTS = Path(__file__).resolve().parents[1] / "libragrad_fx" / "digits" / "weights"
NAMES = ("encoder", "decoder")


def make_sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (n, T) long, labels (n,), evidence (n, T) bool): random distractors with one
    key at a random position; the same seed gives the same sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(*DISTRACTORS, (n, LENGTH), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    where = torch.randint(0, LENGTH, (n,), generator=g)
    rows = torch.arange(n)
    ids[rows, where] = torch.tensor(KEYS)[labels]
    evidence = torch.zeros(n, LENGTH, dtype=torch.bool)
    evidence[rows, where] = True
    return ids, labels, evidence


def build_text_model(name: str) -> nn.Module:
    """The untrained model ``name`` ("encoder": BERT, "decoder": Llama) from its config."""
    import transformers as tf
    from transformers.models.bert import modeling_bert
    from transformers.models.llama import modeling_llama

    # the classes are looked up on their modules at call time, so a model built after LXT
    # patched a module (benchmarks.text_peer) gets the patched classes
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, num_labels=CLASSES, pad_token_id=PAD)
    if name == "encoder":
        config = tf.BertConfig(max_position_embeddings=LENGTH, **common)
        config._attn_implementation = "eager"
        return modeling_bert.BertForSequenceClassification(config)
    if name == "decoder":
        config = tf.LlamaConfig(max_position_embeddings=LENGTH, num_key_value_heads=4, **common)
        config._attn_implementation = "eager"
        return modeling_llama.LlamaForSequenceClassification(config)
    raise ValueError(f"unknown text model {name!r}; one of {NAMES}")


def weights_path(name: str) -> Path:
    return WEIGHTS / f"text_{name}.safetensors"


def load_text_model(name: str) -> nn.Module:
    """The shipped trained model ``name``, in eval mode."""
    from safetensors.torch import load_file

    model = build_text_model(name)
    model.load_state_dict(load_file(str(weights_path(name))))
    return model.eval()


def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
