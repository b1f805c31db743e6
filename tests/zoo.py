"""Models the tests and golden graphs use, built with random weights (no downloads)."""

from __future__ import annotations

import logging

import torch
from torch import nn

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that weights are random


class ClipTextFromEmbeddings(nn.Module):
    """open_clip ``CLIP.encode_text`` from the token embeddings on (argmax pooling).

    The EOT positions (argmax of a fixed token tensor) are held as a buffer, so the module is a
    function of the embeddings only.
    """

    def __init__(self, clip: nn.Module, tokens: torch.Tensor) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        self.register_buffer("rows", torch.arange(tokens.shape[0]), persistent=False)
        self.register_buffer("eot", tokens.argmax(dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[self.rows, self.eot]
        return x @ self.text_projection


def clip_tokens(batch: int = 1, length: int = 77, seed: int = 0) -> torch.Tensor:
    """Fixed token ids with an EOT (the largest id) at a known position per row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (batch, length), generator=g)
    tokens[:, 0] = 49406
    for i in range(batch):
        tokens[i, 5 + 3 * i] = 49407
        tokens[i, 6 + 3 * i:] = 0
    return tokens


def timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs).eval()


def clip_model(name: str = "ViT-B-32") -> nn.Module:
    import open_clip

    return open_clip.create_model(name, pretrained=None).eval()


def clip_text_tower(name: str = "ViT-B-32", batch: int = 1) -> ClipTextFromEmbeddings:
    return ClipTextFromEmbeddings(clip_model(name), clip_tokens(batch)).eval()
