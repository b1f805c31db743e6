"""Hugging Face models from tiny random configs (no downloads), one builder table for the tests.

Each entry builds the model as a user has it (eval mode, the class transformers ships) and the
keyword input it is explained on: ``inputs_embeds`` for text, ``pixel_values`` for vision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=100, max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2, head_dim=8)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=32, patch_size=8)
TOKENS = 5  # sequence length of the text inputs
BATCH = 1  # batch 1 exports once (static); tests of a symbolic batch ask for 2


@dataclass(frozen=True)
class Entry:
    """A model family: how to build it, which input names it takes, which attentions it has."""

    name: str
    build: Callable[[str], nn.Module]  # attn_implementation -> eval model
    input_name: str
    attentions: tuple[str, ...] = ("eager", "sdpa")

    def model(self, attn: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(0)
        model = self.build(attn).eval().to(dtype)
        _perturb(model)  # HF zero-initialises biases: nonzero ones exercise the bias terms
        return model

    def example(self, model: nn.Module, batch: int = BATCH,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        if self.input_name == "pixel_values":
            channels = model.config.num_channels if hasattr(model.config, "num_channels") else 3
            size = getattr(model.config, "image_size", 32)
            return torch.randn(batch, channels, size, size, generator=g, dtype=dtype)
        width = model.get_input_embeddings().embedding_dim
        return torch.randn(batch, TOKENS, width, generator=g, dtype=dtype)


@torch.no_grad()
def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith("bias") or p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _hf(cls_name: str, config_name: str, **config) -> Callable[[str], nn.Module]:
    def build(attn: str) -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, cls_name)._from_config(cfg, attn_implementation=attn)

    return build


def _clip_image_features(attn: str) -> nn.Module:
    import transformers

    cfg = transformers.CLIPConfig(text_config=dict(TEXT), vision_config=dict(VISION),
                                  projection_dim=16)
    return _ImageFeatures(transformers.CLIPModel._from_config(cfg, attn_implementation=attn))


class _ImageFeatures(nn.Module):
    """CLIPModel.get_image_features as a forward (the method a user calls on pixel_values)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config.vision_config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values)


_BERT = dict(TEXT, type_vocab_size=2)
_SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
             window_size=4, num_labels=10)
_CONVNEXT = dict(image_size=32, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
                 num_stages=2)

ENTRIES: tuple[Entry, ...] = (
    Entry("llama", _hf("LlamaForCausalLM", "LlamaConfig", **DECODER), "inputs_embeds"),
    Entry("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **DECODER), "inputs_embeds"),
    Entry("mistral", _hf("MistralForCausalLM", "MistralConfig", **DECODER, sliding_window=None),
          "inputs_embeds"),
    Entry("gemma", _hf("GemmaForCausalLM", "GemmaConfig", **DECODER), "inputs_embeds"),
    Entry("gemma2", _hf("Gemma2ForCausalLM", "Gemma2Config", **DECODER, query_pre_attn_scalar=8,
                        sliding_window=4), "inputs_embeds"),
    Entry("gemma3", _hf("Gemma3ForCausalLM", "Gemma3TextConfig", **DECODER,
                        query_pre_attn_scalar=8, sliding_window=4), "inputs_embeds"),
    Entry("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4,
                      n_inner=64, vocab_size=100, n_positions=64), "inputs_embeds"),
    Entry("bert", _hf("BertForSequenceClassification", "BertConfig", **_BERT, num_labels=3),
          "inputs_embeds"),
    Entry("roberta", _hf("RobertaForSequenceClassification", "RobertaConfig", **_BERT,
                         num_labels=3, pad_token_id=1), "inputs_embeds"),
    Entry("vit", _hf("ViTForImageClassification", "ViTConfig", **VISION, num_labels=10),
          "pixel_values"),
    Entry("deit", _hf("DeiTForImageClassification", "DeiTConfig", **VISION, num_labels=10),
          "pixel_values"),
    Entry("beit", _hf("BeitForImageClassification", "BeitConfig", **VISION, num_labels=10),
          "pixel_values"),
    Entry("dinov2", _hf("Dinov2Model", "Dinov2Config", **VISION), "pixel_values"),
    Entry("clip_vision", _hf("CLIPVisionModel", "CLIPVisionConfig", **VISION), "pixel_values"),
    Entry("clip_image_features", _clip_image_features, "pixel_values"),
    Entry("siglip", _hf("SiglipVisionModel", "SiglipVisionConfig", **VISION), "pixel_values"),
    Entry("swin", _hf("SwinForImageClassification", "SwinConfig", **_SWIN), "pixel_values",
          attentions=("eager",)),
    Entry("convnext", _hf("ConvNextForImageClassification", "ConvNextConfig", **_CONVNEXT),
          "pixel_values", attentions=("eager",)),
)
BY_NAME = {e.name: e for e in ENTRIES}
# CLIPTextModel has no ``inputs_embeds``: its forward pools at the end-of-text id, so it needs the
# ids (test_hf checks the error says so).
CLIP_TEXT = Entry("clip_text", _hf("CLIPTextModel", "CLIPTextConfig", **TEXT), "inputs_embeds")
CASES = [(e.name, a) for e in ENTRIES for a in e.attentions]
