"""lowbit.quantize(model, recipe): quantize a torch model in place.

0. a whole-model transform in the method chain (`rotate+...`) rewrites the model first (rotate.py);
1. pick the Linear-like modules the recipe covers (include/exclude/overrides), and quantize
   the embedding table and output layer when the recipe gives them schemes (embeddings.py),
   first, so calibration sees the model's quantized embeddings;
2. static activation recipes: run the calibration batches through the model
   with an observer on each selected module's input, then fix the ranges;
3. replace each module with a QuantLinear holding the method's QTensor.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..core import Scheme
from ..core.hessian import output_error
from ..core.observers import make_observer
from ..methods import block_transforms, get_method, method_needs, model_transforms, parse_method
from ..methods import rtn as rtn_method
from ..methods.bitnet import is_bitnet
from ..methods.gptq import solved_losses
from ..nn import BitLinear, LLMInt8Linear, QuantLinear
from .embeddings import embedding_jobs, quantize_embeddings
from .experts import coverage, is_router, unfuse_experts
from .learned_rounding import BlockRounding
from .recipe import Recipe, get_recipe
from .rotate import rotate_model
from .sequential import LayerReport, layer_loss, run_sequential
from .sequential import calibration_dtype as calibration_dtype_of
from .transforms import apply_transforms
from .walk import is_linear, linear_weight, set_module


def plan(model: nn.Module, recipe: Recipe, allow_empty: bool = False) -> dict[str, Recipe]:
    """{module name: the recipe that applies to it} for every module that will be quantized
    (none: an error, unless allow_empty)."""
    out = {}
    for name, m in model.named_modules():
        r = recipe.for_module(name) if name else None
        if r is None:
            continue
        if is_linear(m):
            out[name] = r
        elif _fused_weights(m) and not is_router(name, m):
            raise ValueError(f"module {name!r} ({type(m).__name__}) holds weights of shape "
                             f"{[tuple(p.shape) for p in _fused_weights(m)]} that lowbit cannot quantize yet; "
                             f"exclude it (exclude=[..., {name.rpartition('.')[0] + '.*' if '.' in name else name!r}]) "
                             "to keep it in float")
        elif _named_explicitly(name, recipe):
            raise ValueError(f"module {name!r} ({type(m).__name__}) cannot be quantized: lowbit quantizes "
                             "Linear layers; change the recipe's include patterns")
    if not out and not allow_empty:
        raise ValueError(f"recipe {recipe.name or ''!r} matches no Linear layer of {type(model).__name__}; "
                         f"include={list(recipe.include)}, exclude={list(recipe.exclude)}")
    return out


def weight_plan(model: nn.Module, recipe: Recipe, modules: "set[str] | None" = None
                ) -> dict[str, tuple[str, Scheme, dict]]:
    """{module name: (solver, scheme, solver options)} for each weight quantize() would round or
    solve, of the `modules` given (all by default): the recipe's Linear layers, then the embedding
    tables and output layer (round to nearest; a tied pair under the table's name). io/streaming
    reads it to send the weights out as independent tasks (Ray) before quantize() runs."""
    targets = plan(model, recipe, allow_empty=True)
    out = {}
    for names, _, scheme in embedding_jobs(model, recipe, taken=set(targets), only=modules):
        out[names[0]] = ("rtn", scheme, {})
    for name, r in targets.items():
        if modules is None or name in modules:
            solver = parse_method(r.method)[1]
            out[name] = (solver, r.weights, r.method_options.get(solver, {}))
    return out


def _fused_weights(m: nn.Module) -> list:
    """Parameters of 3 or more dimensions outside convolutions: fused experts of a kind lowbit does not unfuse."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return []
    return [p for p in m.parameters(recurse=False) if p.dim() >= 3]


# An expert the calibration routes fewer tokens to is rounded to nearest: a Hessian of a handful of
# tokens makes GPTQ fit those tokens, not the expert's inputs.
MIN_EXPERT_TOKENS = 16


def _named_explicitly(name: str, recipe: Recipe) -> bool:
    return name in recipe.include or any(o.pattern == name and not o.skip for o in recipe.overrides)


def quantize(model: nn.Module, recipe: "Recipe | str", calibration: Iterable | None = None, *,
             method: str | None = None, progress: bool = True, propagate: str = "quantized",
             batch_size: int = 8, calibration_dtype: "torch.dtype | str" = "auto",
             on_layer: "Callable | None" = None, modules: "set[str] | None" = None,
             solve: "Callable | None" = None, block_scope: "Callable | None" = None,
             spill=None, call_solver: "Callable | None" = None, solve_workers: int = 2, resume=None) -> nn.Module:
    """Quantize `model` in place and return it.

    `calibration`: an iterable of input batches (token id tensors [batch, seq], or dicts
    of model inputs), needed for static activation recipes and for methods that use
    statistics (gptq): those run block by block (pipeline/sequential.py), and the
    report lands in `model.lowbit_calibration`. Windows of equal length are stacked
    `batch_size` at a time. `calibration_dtype` ("auto", "bf16", "fp32"): what those
    calibration forwards and Hessian products run in ("auto": bf16 where the CPU has native
    bf16 matmul; see pipeline.sequential.calibration_dtype).
    `on_layer(name, w, qweight, stats)`: called after each layer's solve with the weight it
    quantized ([out, in], after any transform), its QTensor and its statistics (None when
    data-free); the per-layer analysis (analysis.layer_errors) reads errors there.
    `modules`: quantize only these modules (and the embeddings/output layer only if named), the
    rest of the model may be on the meta device: how io/streaming/ quantizes a checkpoint one
    block at a time. Data-free methods only.
    `solve(name, solver, scheme, options)`: with `modules`, may return a module's QTensor in place
    of quantizing its weight (None: quantize it as usual); io/streaming/ quantizes weights too
    big to hold whole there, rows read from disk (pipeline/rowwise.py), the module's weight on meta.
    `block_scope`, `spill`, `resume` (calibrated methods): passed to run_sequential; io/streaming/
    loads each block there, keeps activations past a memory limit on disk (pipeline/spill.py) and
    resumes an interrupted job at the block whose inputs it saved.
    `call_solver(fn, w, scheme, stats, options)`: runs a solver (default: call(), here); with
    `solve_workers` calls at once per block, io/streaming/ray.py runs each as a Ray task.
    """
    recipe = get_recipe(recipe, method)
    rotate = _check_rotation(recipe, modules)
    if modules is None:  # streaming keeps the checkpoint's own tensor names
        unfuse_experts(model, covered=lambda n: recipe.for_module(f"{n}.0.gate_proj") is not None)
    if rotate:
        model.lowbit_rotation = rotate_model(model, **recipe.method_options.get("rotate", {}))
    targets = plan(model, recipe, allow_empty=modules is not None)
    taken = set(targets)
    if modules is not None:
        targets = {n: r for n, r in targets.items() if n in modules}
        if any(method_needs(r.method) for r in targets.values()) or recipe.observer:
            raise ValueError(f"quantizing part of a model takes data-free methods; {recipe.method!r} needs calibration")
    quantize_embeddings(model, recipe, taken=taken, only=modules, solve=solve)
    # Transforms change what the layers see: observe activations after them, on the quantized model.
    observe_late = bool(recipe.observer) and any(block_transforms(parse_method(r.method)[0]) for r in targets.values())
    act_ranges = _calibrate(model, targets, calibration, progress) if recipe.observer and not observe_late else {}

    def quantize_layer(name: str, stats=None) -> LayerReport:
        r = targets[name]
        old = model.get_submodule(name)
        fn = get_method(r.method)  # the solver of the chain; transforms ran before
        solver = parse_method(r.method)[1]
        opts = r.method_options.get(solver, {})
        learned = block_solver.learned.pop(name, None) if block_solver is not None else None  # trained with its block
        qweight = solve(name, solver, r.weights, opts) if solve is not None and stats is None else None
        qweight = learned.qtensor() if learned is not None else qweight
        w = linear_weight(old).float() if qweight is None or on_layer is not None or learned is not None else None
        fallback, seen = (_expert_fallback(name, stats) if needs else None), stats
        if fallback:
            fn, stats, opts = rtn_method, None, {}
        if qweight is None:
            qweight = (call_solver or call)(fn, w, r.weights, stats, opts)
        scale, zero = act_ranges.get(name, (None, None))
        if r.outlier_threshold is not None:  # LLM.int8(): outlier columns in full precision at run time
            new = LLMInt8Linear.from_linear(old, qweight, act_scheme=r.activations, threshold=r.outlier_threshold)
        elif is_bitnet(r.weights, r.activations):  # BitNet b1.58: the ternary x int8 forward
            new = BitLinear.from_linear(old, qweight, act_scheme=r.activations)
        else:
            new = QuantLinear.from_linear(old, qweight, act_scheme=r.activations, act_scale=scale, act_zero=zero)
        set_module(model, name, new)
        if on_layer is not None:
            on_layer(name, w, qweight, stats)
        report = _layer_report(name, r, w, qweight, stats)
        if needs and ".experts." in name:
            report.tokens, report.fallback = 0 if seen is None else seen.n, fallback
        return report

    needs = {k for r in targets.values() for k in method_needs(r.method)}
    block_solver = _block_solver(targets, calibration_dtype) if "block" in needs else None
    if needs:
        if calibration is None:
            raise ValueError(f"method(s) {sorted({r.method for r in targets.values()})} use calibration "
                             "statistics: pass calibration=batches of inputs")
        model.lowbit_calibration = run_sequential(model, list(targets), _batches(calibration, batch_size),
                                                  quantize_layer, hessian="hessian" in needs,
                                                  magnitudes=bool(needs & {"absmax", "absmean"}),
                                                  transform=_transform_step(targets, recipe.method_options),
                                                  propagate=propagate, compute_dtype=calibration_dtype,
                                                  progress=progress, block_scope=block_scope, spill=spill,
                                                  workers=solve_workers, resume=resume, solve_block=block_solver)
        if block_solver is not None:
            model.lowbit_calibration.block_losses = block_solver.losses
    else:
        for name in tqdm(targets, desc="quantize", unit="layer", disable=not progress):
            quantize_layer(name)
    if observe_late:
        for name, (scale, zero) in _calibrate(model, targets, calibration, progress).items():
            model.get_submodule(name).set_activation_range(scale, zero)
    model.lowbit_recipe = recipe
    model.lowbit_coverage = coverage(model)
    if progress:
        if rotate:
            tqdm.write(model.lowbit_rotation.summary())
        tqdm.write(model.lowbit_coverage.summary())
    return model


def _check_rotation(recipe: Recipe, modules) -> bool:
    """Whether the recipe's chain rotates the model (a whole-model transform: the recipe's own method
    decides; an override cannot rotate part of a model)."""
    for o in recipe.overrides:
        if o.method and model_transforms(o.method):
            raise ValueError(f"override {o.pattern!r}: method {o.method!r} rotates the whole model; put "
                             "'rotate+' in the recipe's own method instead")
    rotate = bool(model_transforms(recipe.method))
    if rotate and modules is not None:
        raise ValueError(f"method {recipe.method!r}: rotate rewrites the whole model at once; it cannot run "
                         "on a part of one (streaming): quantize the loaded model instead")
    return rotate


def _block_solver(targets: dict[str, Recipe], dtype) -> BlockRounding:
    """Learned rounding for the layers whose solver trains whole blocks (signround), on their schemes."""
    from ..methods.signround import SchemeRounding
    learned = {n: r for n, r in targets.items() if getattr(get_method(r.method), "block", False)}
    solver = parse_method(next(iter(learned.values())).method)[1]
    options = next(iter(learned.values())).method_options.get(solver, {})
    clip = bool(options.get("clip", True))

    def make(name: str, w: torch.Tensor):
        r = learned.get(name)
        return None if r is None else SchemeRounding(w, r.weights, clip=clip)
    return BlockRounding(make, options, calibration_dtype_of(dtype))


def _expert_fallback(name: str, stats) -> str | None:
    """Why an expert layer is rounded to nearest instead of solved on its statistics, or None."""
    n = 0 if stats is None else stats.n
    if ".experts." in name and n < MIN_EXPERT_TOKENS:
        return f"fewer than {MIN_EXPERT_TOKENS} calibration tokens routed"
    return None


def call(fn, w: torch.Tensor, scheme: Scheme, stats, options: dict):
    """Run the solver fn on w [out, in] (with its statistics when it declares it needs some)."""
    return fn(w, scheme, stats=stats, **options) if getattr(fn, "needs", ()) else fn(w, scheme, **options)


def _transform_step(targets: dict[str, Recipe], options: dict):
    chains = {}
    for n, r in targets.items():
        transforms, solver = parse_method(r.method)
        chains[n] = (block_transforms(transforms), solver)  # rotate ran on the whole model before
    if not any(t for t, _ in chains.values()):
        return None

    def step(block, local, stats, producers, sample, where):
        head = where + "."
        apply_transforms(block, local, {n: chains[head + n][0] for n in local},
                         {n: targets[head + n].weights for n in local}, stats, producers, sample, where,
                         solvers={n: chains[head + n][1] for n in local}, options=options)
    return step


def _layer_report(name: str, r: Recipe, w: torch.Tensor, qweight, stats) -> LayerReport:
    H = getattr(stats, "hessian", None)
    if H is None:
        return LayerReport(name, r.method)
    known = solved_losses(stats, w, qweight)  # gptq's fallback measured both already
    if known is not None:
        base = output_error(w, H).clamp(min=1e-30)
        return LayerReport(name, r.method, float(known[0] / base), float(known[1] / base))
    rtn = qweight if r.method == "rtn" else rtn_method(w, r.weights)
    return LayerReport(name, r.method, layer_loss(w, qweight.dequantize(), H), layer_loss(w, rtn.dequantize(), H))


def _batches(calibration: Iterable, batch_size: int) -> list:
    """Stack runs of equal-shaped token tensors into batches of `batch_size` windows."""
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty: give at least one batch")
    out, run = [], []
    for x in items:
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            x = x[None]
        if run and (not isinstance(x, torch.Tensor) or x.shape[1:] != run[0].shape[1:] or len(run) >= batch_size):
            out.append(torch.cat(run))
            run = []
        if isinstance(x, torch.Tensor):
            run.append(x)
        else:
            out.append(x)
    if run:
        out.append(torch.cat(run))
    return out


@torch.no_grad()  # not inference_mode: the scales it makes must be usable outside it
def _calibrate(model, targets: dict[str, Recipe], calibration, progress):
    if calibration is None:
        raise ValueError("this recipe quantizes activations statically: pass calibration=batches of inputs")
    observers = {n: make_observer(r.observer) for n, r in targets.items()}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: observers[n].update(args[0])) for n in targets]
    try:
        batches = list(calibration)
        if not batches:
            raise ValueError("calibration is empty: give at least one batch")
        for b in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in hooks:
            h.remove()
    ranges = {}
    for n, r in targets.items():
        a = r.activations
        levels = 2**a.bits
        lo, hi = observers[n].range(a.symmetric, levels)
        if a.symmetric:
            qmax = 2 ** (a.bits - 1) - 1
            ranges[n] = (torch.tensor(max(hi, 1e-8) / qmax), None)
        else:
            s = max(hi - lo, 1e-8) / (levels - 1)
            ranges[n] = (torch.tensor(s), torch.tensor(round(-lo / s)))
    return ranges
