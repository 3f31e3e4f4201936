"""Per-layer sensitivity: what quantizing one layer alone costs the model, measured and estimated.

For each Linear layer l of the repeated blocks and each candidate scheme c (weights W, their
quantized version Q, H = 2/n X^T X the layer's calibration Hessian):

    kl[l, c]          KL(fp || model with only layer l quantized at c), mean over scored tokens
    dloss[l, c]       the change of the next-token loss (nats) on the same tokens

For an encoder (no output layer, e.g. MiniLM) `kl` holds 1 - cosine similarity of the mean-pooled
last hidden states to the fp ones (Sensitivity.metric "1-cos") and dloss is nan.
    output_err[l, c]  ||(W - Q) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T), D = W - Q
    proxy[l, c]       tr(H) / n_in * ||W - Q||^2 (HAWQ's trace-weighted weight error)
    fisher[l, c]      the KL estimated to second order from one backward pass (analysis.fisher):
                      1/(2P) sum_j G_j (D H D^T)_jj / 2, G_j the summed squared gradients of the
                      layer's output j; score="fisher", a causal LM's default

score="fisher" costs one forward and backward pass over the windows plus one D H D^T per pair (on
SmolLM2 about one calibrated quantization's time, docs/benchmarks.md) and `cost` is `fisher`.
score="full" measures instead. Measuring every (l, c) runs the model's tail once per pair. The fp model's block inputs flow
block by block, so a layer of block i runs blocks i.. only, and logits are taken at every
`stride`-th position. measure="reference" measures one candidate per layer and scales it to the
others by their output error (kl[l, c] ~ kl[l, ref] * tr(D_c H D_c^T) / tr(D_ref H D_ref^T), the
second-order picture in which a layer's loss is quadratic in its output error); "all" measures
every pair. `cost` (what the mixed-precision search minimises) is kl where measured, else that
estimate.

    sens = layer_sensitivity(model, calibration=[ids[None]], candidates=["w3g64", "w4g64", "w8"])
    sens.spearman()  # {"proxy": rho, "output_err": rho} (score="full"): how the cheap ones rank the layers
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..core.hessian import output_error_rows
from ..methods import TRANSFORMS, get_method, parse_method
from ..methods.awq import awq_clip
from ..pipeline.blocks import BlockInput, capture_inputs, find_blocks, run_block
from ..pipeline.recipe import Recipe, get_recipe
from ..pipeline.sequential import calibration_dtype as calibration_dtype_of, compute_autocast
from ..pipeline.stats import StatsCollector
from ..pipeline.walk import is_linear, is_norm, linear_weight
from .fisher import fisher_cost, output_fisher

# AWQ's exponent search per layer as the calibrated GGUF path runs it: 9 of the 20 grid points (coarse,
# then refined around the best). The scales only price the candidates here; a third of the calibrated pass.
_SEARCH = {"awq": {"coarse": 4}}
# nf4-dq (4.13 bits) among them: with it the RTN search at 4.25 bits beats uniform w4g64 (4.5) on
# SmolLM2's perplexity, 35.57 against 37.05; without it the search lost there (37.95, docs/benchmarks.md)
DEFAULT_CANDIDATES = ("w2g64", "w3g64", "nf4-dq", "w4g64-sym", "w4g64", "w8")


@dataclass
class Sensitivity:
    names: list[str]                 # layers, in model order
    candidates: list[str]            # candidate labels (recipe names)
    recipes: list[Recipe]            # the candidates (their weight schemes are what is measured)
    nbytes: torch.Tensor             # [L, C] int64: QTensor.nbytes of candidate c on layer l
    numel: torch.Tensor              # [L] int64 weights per layer
    output_err: torch.Tensor         # [L, C] relative output error on the calibration inputs
    proxy: torch.Tensor              # [L, C] tr(H)/n_in * ||W - Q||^2
    kl: torch.Tensor                 # [L, C] measured KL (1 - cos: encoders), nan where not measured
    dloss: torch.Tensor              # [L, C] measured change of loss, nan where not measured
    reference: int                   # the candidate measured on every layer (measure="reference")
    method: str                      # the solver that made Q
    tokens: int                      # scored tokens per measurement
    seconds: float = 0.0
    runs: int = 0                    # tail runs measured
    metric: str = "kl"               # what `kl` holds: "kl" (causal LM), "1-cos" (encoder embeddings)
    extra: dict = field(default_factory=dict)
    score: str = "full"              # what `cost` is: "full" (measured KL) or "fisher" (analysis.fisher)
    fisher: "torch.Tensor | None" = None  # [L, C] Fisher-weighted KL estimate (score="fisher")

    @property
    def cost(self) -> torch.Tensor:
        """[L, C] the KL each choice is expected to cost: the Fisher estimate (score="fisher"), else
        measured, else scaled from the reference."""
        if self.score == "fisher":
            return self.fisher.clamp(min=0)
        ref = self.kl[:, self.reference:self.reference + 1]
        abs_err = self.output_err  # relative to the same ||W X||^2 per layer: ratios hold
        est = ref * abs_err / abs_err[:, self.reference:self.reference + 1].clamp(min=1e-30)
        return torch.where(torch.isnan(self.kl), est, self.kl).clamp(min=0)

    def spearman(self) -> dict[str, float]:
        """Spearman rank correlation over the layers, at the reference candidate, of the proxy, the
        output error and the Fisher estimate (when present) against the measured KL (and the proxy over
        every measured pair, when all were); {} when nothing was measured (score="fisher")."""
        c = self.reference
        if torch.isnan(self.kl[:, c]).all():
            return {}  # score="fisher": nothing measured to rank against
        out = {"proxy": _rho(self.proxy[:, c], self.kl[:, c]),
               "output_err": _rho(self.output_err[:, c], self.kl[:, c])}
        if not torch.isnan(self.kl).any():
            out["proxy_all_pairs"] = _rho(self.proxy.flatten(), self.kl.flatten())
        if self.fisher is not None and not torch.isnan(self.kl[:, c]).all():
            out["fisher"] = _rho(self.fisher[:, c], self.kl[:, c])
        return out

    def to_dict(self) -> dict:
        """JSON-ready: tensors as nested lists (nan as None), candidates as recipe JSON."""
        def lst(t):
            return [[None if v != v else v for v in r] for r in t.tolist()] if t.dim() == 2 else t.tolist()
        return {"names": self.names, "candidates": self.candidates,
                "recipes": [r.to_dict() for r in self.recipes], "reference": self.reference,
                "method": self.method, "tokens": self.tokens, "seconds": self.seconds, "runs": self.runs,
                "metric": self.metric, "score": self.score,
                "fisher": None if self.fisher is None else lst(self.fisher),
                **{k: lst(getattr(self, k)) for k in ("nbytes", "numel", "output_err", "proxy", "kl", "dloss")}}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        def f64(x):
            return torch.tensor([[float("nan") if v is None else v for v in r] for r in x], dtype=torch.float64)
        return cls(d["names"], d["candidates"], [Recipe.from_dict(r) for r in d["recipes"]],
                   torch.tensor(d["nbytes"]), torch.tensor(d["numel"]), f64(d["output_err"]), f64(d["proxy"]),
                   f64(d["kl"]), f64(d["dloss"]), d["reference"], d["method"], d["tokens"], d["seconds"], d["runs"],
                   d.get("metric", "kl"), score=d.get("score", "full"),
                   fisher=None if d.get("fisher") is None else f64(d["fisher"]))

    def rows(self) -> list[dict]:
        """One dict per layer: output error and measured KL at the reference candidate."""
        c = self.reference
        return [{"name": n, "candidate": self.candidates[c], "output_err": float(self.output_err[i, c]),
                 "proxy": float(self.proxy[i, c]), "kl": float(self.kl[i, c]), "dloss": float(self.dloss[i, c])}
                for i, n in enumerate(self.names)]


def _rho(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr  # an optional extra: imported where used

    keep = ~(torch.isnan(a) | torch.isnan(b))
    return float(spearmanr(a[keep].numpy(), b[keep].numpy()).statistic)


def candidate_recipes(candidates) -> list[Recipe]:
    """Recipe names ("w4g64") or Recipes -> Recipes with names (the candidate labels)."""
    out = []
    for c in candidates:
        r = get_recipe(c)
        if r.activations is not None:
            raise ValueError(f"candidate {c!r} quantizes activations; mixed precision chooses weight schemes only")
        out.append(r if r.name else r.replace(name=f"{r.weights.format}/{type(r.weights.granularity).__name__}"))
    if len({r.name for r in out}) != len(out):
        raise ValueError(f"candidates {[r.name for r in out]}: give each a distinct name")
    if not out:
        raise ValueError("candidates: give at least one recipe name, e.g. w3g64,w4g64,w8")
    return out


def _stack(calibration) -> list[torch.Tensor]:
    """Token windows [T] / [b, T] of one length -> one batch [N, T] (a list of one)."""
    items = [x[None] if x.dim() == 1 else x for x in calibration]
    if not items or len({x.shape[1] for x in items}) != 1:
        raise ValueError("calibration: give token windows [T] or [b, T], all of one length T")
    return [torch.cat(items).long()]


def final_norm(model, prefix: str):
    """The normalisation applied after the last block (Llama `model.norm`, GPT-2 `transformer.ln_f`)."""
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norms = [m for _, m in parent.named_children() if is_norm(m)]
    if len(norms) != 1:
        raise ValueError(f"{type(model).__name__}: expected one norm beside the blocks ({prefix}), found "
                         f"{len(norms)}; sensitivity needs a causal LM with a final norm and an output layer")
    return norms[0]


class _Tail:
    """Runs blocks i.. on cached block-i inputs and scores logits against the fp ones."""

    metric = "kl"

    def __init__(self, model, prefix, blocks, ids: torch.Tensor, stride: int):
        self.blocks, self.norm = blocks, final_norm(model, prefix)
        self.head = model.get_output_embeddings()
        self.pos = torch.arange(0, ids.shape[1] - 1, stride)   # predicting positions pos + 1
        self.targets = ids[:, self.pos + 1]                   # [N, P]
        self.ref_logp = None

    @torch.no_grad()
    def logp(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.norm(h[:, self.pos])).float(), dim=-1)

    @torch.no_grad()
    def run(self, i: int, inputs: list[BlockInput]) -> torch.Tensor:
        out = []
        for inp in inputs:
            h = inp.hidden
            for block in self.blocks[i:]:
                h = run_block(block, BlockInput(h, inp.kwargs))
            out.append(self.logp(h))
        return torch.cat(out)

    def score(self, logp: torch.Tensor) -> tuple[float, float]:
        """(KL(fp || this), mean NLL change) over the scored positions."""
        ref = self.ref_logp
        kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
        nll = lambda lp: -lp.gather(-1, self.targets[..., None]).mean()  # noqa: E731
        return kl, float(nll(logp) - nll(ref))


class _EncoderTail(_Tail):
    """An encoder (a sentence-embedding model such as MiniLM, no output layer): the blocks' last
    hidden states mean-pooled over each window, scored by 1 - cosine similarity to the fp
    embedding (as lowbit.eval.embedding_fidelity compares them; the windows carry no padding)."""

    metric = "1-cos"

    def __init__(self, model, prefix, blocks, ids: torch.Tensor, stride: int):
        self.blocks, self.ref_logp = blocks, None

    @torch.no_grad()
    def logp(self, h: torch.Tensor) -> torch.Tensor:
        return h.double().mean(1)  # [N, hidden]

    def score(self, emb: torch.Tensor) -> tuple[float, float]:
        """(mean 1 - cosine, nan: an encoder has no next-token loss)."""
        cos = torch.nn.functional.cosine_similarity(emb, self.ref_logp, dim=-1)
        return float((1 - cos).mean()), float("nan")


def _tail_for(model, prefix, blocks, ids, stride) -> _Tail:
    if model.get_output_embeddings() is not None:
        return _Tail(model, prefix, blocks, ids, stride)
    if getattr(model.config, "is_decoder", False):
        raise ValueError(f"{type(model).__name__} has no output layer: sensitivity measures a causal LM's KL "
                         "or an encoder's embedding cosine")
    return _EncoderTail(model, prefix, blocks, ids, stride)


def layer_sensitivity(model, calibration, candidates=DEFAULT_CANDIDATES, *, method: str = "rtn",
                      measure: str = "reference", reference: "str | None" = None, stride: int = 2,
                      names: "list[str] | None" = None, solver_calibration=None, score: str = "auto",
                      calibration_dtype: "torch.dtype | str" = "auto", progress: bool = True) -> Sensitivity:
    """Sensitivity of every Linear layer of the blocks (or `names`) to each candidate scheme.

    calibration: token windows ([T] or [b, T], one length; e.g. 4 windows of 256 tokens).
    solver_calibration: the token windows whose fp inputs the method's statistics (GPTQ's Hessian,
    AWQ's magnitudes) come from, e.g. the windows lowbit.quantize will calibrate on; by default
    `calibration` itself. A calibrated solver fitted on the very tokens its cost is scored on
    overfits them (GPTQ on 512 tokens and a 576- or 1536-wide input has directions its error can
    hide in), and the costs come out far too low: give held-out windows.
    method: the method chain that makes each candidate's weights on the fp inputs ("rtn", "gptq",
    "awq+gptq": the transforms pick scales for the layer alone, then the solver runs on the
    scaled weight and inputs; see _transformed and _candidate_weight).
    measure: "reference" (one candidate measured per layer, `reference`, by default the second
    fewest bits: low enough that its KL stands clear of noise; the others are scaled from it) or
    "all" (every pair). stride: logits at every stride-th position (the head is a
    quarter of SmolLM2's multiply-adds).
    score: "fisher" (every pair's KL estimated from one backward pass, analysis.fisher: on SmolLM2
    about one calibrated quantization's time; `kl` stays unmeasured), "full" (the tail runs that
    `measure` names: one forward through the rest of the model per measured pair) or "auto"
    (fisher for a causal LM, full for an encoder, whose embedding cosine has no likelihood whose
    Fisher a backward pass could sample).
    calibration_dtype: the Fisher pass's and the statistics' forwards ("auto": bf16 where the CPU
    multiplies it natively, as lowbit.quantize; "fp32"). The scored tail runs of score="full" stay float32.
    """
    if measure not in ("reference", "all"):
        raise ValueError(f"measure={measure!r}: choose 'reference' or 'all'")
    if score not in ("auto", "fisher", "full"):
        raise ValueError(f"score={score!r}: choose 'fisher' (one backward pass), 'full' (a forward through "
                         "the rest of the model per measurement) or 'auto'")
    t0 = time.perf_counter()
    recipes = candidate_recipes(candidates)
    labels = [r.name for r in recipes]
    if reference is None:
        reference = sorted(recipes, key=lambda r: r.weights.bits)[min(1, len(recipes) - 1)].name
    if reference not in labels:
        raise ValueError(f"reference={reference!r} is not among the candidates {labels}")
    ref_c = labels.index(reference)
    transforms, solver_name = parse_method(method)
    solver = get_method(method)
    prefix, blocks = find_blocks(model)
    all_linear = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and is_linear(m)]
    names = all_linear if names is None else list(names)
    unknown = sorted(set(names) - set(all_linear))
    if unknown:
        raise ValueError(f"names {unknown[:3]}: not Linear layers of the blocks ({prefix})")
    batches = _stack(calibration)
    tail = _tail_for(model, prefix, blocks, batches[0], stride)
    if score == "auto":
        score = "full" if tail.metric != "kl" else "fisher"
    if score == "fisher" and tail.metric != "kl":
        raise ValueError(f"score='fisher' needs a causal LM's output layer; {type(model).__name__} is scored by "
                         "its embedding cosine: use score='full'")
    L, C = len(names), len(recipes)
    nan = torch.full((L, C), float("nan"), dtype=torch.float64)
    sens = Sensitivity(names, labels, recipes, torch.zeros(L, C, dtype=torch.long),
                       torch.zeros(L, dtype=torch.long), nan.clone(), nan.clone(), nan.clone(), nan.clone(),
                       ref_c, method, batches[0].shape[0] * (batches[0].shape[1] if tail.metric != "kl" else
                                                              tail.pos.numel()), metric=tail.metric,
                       score=score, fisher=nan.clone() if score == "fisher" else None)
    row = {n: i for i, n in enumerate(names)}
    own = solver_calibration is None or solver_name == "rtn" and not transforms  # data-free: nothing to fit
    # the full score's tail runs compare with float32 logits: their block inputs stay float32 too
    dtype = calibration_dtype_of(calibration_dtype) if score == "fisher" else torch.float32
    local = {i: [n[len(f"{prefix}.{i}."):] for n in names if n.startswith(f"{prefix}.{i}.")]
             for i in range(len(blocks))}
    grads, scored = None, None
    if score == "fisher":  # G per layer from one backward pass, the scored windows' statistics from the same pass
        scored = [StatsCollector(block, local[i], hessian=True, product_dtype=dtype,
                                 magnitudes=bool(transforms) and own) for i, block in enumerate(blocks)]
        with contextlib.ExitStack() as entered:
            for c in scored:
                entered.enter_context(c)
            grads = output_fisher(model, blocks, tail.norm, tail.head, names, batches[0], tail.pos, dtype=dtype,
                                  collectors=scored, progress=progress)
    with torch.no_grad():
        measured = [] if score == "fisher" else [c for c in range(C) if measure == "all" or c == ref_c]
        inputs = None if scored else capture_inputs(model, blocks[0], batches)
        fit = inputs if own else capture_inputs(model, blocks[0], _stack(solver_calibration))
        if measured:
            tail.ref_logp = tail.run(0, inputs)
        bar = tqdm(total=L * max(len(measured), 1), desc="sensitivity", unit="run" if measured else "layer",
                   disable=not progress)
        for i, block in enumerate(blocks):
            head = f"{prefix}.{i}."
            if scored:
                col, outs = scored[i], None
            else:
                col, outs = _block_stats(block, local[i], inputs, bool(transforms) and own, dtype)
            fitted, fit_outs = (col, outs) if own else _block_stats(block, local[i], fit, bool(transforms), dtype)
            for n in local[i]:
                _measure_layer(sens, row[head + n], block.get_submodule(n), col.stats[n], fitted.stats[n], recipes,
                               (transforms, solver_name, solver), measured, tail, i, inputs, bar,
                               None if grads is None else grads[head + n])
            if outs is not None:
                inputs = [BlockInput(y, x.kwargs) for x, y in zip(inputs, outs)]
            fit = inputs if own else [BlockInput(y, x.kwargs) for x, y in zip(fit, fit_outs)]
    bar.close()
    sens.seconds = time.perf_counter() - t0
    return sens


def _block_stats(block, local, windows, magnitudes, dtype) -> tuple[StatsCollector, list[torch.Tensor]]:
    """One block's forward over `windows` (BlockInputs): (its layers' input statistics, its float32
    outputs: the next block's inputs)."""
    outs = []
    with StatsCollector(block, local, hessian=True, product_dtype=dtype, magnitudes=magnitudes) as c, \
            compute_autocast(dtype):
        for b, inp in enumerate(windows):
            c.batch = b
            outs.append(run_block(block, inp).float())
    return c, outs


def _transformed(w: torch.Tensor, scheme, stats, transforms) -> tuple["torch.Tensor | None", object]:
    """The chain's transforms (AWQ) on this layer alone: (scales s [in] or None, the statistics of
    the inputs X / s). The scales are picked once per layer, under the reference candidate's scheme,
    and kept for every candidate (AWQ's search costs 20 quantizations of the layer per scheme; the
    pipeline picks them per group of layers sharing an input, under those layers' own schemes)."""
    if not transforms:
        return None, stats
    stats = copy.deepcopy(stats)  # the scales change the statistics; the original H prices the error
    s = torch.ones(w.shape[1])
    for kind in transforms:
        t = TRANSFORMS[kind]([w * s], stats, scheme, **_SEARCH.get(kind, {}))
        stats.scale_inputs(t)
        s = s * t
    return s, stats


def _candidate_weight(w: torch.Tensor, scheme, s, stats, chain) -> tuple[torch.Tensor, int]:
    """(the weight [out, in] the chain leaves for this layer under `scheme`, in the original input
    basis; its QTensor.nbytes). With transform scales s the solver quantizes W s on inputs X / s and
    the effective weight is Q(W s) / s; AWQ clips the scaled weight unless GPTQ solves next
    (pipeline/transforms.py). Leaving the scales out misprices a calibrated recipe."""
    transforms, solver_name, solver = chain
    if s is not None:
        w = w * s
        if "awq" in transforms and solver_name != "gptq":
            w = awq_clip(w, scheme, stats)
    q = solver(w, scheme, stats=stats) if getattr(solver, "needs", ()) else solver(w, scheme)
    w_hat = q.dequantize().float()
    return (w_hat if s is None else w_hat / s), q.nbytes


def _measure_layer(sens, l, lin, stats, fit_stats, recipes, chain, measured, tail, i, inputs, bar, g) -> None:
    """stats: the scored windows' inputs (output error, proxy, Fisher); fit_stats: what the method
    fits on; g: the layer's summed squared output gradients [out] (score="fisher"), else None."""
    w = linear_weight(lin).float()
    H = stats.hessian
    sens.numel[l] = w.numel()
    signal = float(output_error_rows(w, H, torch.float64).sum()) or 1e-30
    mean_diag = float(H.diagonal().mean())
    s, scaled = _transformed(w, recipes[sens.reference].weights, fit_stats, chain[0])
    for c, r in enumerate(recipes):
        w_hat, sens.nbytes[l, c] = _candidate_weight(w, r.weights, s, scaled, chain)
        d = w - w_hat
        row = output_error_rows(d, H, torch.float64)  # (D H D^T)_jj: the output error per output channel
        sens.output_err[l, c] = float(row.sum()) / signal
        sens.proxy[l, c] = mean_diag * float(d.pow(2).sum(dtype=torch.float64))
        if g is not None:
            sens.fisher[l, c] = fisher_cost(row / 2, g, sens.tokens)  # Hbar = H / 2
        if c in measured:
            sens.kl[l, c], sens.dloss[l, c] = _swapped(lin, w_hat, tail, i, inputs)
            sens.runs += 1
            bar.update()
    if g is not None:
        bar.update()


def _swapped(lin, w_hat: torch.Tensor, tail: _Tail, i: int, inputs) -> tuple[float, float]:
    """Score the model with `lin`'s weight replaced by w_hat [out, in], then restore it."""
    saved = lin.weight.data
    lin.weight.data = (w_hat.t() if type(lin).__name__ == "Conv1D" else w_hat).to(saved.dtype)
    try:
        return tail.score(tail.run(i, inputs))
    finally:
        lin.weight.data = saved
