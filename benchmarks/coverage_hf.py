"""Hugging Face models for the coverage sweep, each built from a tiny random config.

Every ``*ForImageClassification``, ``*ForSequenceClassification`` and ``*ForCausalLM`` class of
transformers' auto mappings is built from its config class's defaults with every common size
attribute that exists shrunk (``shrunk_kwargs``), recursively into sub-configs; where that does
not build, a gentler shrink is tried, then per-family overrides (``OVERRIDES``). A class whose
tiny model cannot be built and run within ``BUILD_BUDGET`` seconds is reported as "no small
config", not as a failure of libra_transform. Text models are called on ``inputs_embeds``
(batch 1, ``TOKENS`` tokens), vision models on ``pixel_values``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from typing import Any

import torch
from torch import Tensor, nn

TOKENS = 8
VOCAB = 256
BUILD_BUDGET = 60.0  # seconds for all the attempts of one class
MAX_PARAMS = 20_000_000  # an attempt above this is not "small"
TASKS = {"image": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
         "sequence": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
         "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"}
# The families issue 14 names: they also get an "sdpa" row where the class supports it.
NAMED = ("vit", "deit", "beit", "dinov2", "clip", "siglip", "swin", "convnext", "bert", "roberta",
         "gpt2", "llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text")

# Integer sizes: the value of the tiniest config. Lists (depths, hidden_sizes, ...) by STAGES.
SIZES = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "head_dim": 8, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "image_size": 32, "patch_size": 8, "embed_dim": 16,
    "embedding_size": 16, "projection_dim": 16, "n_embd": 32, "n_layer": 2, "n_head": 4,
    "n_inner": 64, "n_positions": 64, "n_ctx": 64, "d_model": 32, "d_ff": 64, "d_kv": 8,
    "d_inner": 64, "num_layers": 2, "num_heads": 4, "n_heads": 4, "n_layers": 2, "dim": 32,
    "hidden_dim": 64, "ffn_dim": 64, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "num_decoder_layers": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "type_vocab_size": 2, "window_size": 4, "num_groups": 4,
    "rotary_dim": 4, "n_words": VOCAB, "emb_dim": 32, "entity_vocab_size": 16,
    "entity_emb_size": 16, "mamba_n_heads": 4, "d_latents": 32, "num_latents": 8,
    "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32,
}
# Sizes a default config leaves unset (None) that some models then read anyway.
UNSET = ("head_dim", "num_key_value_heads", "n_routed_experts", "moe_intermediate_size")
# Switches that must be off on a CPU without optional kernels.
SWITCHES = {"use_mamba_kernels": False}
# Kept equal to the hidden size where the default has them equal (SqueezeBERT, ALBERT-likes).
TIED = ("embedding_size", "embed_dim", "projection_dim")
STAGES = {"depths": lambda i, v: 1, "hidden_sizes": lambda i, v: 8 * 2 ** i,
          "num_heads": lambda i, v: 1, "embed_dims": lambda i, v: 8 * 2 ** i,
          "dims": lambda i, v: 8 * 2 ** i, "num_attention_heads": lambda i, v: 1}
# Where the generic shrink fails: config kwargs per model_type, applied last.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"head_dim": 16},  # num_heads * head_dim == expand * hidden_size
    # multi-head latent attention repeats its keys per head, not per key-value group
    **{t: {"num_key_value_heads": 4} for t in ("deepseek_v2", "deepseek_v3", "longcat_flash")},
}
# Gentler attempts when the tiniest one does not build: leave these attributes at their default.
KEEP = ((), ("image_size", "patch_size"), ("image_size", "patch_size", "head_dim", "embed_dim",
                                            "hidden_sizes", "embed_dims", "dims", "dim"))


class NoSmallConfig(Exception):
    """The class could not be built and run from a small config (not libra_transform's fault)."""


@functools.lru_cache(maxsize=1)
def classes() -> dict[str, tuple[str, str]]:
    """class name -> (task, model_type), every class of the three auto mappings (once each)."""
    from transformers.models.auto import modeling_auto

    found: dict[str, tuple[str, str]] = {}
    for task, mapping in TASKS.items():
        for model_type, names in getattr(modeling_auto, mapping).items():
            for name in names if isinstance(names, tuple) else (names,):
                if name not in found or model_type in NAMED:  # llama, not code_llama
                    found[name] = (task, model_type)
    return found


def split_name(name: str) -> tuple[str, str]:
    """``"LlamaForCausalLM@sdpa"`` -> ``("LlamaForCausalLM", "sdpa")`` (eager by default)."""
    cls, _, attn = name.partition("@")
    return cls, attn or "eager"


def keys(named_sdpa: bool = True) -> list[str]:
    """Every class's key, plus an ``@sdpa`` key per class of a named family that has sdpa."""
    out = []
    for name, (_, model_type) in classes().items():
        out.append(f"hf:{name}")
        if named_sdpa and model_type in NAMED and _supports_sdpa(name):
            out.append(f"hf:{name}@sdpa")
    return out


def _supports_sdpa(name: str) -> bool:
    try:
        return bool(getattr(_model_class(name), "_supports_sdpa", False))
    except Exception:  # noqa: BLE001 - a class that does not import has no sdpa row
        return False


def _model_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def family(name: str) -> str:
    cls, _ = split_name(name)
    task, model_type = classes().get(cls, ("?", "?"))
    return f"hf/{task}:{model_type}"


def is_named(name: str) -> bool:
    return classes().get(split_name(name)[0], ("", ""))[1] in NAMED


def _shrink_list(attr: str, value: list) -> list | None:
    if attr not in STAGES or not value or not all(isinstance(v, int) for v in value):
        return None
    return [STAGES[attr](i, v) for i, v in enumerate(value)]


def shrunk_kwargs(config: Any, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """Constructor kwargs that shrink ``config`` (a default instance): every size attribute it
    has, sub-configs recursively, token ids kept inside the shrunk vocabulary."""
    from transformers import PretrainedConfig

    kwargs: dict[str, Any] = {}
    hidden = getattr(config, "hidden_size", None)
    for attr, value in vars(config).items():
        if attr in keep:
            continue
        if attr in SWITCHES:
            kwargs[attr] = SWITCHES[attr]
        elif isinstance(value, bool):
            continue
        elif attr in TIED and value == hidden and "hidden_size" not in keep:
            kwargs[attr] = SIZES["hidden_size"]
        elif attr in SIZES and isinstance(value, int) and value > SIZES[attr]:
            kwargs[attr] = SIZES[attr]
        elif attr in UNSET and value is None:
            kwargs[attr] = SIZES[attr]
        elif isinstance(value, list) and (small := _shrink_list(attr, value)) is not None:
            kwargs[attr] = small
    common = PretrainedConfig().to_dict()  # not the sub-config's own: some reject them
    for attr in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, attr, None)
        if sub is not None and hasattr(sub, "to_dict"):
            own = {k: v for k, v in sub.to_dict().items() if k not in common}
            kwargs[attr] = {**own, **shrunk_kwargs(sub, keep)}
    vocab = kwargs.get("vocab_size", getattr(config, "vocab_size", None))
    for attr, value in vars(config).items():
        if attr.endswith("token_id") and isinstance(value, int) and vocab and value >= vocab:
            kwargs[attr] = min(vocab - 1, 2)
        elif attr.endswith("token_id") and isinstance(value, list) and vocab:
            kwargs[attr] = [min(v, vocab - 1) for v in value if isinstance(v, int)] or None
    if "layer_types" in vars(config) and "num_hidden_layers" in kwargs:
        kwargs["layer_types"] = None  # derived from num_hidden_layers when None
    return kwargs


def tiny_config(name: str, keep: tuple[str, ...] = ()) -> Any:
    """The shrunk config of class ``name`` (eager attention unless ``@sdpa``)."""
    cls_name, attn = split_name(name)
    config_class = _model_class(cls_name).config_class
    kwargs = shrunk_kwargs(config_class(), keep)
    kwargs.update(OVERRIDES.get(config_class.model_type, {}))
    config = config_class(**kwargs)
    config._attn_implementation = attn
    config.use_cache = False
    return config


def example(model: nn.Module, config: Any, name: str) -> tuple[str, Tensor]:
    """The keyword and a random example input: ``pixel_values`` for image classifiers that
    take it, ``inputs_embeds`` (width of the input embedding) otherwise (ImageGPT)."""
    gen = torch.Generator().manual_seed(1)
    takes = inspect.signature(model.forward).parameters
    if classes()[split_name(name)[0]][0] == "image" and "pixel_values" in takes:
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 64)  # 64: a CNN without a size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(vision, "num_channels", 3)
        return "pixel_values", torch.randn(1, channels, *size[-2:], generator=gen)
    width = model.get_input_embeddings().weight.shape[-1]
    return "inputs_embeds", torch.randn(1, TOKENS, width, generator=gen)


class KeywordCall(nn.Module):
    """Calls ``model(**{keyword: x})`` and returns its output unchanged, so that the sweep's
    own forward calls treat an HF model as a one-tensor module. The library never sees it:
    coverage_run hands it ``model`` with ``example_inputs={keyword: x}``."""

    def __init__(self, model: nn.Module, keyword: str) -> None:
        super().__init__()
        self.model, self.keyword = model, keyword

    def forward(self, x: Tensor) -> Any:
        return self.model(**{self.keyword: x})


def as_positional(model: nn.Module, keyword: str) -> nn.Module:
    """How the sweep calls an HF model on one tensor (see ``KeywordCall``)."""
    return KeywordCall(model, keyword)


def build(name: str, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, ...]]:
    """The eval-mode tiny model (wrapped by ``as_positional``) and its input size without the
    batch; raises NoSmallConfig when no attempt builds and runs in time."""
    start, why = time.perf_counter(), []
    for keep in KEEP:
        if time.perf_counter() - start > BUILD_BUDGET:
            why.append("out of time")
            break
        try:
            config = tiny_config(name, keep)
            cls = _model_class(split_name(name)[0])
            try:  # counted on meta first, so that a big default is never allocated
                with torch.device("meta"):
                    params = sum(p.numel() for p in cls(config).parameters())
            except Exception:  # noqa: BLE001 - some __init__s read values: count after building
                params = 0
            if params > MAX_PARAMS:
                raise NoSmallConfig(f"{params / 1e6:.0f}M parameters")
            with torch.device(device):
                model = cls(config).eval()
            if (params := sum(p.numel() for p in model.parameters())) > MAX_PARAMS:
                raise NoSmallConfig(f"{params / 1e6:.0f}M parameters")
            keyword, x = example(model, config, name)
            if torch.device(device).type != "meta":
                with torch.no_grad(), contextlib.redirect_stdout(None):
                    model(**{keyword: x})
            return as_positional(model, keyword).eval(), tuple(x.shape[1:])
        except Exception as exc:  # noqa: BLE001 - each attempt's failure is its reason
            first = (str(exc).splitlines() or [""])[0][:200]
            why.append(f"{type(exc).__name__}: {first}")
    raise NoSmallConfig("; ".join(dict.fromkeys(why)))
