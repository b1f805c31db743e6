"""Four small Transformers for 48×48 digit canvases, and the weights this project trained.

Pretrained weights cannot be downloaded here (DESIGN.md §6), yet faithfulness and localisation
metrics mean little on random weights. These models are small enough to train in minutes on a
CPU (``python -m benchmarks.train_digits``) and cover the four rule families: a ViT (attention,
GELU, LayerNorm), an MLP-Mixer (no attention), an EVA (SwiGLU self-gating, RoPE) and a CLIP
(image and text towers, L2 normalisation). Each is built by its library's own constructor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LibraError
from ..loading.checkpoints import load_checkpoint

__all__ = ["CAPTIONS", "NAMES", "WEIGHTS_DIR", "WeightsNotFoundError", "build", "class_logits",
           "load", "save", "tokenize_captions", "weights_path"]

NAMES = ("vit", "mixer", "eva", "clip")
CAPTIONS = tuple(f"a handwritten {word}" for word in (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
WEIGHTS_DIR = Path(__file__).parent / "weights"
IMG_SIZE = 48
PATCH = 6
CONTEXT_LENGTH = 16
# CLIP's 49408×64 token embedding is 90% of its weights, but ten captions train only a few dozen
# rows. Its initialisation is seeded, so the file keeps just the rows that moved in training
# and :func:`load` regenerates the rest, bit for bit.
_TOKENS = "token_embedding.weight"
_TOKEN_SEED = 0


class WeightsNotFoundError(LibraError, FileNotFoundError):
    """The trained weights of a digits model are not on disk."""


def _check(name: str) -> None:
    if name not in NAMES:
        raise LibraError(f"unknown digits model {name!r}; choose one of {NAMES}")


def build(name: str) -> nn.Module:
    """A randomly initialised model ``name`` (one of :data:`NAMES`), in eval mode."""
    _check(name)
    if name == "vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=IMG_SIZE, patch_size=PATCH, in_chans=3, num_classes=10, embed_dim=64,
            depth=4, num_heads=4, class_token=True, global_pool="token")
    elif name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        # Token-mixing hidden width is 0.5·64 = 32, unlike the 64 tokens, so no axis is ambiguous.
        model = MlpMixer(num_classes=10, img_size=IMG_SIZE, patch_size=PATCH, num_blocks=4,
                         embed_dim=64)
    elif name == "eva":
        from timm.models.eva import Eva

        model = Eva(img_size=IMG_SIZE, patch_size=PATCH, num_classes=10, embed_dim=64, depth=4,
                    num_heads=4, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True,
                    ref_feat_shape=(IMG_SIZE // PATCH, IMG_SIZE // PATCH))
    else:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(image_size=IMG_SIZE, patch_size=PATCH, width=64, layers=4,
                                     head_width=16),
            text_cfg=CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64,
                                 heads=4, layers=2))
        with torch.no_grad():
            model.token_embedding.weight.copy_(_token_init(model.token_embedding.weight.shape))
    return model.eval()


def _token_init(shape: torch.Size) -> torch.Tensor:
    """open_clip's N(0, 0.02²) token embedding, drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(_TOKEN_SEED)
    return torch.randn(shape, generator=gen) * 0.02


def tokenize_captions(texts: list[str] | tuple[str, ...] = CAPTIONS) -> torch.Tensor:
    """open_clip's default tokenizer at this CLIP's context length of 16."""
    import open_clip

    return open_clip.tokenize(list(texts), context_length=CONTEXT_LENGTH)


def weights_path(name: str) -> Path:
    """Where the trained weights of ``name`` live inside the package."""
    _check(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def load(name: str) -> nn.Module:
    """Model ``name`` with the shipped weights (stored in float16, loaded as float32), in eval."""
    path = weights_path(name)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"no trained weights for digits model {name!r} at {path}; "
            "train them with `python -m benchmarks.train_digits`")
    model = build(name)
    load_checkpoint(model, path, f"digits model {name!r}")  # expands the token rows too
    return model.eval()


def save(model: nn.Module, name: str, path: Path | None = None) -> Path:
    """Write ``model``'s state in float16 safetensors, the format :func:`load` reads."""
    from safetensors.torch import save_file

    path = weights_path(name) if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if _TOKENS in state:
        tokens = model.state_dict()[_TOKENS].detach().float()
        rows = (tokens != _token_init(tokens.shape)).any(dim=1).nonzero().flatten()
        del state[_TOKENS]
        state[_TOKENS + ".rows"] = rows.to(torch.int64).contiguous()
        state[_TOKENS + ".values"] = tokens[rows].to(torch.float16).contiguous()
    save_file(state, str(path))
    return path


@torch.no_grad()
def _caption_features(model: nn.Module) -> torch.Tensor:
    """The ten captions' unit text embeddings, (10, d)."""
    return model.encode_text(tokenize_captions(), normalize=True)


def class_logits(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(n, 10) class scores without gradient: a classifier's logits, or for CLIP zero-shot
    100·cos(image, caption) against :data:`CAPTIONS` (the score ``explain`` uses for prompts)."""
    out = []
    with torch.no_grad():
        text = _caption_features(model) if hasattr(model, "encode_text") else None
        for chunk in images.split(batch):
            if text is None:
                out.append(model(chunk))
            else:
                out.append(100.0 * model.encode_image(chunk, normalize=True) @ text.T)
    return torch.cat(out) if out else torch.zeros(0, 10)
