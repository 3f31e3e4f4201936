"""The `rotate` transform: QuaRot / SpinQuant's R1 and R2 folded into the weights, so the rotated
model is a plain model of the same architecture (no runtime change: GGUF, compressed-tensors and
lowbit's format export it as they export any other).

    rotate_model(model, seed=0, kind="hadamard")      # in place; -> RotationReport

R1, the residual stream x -> x Q (Q orthogonal, methods/rotate.py):
  1. every RMSNorm weight w is folded into the Linear layers reading that norm (W <- W diag(w)) and
     set to ones: RMSNorm(x Q) = RMSNorm(x) Q only without a per-channel weight;
  2. readers W_in <- W_in Q (q/k/v, gate/up, lm_head), writers W_out <- Q^T W_out and b <- b Q
     (o_proj, down_proj), embedding rows E <- E Q.
  A tied embedding table and output layer stop being tied when the final norm's weight is folded
  into the head (E Q against E diag(w) Q); unless that weight is constant, the head becomes its own
  tensor (RotationReport.untied counts its values: the bytes it costs).
R2, each attention head's values v_h -> v_h R (R orthogonal [head_dim, head_dim]): v_proj's rows of
  every kv head W_v,h <- R^T W_v,h (bias b_h <- b_h R), o_proj's columns of every query head
  W_o,h <- W_o,h R; with grouped-query attention the query heads reading one kv head see the same R.

Supported: the pre-norm RMSNorm decoders of LAYOUTS. LayerNorm (mean subtraction does not commute
with Q), Gemma's sandwich norms and OLMo 2's post-norms (a norm weight on a writer's output cannot
be folded through Q) and mixture-of-experts routers are refused by name (REFUSED). The rotated model
is checked against the original on a probe batch before rotate_model returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..methods.rotate import rotate_options, rotation
from .blocks import find_blocks


@dataclass(frozen=True)
class Layout:
    """Where one architecture's residual stream is read and written, module names within a block."""
    norms: tuple[tuple[str, tuple[str, ...]], ...]  # (RMSNorm, the Linear layers reading its output)
    writers: tuple[str, ...]  # Linear layers whose output is added to the residual stream
    v: str  # the Linear making the attention values (rows v_rows(config) of it)
    o: str  # attention's output projection (its input: heads x head_dim)
    v_first: Callable = lambda config: 0  # first row of the values in `v` (Phi-3: q, k, v in one Linear)


LLAMA = Layout(norms=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                      ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
               writers=("self_attn.o_proj", "mlp.down_proj"), v="self_attn.v_proj", o="self_attn.o_proj")
PHI3 = Layout(norms=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
              writers=("self_attn.o_proj", "mlp.down_proj"), v="self_attn.qkv_proj", o="self_attn.o_proj",
              v_first=lambda c: (c.num_attention_heads + c.num_key_value_heads) * _head_dim(c))
# transformers model_type -> layout; every RMSNorm pre-norm decoder of io/gguf/arch.py's list that has one
LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "granite": LLAMA, "smollm3": LLAMA,
           "phi3": PHI3}
REFUSED = {
    "gemma2": "its sandwich norms scale the attention and MLP outputs by a norm weight before the residual add "
              "(and its norms compute x * (1 + w))",
    "gemma3_text": "its sandwich norms scale the attention and MLP outputs by a norm weight before the residual add "
                   "(and its norms compute x * (1 + w))",
    "olmo2": "its post-norms scale the attention and MLP outputs by a norm weight before the residual add",
    "mixtral": "its router reads the rotated stream and its experts are not folded yet",
    "qwen2_moe": "its router and shared expert gate read the rotated stream and its experts are not folded yet",
    "qwen3_moe": "its router reads the rotated stream and its experts are not folded yet",
}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative change of the logits; half types: 3e-2


@dataclass
class RotationReport:
    r1: str  # what Q is ("randomized Hadamard 576")
    r2: str | None  # what R is, None without head rotations
    untied: int  # values of the output layer made its own tensor (0: still tied, or never was)
    error: float  # relative change of the probe's logits

    def summary(self) -> str:
        tie = (f"; the tied output layer is now its own tensor: +{self.untied:,} values "
               f"({self.untied * 8.5 / 8 / 2**20:.1f} MiB at 8.5 bits/value)") if self.untied else ""
        return f"rotate: R1 {self.r1}, R2 {self.r2 or 'off'}; logits change {self.error:.1e}{tie}"


def supported(model: nn.Module) -> Layout:
    """The model's Layout, or a ValueError saying why lowbit cannot rotate it."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in REFUSED:
        raise ValueError(f"rotate: {kind} models cannot be rotated without a runtime change: {REFUSED[kind]}. "
                         f"Rotatable: {', '.join(LAYOUTS)}; drop 'rotate+' from the method")
    if kind not in LAYOUTS:
        raise ValueError(f"rotate: {kind or type(model).__name__!r} is not a rotatable architecture (RMSNorm "
                         f"pre-norm decoders: {', '.join(LAYOUTS)}); LayerNorm's mean subtraction does not commute "
                         "with a rotation. Drop 'rotate+' from the method")
    return LAYOUTS[kind]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def rotate_model(model: nn.Module, *, seed: int = 0, kind: str = "hadamard", heads: bool = True,
                 probe: torch.Tensor | None = None) -> RotationReport:
    """Rotate `model` (a transformers causal LM of LAYOUTS) in place; it computes the same logits
    (checked on `probe`, token ids [batch, seq], or 16 seeded random tokens). Example:
    rotate_model(model, seed=0) -> RotationReport(r1="randomized Hadamard 576", ...)."""
    rotate_options(seed=seed, kind=kind, heads=heads)
    layout = supported(model)
    config = model.config
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = getattr(model.base_model, "norm", None)
    _, blocks = find_blocks(model)
    norms = [block.get_submodule(n) for block in blocks for n, _ in layout.norms] + [final_norm]
    for n in norms:
        if n is None or "RMSNorm" not in type(n).__name__ or getattr(n, "bias", None) is not None:
            raise ValueError(f"rotate: expected RMSNorm layers without bias in {type(model).__name__}, found "
                             f"{type(n).__name__}; only RMSNorm commutes with a rotation")
    if probe is None:
        probe = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
    before = _logits(model, probe)

    Q, r1 = rotation(config.hidden_size, seed=seed, kind=kind)
    untied = _untie_if_needed(model, emb, head, final_norm)
    for block in blocks:
        for norm, readers in layout.norms:
            _fold_norm(block.get_submodule(norm), [block.get_submodule(r) for r in readers])
            for r in readers:
                _rotate_input(block.get_submodule(r), Q)
        for w in layout.writers:
            _rotate_output(block.get_submodule(w), Q)
    tied = head.weight is emb.weight
    if not tied:  # a tied pair under a constant final norm: the constant stays there (c I commutes with Q)
        _fold_norm(final_norm, [head])
    _rotate_input(head, Q)
    if not tied:
        _rotate_input(emb, Q)  # rows E Q, the same product
    r2 = None
    if heads:
        R, r2 = rotation(_head_dim(config), seed=seed + 1, kind=kind)
        for block in blocks:
            _rotate_heads(block.get_submodule(layout.v), block.get_submodule(layout.o), R, layout.v_first(config),
                          config.num_key_value_heads)

    after = _logits(model, probe)
    err = float((after - before).norm() / before.norm().clamp(min=1e-30))
    tol = TOLERANCE.get(emb.weight.dtype, 3e-2)
    if not err < tol:
        raise ValueError(f"rotate: the rotated {type(model).__name__} changed its logits by {err:.2e} (relative, "
                         f"allowed {tol:.0e}); the model is left rotated and broken: reload it. Its architecture "
                         "reads or writes the residual stream somewhere lowbit's layout does not know")
    return RotationReport(r1, r2, untied, err)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).double()


def _untie_if_needed(model, emb: nn.Module, head: nn.Module, final_norm: nn.Module) -> int:
    """Give the head its own weight when it is tied to the table and the final norm's weight is not
    constant (folded into the head, it makes the two differ). -> values added (0: kept tied)."""
    if head.weight is not emb.weight:
        return 0
    w = final_norm.weight
    if torch.all(w == w.flatten()[0]):  # a constant: stays in the norm, both stay E Q
        return 0
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", lambda: None)()
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False
    return head.weight.numel()


def _math(t: torch.Tensor) -> torch.dtype:
    """What a weight is rotated in: float32 (float64 for float64 weights): an orthogonal product in
    float32 is off by ~1e-7 relative per value; float64 made the 28M-value SmolLM2 table take seconds."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """W <- W diag(w) for each reader, w <- ones: the norm's scale moves into the readers."""
    w = norm.weight.detach()
    for r in readers:
        W = r.weight.data
        W.copy_((W.to(_math(W)) * w.to(_math(W))[None, :]).to(W.dtype))
    norm.weight.data.fill_(1.0)


def _rotate_input(linear: nn.Module, Q: torch.Tensor) -> None:
    """x' = x Q: W <- W Q, the layer's output unchanged."""
    W = linear.weight.data
    W.copy_((W.to(_math(W)) @ Q.to(_math(W))).to(W.dtype))


def _rotate_output(linear: nn.Module, Q: torch.Tensor) -> None:
    """y' = y Q: W <- Q^T W, b <- b Q."""
    W = linear.weight.data
    W.copy_((Q.T.to(_math(W)) @ W.to(_math(W))).to(W.dtype))
    if getattr(linear, "bias", None) is not None:
        b = linear.bias.data
        b.copy_((b.to(_math(b)) @ Q.to(_math(b))).to(b.dtype))


def _rotate_heads(v: nn.Module, o: nn.Module, R: torch.Tensor, first: int, n_kv: int) -> None:
    """Each kv head's values times R (rows first.. of v), each query head's o_proj columns times R."""
    d = R.shape[0]
    rows = v.weight.data[first:first + n_kv * d]
    Rm = R.to(_math(rows))
    rows.copy_((Rm.T @ rows.to(Rm.dtype).reshape(n_kv, d, -1)).reshape(rows.shape).to(rows.dtype))
    if getattr(v, "bias", None) is not None:
        b = v.bias.data[first:first + n_kv * d]
        b.copy_((b.to(Rm.dtype).reshape(n_kv, d) @ Rm).reshape(-1).to(b.dtype))
    W = o.weight.data  # [hidden, heads * d]
    W.copy_((W.to(Rm.dtype).reshape(W.shape[0], -1, d) @ Rm).reshape(W.shape).to(W.dtype))
