"""Cut a traced graph at its token embeddings: the lookup's output becomes the graph's input.

An explanation needs a float input. A text model that takes only token ids (a CLIP text tower
pools at the end-of-text position, which it finds from the ids, so its forward has no
``inputs_embeds``) is explained from its embedded tokens all the same: it is traced on the ids,
the one lookup ``F.embedding(ids, table)`` of them becomes a placeholder ``inputs_embeds``, and
the ids' other uses (the pooling position, a padding mask) read the example ids, kept in the
module as a constant buffer. The compiled module explains that token sequence: it takes the
embeddings of those ids (``embed_tokens``), and another sequence needs another compile.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from ...errors import TraceError
from ..graph_utils import is_call

IDS_BUFFER = "libra_token_ids"
EMBEDDINGS = "inputs_embeds"


def cut_at_embeddings(gm: fx.GraphModule, name: str, ids: torch.Tensor) -> fx.GraphModule:
    """``gm`` with its placeholder ``name`` (integer ids, example value ``ids``) replaced by
    the embeddings its one lookup gives; a TraceError when there is not exactly one."""
    graph = gm.graph
    holder = next((n for n in graph.nodes if n.op == "placeholder" and n.name == name), None)
    if holder is None:
        raise TraceError(f"the traced graph has no input {name!r} to embed")
    sources = _reshapes_of(holder)
    lookups = list(dict.fromkeys(u for source in sources for u in source.users
                                 if is_call(u, F.embedding) and u.args[0] in sources))
    if len(lookups) != 1:
        raise TraceError(
            f"from_embeddings needs the ids {name!r} to be looked up in one embedding table; "
            f"the graph looks them up {len(lookups)} times. Pass inputs_embeds instead, if "
            "the model takes them")
    lookup = lookups[0]
    with graph.inserting_after(holder):
        embeds = graph.placeholder(EMBEDDINGS)
    embeds.meta = dict(lookup.meta)
    lookup.replace_all_uses_with(embeds)
    graph.erase_node(lookup)
    if holder.users:
        gm.register_buffer(IDS_BUFFER, ids.detach().clone())
        with graph.inserting_after(embeds):
            constant = graph.get_attr(IDS_BUFFER)
        constant.meta = dict(holder.meta)
        holder.replace_all_uses_with(constant)
    graph.erase_node(holder)
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
        in_spec = pytree.tree_flatten(list(names))[1]
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec,
                                                    codegen.pytree_info.out_spec))
    gm.recompile()
    return gm


_RESHAPES = ("view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous")


def _reshapes_of(node: fx.Node) -> set[fx.Node]:
    """``node`` and the values made from it by reshapes alone (the ids as the lookup reads
    them: a model often flattens them first)."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user.op == "call_method" and user.target in _RESHAPES and user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def integer_input(example_inputs: dict) -> tuple[str, torch.Tensor]:
    """The one integer tensor (the token ids) among keyword example inputs."""
    found = [(k, v) for k, v in example_inputs.items()
             if isinstance(v, torch.Tensor) and not v.is_floating_point()]
    if len(example_inputs) != 1 or len(found) != 1:
        raise TraceError(
            "from_embeddings=True takes example_inputs with one keyword, the token ids, e.g. "
            f"{{'input_ids': ids}}; got {', '.join(example_inputs) or 'none'}")
    return found[0]
