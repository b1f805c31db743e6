"""What an op-table record can say: the shape of the facts, with no op named here.

An ``Op`` is everything the compiler knows about one op: how its Euler degree follows from its
arguments' (``degree``, read by the certificate), which arguments it adds to its value
(``adds``, read by the bias pass and the bias maps), what a rule swaps it for (``libra``), and
how the explanations read it (``bias_map``, ``attention``, ``detached_params``). The records
themselves are in ``optable.py``; the passes interpret them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

Slot = tuple[int, str]  # an argument: its position and its keyword


# --- degree rules: how the certificate computes k(op(...)) from its arguments' k -------------


class DegreeRule:
    """Base of the degree rules; each subclass is one clause of the calculus (certify.py)."""


@dataclass(frozen=True)
class Preserving(DegreeRule):
    """Linear (or positively homogeneous of degree 1) in the first argument, which must be the
    only one carrying gradient: reshapes, reductions, ReLU, pooling, Libra gates."""


@dataclass(frozen=True)
class Product(DegreeRule):
    """The degrees of ``factors`` add up, plus the op's additive arguments (``Op.adds``) when it
    has any: linear layers, convolutions, Libra norms. No factors: all positional operands
    (``a * b``, ``a @ b``, einsum's operands)."""

    factors: tuple[Slot, ...] = ()
    first_operand: int = 0  # with no factors: where the operands start (einsum's equation)


@dataclass(frozen=True)
class Sum(DegreeRule):
    """The additive arguments must share one degree (constants among them are bias sites)."""


@dataclass(frozen=True)
class Quotient(DegreeRule):
    """k(a / b) = k(a) - k(b)."""


@dataclass(frozen=True)
class Power(DegreeRule):
    """k(a ** p) = p k(a); ``exponent`` None reads p from the call (a number, never a tensor)."""

    exponent: Fraction | None = None


@dataclass(frozen=True)
class Attention(DegreeRule):
    """Linear in ``value`` while ``query``/``key`` and ``masks`` carry no gradient."""

    qk: tuple[Slot, ...]
    value: Slot
    masks: tuple[Slot, ...] = ()


@dataclass(frozen=True)
class ModuleAttention(DegreeRule):
    """``nn.MultiheadAttention`` as a call: products of value and the projections, plus its
    biases; ``detaches_qk`` where the op cuts q and k itself (its Libra form). The slots, when
    given, say where the functional spelling (``F.multi_head_attention_forward``) keeps them;
    None: the module call's (certify.py)."""

    detaches_qk: bool
    qk: tuple[Slot, ...] | None = None
    product: tuple[Slot, ...] | None = None  # value and the weights it is multiplied by
    masks: tuple[Slot, ...] | None = None


class Clause(enum.Enum):
    """The clauses that are one op's own (the certificate has a function for each)."""

    BATCH_NORM = "eval batch norm: an affine map, refused in training mode"
    VAR_MEAN = "(variance, mean): degrees (2k, k)"
    MASKED_FILL = "keeps the degree when the fill is zero or the tensor constant"
    SHARED_PRODUCT = "a product whose degree is shared out: the mean of its factors'"
    PAD = "zeros or a gather keep the degree; a nonzero fill does not"
    CLAMP = "clamp(min=0) is ReLU; any other clamp is not homogeneous"
    MAX_MIN = "with a second tensor it picks a summand per element, else it reduces"
    REDUCE_ONLY = "x.max() / x.max(dim) keep the degree; x.max(other) is refused"


@dataclass(frozen=True)
class Own(DegreeRule):
    clause: Clause


# --- additive arguments: where bias sites can be ----------------------------------------------


class Adds:
    """Base of the ways an op adds arguments to its value."""


@dataclass(frozen=True)
class Arguments(Adds):
    """The listed arguments, where present; ``implicit`` ones are biases by what the op does
    with them (eval batch norm's running mean enters as -mu*gamma/sigma)."""

    slots: tuple[Slot, ...]
    implicit: tuple[Slot, ...] = ()


@dataclass(frozen=True)
class Operands(Adds):
    """Positional operands ``positions`` (a + b, where(c, a, b))."""

    positions: tuple[int, ...] = (0, 1)


@dataclass(frozen=True)
class Listed(Adds):
    """Every tensor of the list in the first argument (cat, stack)."""


@dataclass(frozen=True)
class TwoTensors(Adds):
    """Both operands when the second is a tensor (torch.max(a, b)); none when it reduces."""


# --- how explanations read an op ---------------------------------------------------------------


class BiasMap(enum.Enum):
    """How a bias site's map E ⊙ ∂f/∂y is formed at this op (attribution/bias_maps.py)."""

    EXACT = "any op: E from a local double backward"
    TRAILING = "b broadcast along the last axis"
    SUBTRACTED = "as TRAILING, negated in the second operand"
    CHANNELS = "b along axis 1 (channels first)"
    PLACED = "b where cat/stack puts it"


class AttentionRead(enum.Enum):
    """How attention methods recompute A from the op's arguments (attribution/attention.py)."""

    FUSED = "scaled_dot_product_attention's arguments"
    MODULE = "nn.MultiheadAttention's module and parameters; the value is output 0"
    SOFTMAX = "an explicit softmax(...) @ V: A is the product's left operand"


class Reads(enum.Enum):
    """Which arguments' values an op reads (the rest only for their shape, dtype or device)."""

    ALL = "every argument"
    FIRST = "the first argument; the others give a dtype, device or shape"
    SHAPES = "only shapes, dtypes or devices"


@dataclass(frozen=True)
class Bound:
    """An argument of the replaced call, rebound for the replacement (None: no default)."""

    index: int
    name: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Replacement:
    """What ``rule`` swaps the op for: ``target`` with the op's arguments rebound by ``args``
    (empty: the arguments stay as they are), the report's words (a string or a function of the
    rebound arguments) and, for a replacement with no other facts, its degree rule."""

    rule: str
    target: Callable
    says: str | Callable[..., str] = ""
    args: tuple[Bound, ...] = ()
    degree: DegreeRule | None = None  # the replacement's own degree rule: given, it needs no
    # record of its own (the table derives one, ``forward_of`` the replaced op)


@dataclass(frozen=True)
class Op:
    """Every fact about one op. ``target`` is its canonical function or a tensor method's name;
    ``forward_of`` names the op whose forward a Libra op computes."""

    target: Callable | str
    degree: DegreeRule | None = None
    adds: Adds | None = None
    libra: Replacement | None = None
    forward_of: Callable | None = None
    bias_map: BiasMap = BiasMap.EXACT
    attention: AttentionRead | None = None
    detached_params: bool = False  # a custom backward: probes hand it detached parameters
    gradient: bool = True  # False: its value carries no gradient (shapes, comparisons)
    reads: Reads = Reads.ALL
    aliases: tuple[Callable, ...] = field(default=())  # functions canonicalised to target
    methods: tuple[str, ...] = field(default=())  # tensor methods canonicalised to target
    modules: tuple[type, ...] = field(default=())  # one-input modules canonicalised to target
    module_args: tuple[str, ...] = field(default=())  # their attributes passed after the input
