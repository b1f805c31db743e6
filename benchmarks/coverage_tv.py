"""torchvision models for the coverage sweep: every classification model, random weights.

Parameter counts come from the weights' metadata (nothing is downloaded), so the smallest model
of each family (torchvision module) is found without building any.
"""

from __future__ import annotations

import functools

from torch import nn

# weights=None builds every model at 224 but Inception v3, which expects 299
INPUT_SIZE = {"inception_v3": 299}
# The models issue 14 names: the promise covers them.
NAMED = ("vit_b_16", "swin_t", "maxvit_t", "convnext_tiny", "efficientnet_b0")


@functools.lru_cache(maxsize=1)
def names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def family(name: str) -> str:
    from torchvision.models import get_model_builder

    return "torchvision/" + get_model_builder(name).__module__.rsplit(".", 1)[-1]


def is_named(name: str) -> bool:
    return name in NAMED


def param_count(name: str) -> int | None:
    from torchvision.models import get_model_weights

    try:
        return int(get_model_weights(name).DEFAULT.meta["num_params"])
    except (KeyError, ValueError, AttributeError):
        return None


def smallest_per_family() -> list[str]:
    """The model with the fewest parameters of every family (ties: the shorter name)."""
    best: dict[str, str] = {}
    for name in names():
        fam, count = family(name), param_count(name) or 0
        old = best.get(fam)
        if old is None or (count, len(name), name) < (param_count(old) or 0, len(old), old):
            best[fam] = name
    return sorted(best.values())


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model (random weights, under the caller's default device) and its input size."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    size = INPUT_SIZE.get(name, 224)
    return model, (3, size, size)


def pixels(name: str) -> int:
    return INPUT_SIZE.get(name, 224) ** 2
