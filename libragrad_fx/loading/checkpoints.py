"""Load a state_dict file into a model, and say in one line how it does not fit.

``load_state_dict``'s own error is a multi-line list of every key; a user who passed the wrong
file needs the first few differences and the counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LibraError

_SHOWN = 3  # differences named per kind
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` file holding a
    state_dict (possibly under "state_dict" or "model", possibly saved from DataParallel)."""
    path = Path(path)
    if not path.is_file():
        raise LibraError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many kinds for a bad file
        reason = " ".join(str(exc).split())[:160]
        raise LibraError(f"cannot read checkpoint {path}: not a state_dict saved by torch.save "
                         f"or safetensors ({type(exc).__name__}: {reason})") from exc
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise LibraError(f"checkpoint {path} does not hold a state_dict (a dict of tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _sparse_rows(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """``K.rows``/``K.values`` pairs (a tensor stored as the rows that differ from the model's
    seeded initialisation, as the digits models are saved) become ``K``."""
    for key in list(state):
        base = key.removesuffix(".rows")
        if key.endswith(".rows") and base + ".values" in state and base in own:
            full = own[base].detach().clone()
            full[state.pop(key).long()] = state.pop(base + ".values").to(full.dtype)
            state[base] = full


def mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """One line naming the first missing, unexpected and misshapen keys, or None if they fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected),
                        ("with another shape", shapes)):
        if items:
            more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            parts.append(f"{len(items)} key(s) {what} ({'; '.join(items[:_SHOWN])}{more})")
    return "; ".join(parts) or None


def load_checkpoint(model: nn.Module, path: str | Path, name: str) -> None:
    """Load ``path`` into ``model`` strictly, or raise a one-line LibraError."""
    own = model.state_dict()
    state = read_state_dict(path)
    _sparse_rows(state, own)
    problem = mismatch(state, own)
    if problem:
        raise LibraError(f"checkpoint {path} does not match {name}: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        reason = " ".join(str(exc).split())[:200]
        raise LibraError(f"checkpoint {path} does not match {name}: {reason}") from exc
