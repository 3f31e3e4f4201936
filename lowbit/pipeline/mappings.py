"""Which layer produces the input of which Linear layers: the groups an
equivalence transform (SmoothQuant, AWQ) may rescale.

    norm -> consumers        found by tracing (pipeline/stats.py): the consumers'
                             input tensor is the norm's output (Llama input_layernorm
                             -> q/k/v, post_attention_layernorm -> gate/up; GPT-2
                             ln_1 -> c_attn; ...)
    linear -> linear         a data table: pairs joined by an operation that is linear
                             in each channel (attention's probabilities times V, the
                             gated MLP's act(gate) * up), valid when the widths match
                             (grouped-query attention's v_proj is narrower than
                             o_proj's input: skipped)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# (producer suffix, consumer suffix) within one block
LINEAR_PAIRS = (
    ("self_attn.v_proj", "self_attn.o_proj"),  # Llama, Qwen2, Mistral
    ("mlp.up_proj", "mlp.down_proj"),
    ("attention.self.value", "attention.output.dense"),  # BERT
)


@dataclass(frozen=True)
class SmoothGroup:
    producer: str  # module name within the block
    kind: str  # "norm" or "linear"
    consumers: tuple[str, ...]


def smoothing_groups(block: nn.Module, names: list[str], producers: dict[str, str | None]) -> list[SmoothGroup]:
    """Groups among the block's quantized layers `names` (relative to the block)."""
    by_norm: dict[str, list[str]] = {}
    for n in names:
        p = producers.get(n)
        if p is not None:
            by_norm.setdefault(p, []).append(n)
    groups = [SmoothGroup(p, "norm", tuple(c)) for p, c in by_norm.items()]
    for n in names:
        for prod, cons in LINEAR_PAIRS:
            if not n.endswith(cons):
                continue
            p = n[: len(n) - len(cons)] + prod
            try:
                pm = block.get_submodule(p)
            except AttributeError:
                continue
            if pm.weight.shape[0] == block.get_submodule(n).in_features:  # nn.Linear [out, in]
                groups.append(SmoothGroup(p, "linear", (n,)))
    return groups
