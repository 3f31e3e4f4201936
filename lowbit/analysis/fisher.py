"""Fisher-weighted layer costs: what quantizing one layer costs the model's KL, from one backward pass.

At the fp model the KL to itself has zero gradient, so to second order in a layer's output change.
Quantizing layer l (W -> Q, D = W - Q) moves its output at token s by dy_s = D x_s, and

    KL(fp || quantized) ~ 1/(2P) sum_s dy_s^T F_s dy_s,   F_s = E[g_s g_s^T]

over the P scored positions. g_s is the gradient with respect to y_s of -sum_t log p(y_t), with
the labels y_t drawn from the fp model's own predictions. That makes E[g g^T] the KL's Hessian (the
Fisher) rather than the empirical Fisher of the true tokens. Keep F's diagonal (as ModelOpt's
AutoQuantize scores layers) and treat the gradients and the inputs as independent over tokens
(K-FAC's factorisation):

    fisher[l, c] = 1/(2P) sum_j G_j (D Hbar D^T)_jj,   G_j = sum_s g_sj^2,   Hbar = 1/n sum_s x_s x_s^T

G comes from one forward and backward pass over the calibration windows (output_fisher). Hbar is
the layer's input Hessian: the statistics GPTQ already collects, H / 2. Each candidate then costs
one D Hbar D^T (fisher_cost) instead of a forward through the rest of the model.

    g = output_fisher(model, blocks, norm, head, names, windows, pos)   # {name: G [out]}
    kl_estimate = fisher_cost(output_error_rows(W - Q, H / 2, torch.float64), g[name], positions_scored)

The same pass can fill the layers' input statistics (`collectors`: StatsCollectors on the blocks), so
that Hbar needs no second forward; in bf16 (`dtype`) where the CPU multiplies it natively, as the
calibrated quantization runs its forwards.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..pipeline.blocks import BlockInput, block_forward, capture_inputs
from ..pipeline.sequential import compute_autocast


def fisher_cost(row: torch.Tensor, g: torch.Tensor, positions: int) -> float:
    """row: [out] (D Hbar D^T)_jj (core.hessian.output_error_rows with Hbar = mean x x^T), g: [out] summed
    squared output gradients over `positions` scored positions -> the KL estimate 1/(2P) sum_j g_j row_j.

    Example: fisher_cost(torch.tensor([1.0]), torch.tensor([4.0]), 2) -> 1.0
    """
    return float((g.double() * row.double()).sum()) / (2 * positions)


def output_fisher(model, blocks, norm, head, names: list[str], windows: torch.Tensor, pos: torch.Tensor, *,
                  chunk: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, collectors=(),
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """G_j = sum over the scored positions of (d(-log p(y)) / d y_j)^2 for each layer in `names`
    (modules of `model`, output [..., out]) -> {name: G [out] float64}.

    windows: [N, T] token ids; pos: [P'] the scored positions of each window (logits of position t
    predict token t + 1; P = N * P'). The labels are drawn from the fp model's predictions with a
    generator seeded by `seed`, `chunk` windows per forward and backward pass. Only the blocks'
    outputs take gradients (torch.autograd.grad with respect to the first block's input): no
    weight gradient is computed or stored. dtype: the forward's autocast dtype (bf16 halves the pass
    where the CPU multiplies it natively; the log-softmax stays float32). collectors: StatsCollectors
    entered by the caller on the blocks, told each chunk's index (their batch) before its forward.
    """
    gen = torch.Generator().manual_seed(seed)
    acc = {n: None for n in names}

    def keep(name):
        def on_output(module, args, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            if y.requires_grad:
                y.register_hook(lambda g: _add(acc, name, g))
        return on_output

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    # weights that require grad put their autocast copies on the graph: 15% of the pass on SmolLM2
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        parts = list(windows.split(chunk))
        for b, ids in enumerate(tqdm(parts, desc="fisher", unit="chunk", disable=not progress)):
            for c in collectors:
                c.batch = b
            inp = capture_inputs(model, blocks[0], [ids])[0]
            h0 = inp.hidden.detach().requires_grad_()
            with torch.enable_grad(), compute_autocast(dtype):
                h = h0
                for block in blocks:
                    h = block_forward(block, BlockInput(h, inp.kwargs))
                logp = torch.log_softmax(head(norm(h[:, pos])).float(), dim=-1)
                y = sample_labels(logp.detach().reshape(-1, logp.shape[-1]), gen)
                nll = -logp.reshape(-1, logp.shape[-1]).gather(1, y).sum()
                torch.autograd.grad(nll, h0)
    finally:
        for hk in hooks:
            hk.remove()
        for p in frozen:
            p.requires_grad_(True)
    missing = [n for n, g in acc.items() if g is None]
    if missing:
        raise ValueError(f"output_fisher: no gradient reached {missing[:3]}: are they used by the blocks' forward?")
    return acc


def sample_labels(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of logp [rows, vocab] (log-probabilities), drawn from exp(logp) by inverting
    its cumulative sum -> [rows, 1] int64. torch.multinomial took 0.58 s per 512 rows of SmolLM2's
    49,152 tokens (a tenth of the whole pass), this 0.13 s."""
    with torch.no_grad():
        c = logp.float().exp().cumsum(-1)
        u = torch.rand(c.shape[0], 1, generator=gen) * c[:, -1:]
        return torch.searchsorted(c, u).clamp_(max=c.shape[1] - 1)


def _add(acc: dict, name: str, g: torch.Tensor) -> None:
    sq = g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0)
    acc[name] = sq if acc[name] is None else acc[name] + sq
