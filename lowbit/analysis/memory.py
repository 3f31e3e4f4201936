"""Memory before anything is loaded: weights under each recipe, the KV cache, training state.

Weights are counted as lowbit stores them: each Linear the recipe quantizes (pipeline.plan, the
same selection `lowbit.quantize` makes) is a QTensor laid out by core.layout.qtensor_layout, whose
nbytes is QTensor.nbytes (codes, scales, zero points, tensor scales, double-quantized scales);
the embedding table and output layer follow the recipe's `embeddings`/`output` schemes (one
tensor when tied, as pipeline.embeddings does); everything else is held in the model's dtype.
A quantized copy of a model has exactly these bytes (eval.model_size; tests/test_memory.py).

    t = memory_table("8B", ["fp32", "bf16", "w4g64-sym"], context=8192, batch=1, train=["adamw"])
    t.rows[0].weights_bytes / 1e9   # -> 32.1
    print(format_memory(t))

Training (activations not counted): "adamw": fp32 weights, fp32 gradients, fp32 Adam m and v,
16 bytes per parameter; "adamw8bit": bf16 weights and gradients, 8-bit Adam states with one fp32
absmax per 2048 values per state, 32-bit state for tensors under 4096 values (lowbit.optim.AdamW8bit), about 6; "qlora": the nf4-dq
base (frozen, bf16 elsewhere) plus rank-`lora_rank` adapters on every Linear it quantizes, held in
fp32 with fp32 gradients and Adam states.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.layout import qtensor_layout
from ..optim.adam import MIN_8BIT_SIZE
from ..optim.blockwise import BLOCK as ADAM8_BLOCK
from ..pipeline import get_recipe
from ..pipeline.embeddings import _tied_scheme, embedding_targets
from ..pipeline.quantize import plan
from ..pipeline.walk import linear_weight
from ..eval.size import BITS_LAYERS, BITS_MODEL
from .compare import bits_legend, parse_specs
from .shapes import ModelShapes, gguf_saved, model_shapes

DTYPE_ROWS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_RECIPES = ("fp32", "bf16", "w8", "fp8", "w4g64", "w4g64-sym", "nf4", "mxfp4", "nvfp4", "w3g64", "w2g64")
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
TRAINING = ("adamw", "adamw8bit", "qlora")


def adam8_state_bytes(numel: int) -> int:
    """Bytes of lowbit.optim.AdamW8bit's two moments for a tensor of `numel` values: uint8 codes
    plus an fp32 absmax per block of 2048, or fp32 moments under 4096 values (as it stores them)."""
    if numel < MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * (numel + 4 * math.ceil(numel / ADAM8_BLOCK))
QLORA_BASE = "nf4-dq"


@dataclass(frozen=True)
class MemoryRow:
    recipe: str            # a recipe spec ("w4g64", "w4g64:hqq") or a dtype ("fp32", "bf16")
    params: int            # weights the model represents
    quantized_bytes: int   # Linear layers the recipe quantizes: codes, scales, zeros, bias, activation scales
    embedding_bytes: int   # input embedding tables and the output layer (once when tied)
    other_bytes: int       # the rest: norms, float layers, buffers
    kv_cache_bytes: int    # for the table's context and batch (0: not asked, or no KV cache)
    bits_per_weight_layers: float = float("nan")  # BITS_LAYERS (a dtype row: the dtype's width)

    @property
    def weights_bytes(self) -> int:
        return self.quantized_bytes + self.embedding_bytes + self.other_bytes

    @property
    def bits_per_weight_model(self) -> float:
        """BITS_MODEL: every byte of the weights over every parameter."""
        return 8.0 * self.weights_bytes / max(self.params, 1)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class TrainingRow:
    regime: str            # adamw, adamw8bit, qlora
    params: int
    trainable_params: int  # all parameters, or the LoRA adapters
    weights_bytes: int     # as held while training (adapters included)
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.params, 1)


@dataclass(frozen=True)
class MemoryTable:
    source: str            # where the shapes came from
    dtype: str             # unquantized tensors
    params: int
    checkpoint_params: int | None
    context: int
    batch: int
    kv_dtype: str
    kv_note: str           # the KV cache arithmetic, or why there is none
    rows: list[MemoryRow]
    training: list[TrainingRow] = field(default_factory=list)
    saved: MemoryRow | None = None  # a checkpoint given as the source: its own bytes as stored


def memory_table(source: "str | nn.Module", recipes: "str | list" = DEFAULT_RECIPES, *, context: int = 0,
                 batch: int = 1, kv_dtype: str = "bf16", train: "list[str] | tuple" = (), lora_rank: int = 16,
                 dtype: torch.dtype | None = None) -> MemoryTable:
    """The memory table of `source` (a checkpoint path, built-in name, size such as "8B", or a module).

    recipes: recipe specs ("w4g64", "w4g64:hqq") or dtypes ("fp32", "bf16"); context, batch: the KV
    cache to add (0: none); train: any of "adamw", "adamw8bit", "qlora"; dtype: what unquantized
    tensors are held in (default: the checkpoint's; a GGUF: fp32, as lowbit loads it).
    Example: memory_table("8B", ["bf16"]).rows[0].weights_bytes -> 16_060_522_496
    """
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"kv_dtype={kv_dtype!r}: choose one of {', '.join(KV_BYTES)}")
    if context < 0 or batch < 1:
        raise ValueError(f"context={context}, batch={batch}: give context >= 0 and batch >= 1")
    bad = [t for t in train if t not in TRAINING]
    if bad:
        raise ValueError(f"train={bad[0]!r}: choose from {', '.join(TRAINING)}")
    specs = _specs(recipes)
    shapes = model_shapes(source, dtype)
    kv, note = _kv_cache(shapes, context, batch, kv_dtype)
    rows = [weight_row(shapes, spec, kv) for spec in specs]
    saved = MemoryRow(kv_cache_bytes=kv, **shapes.saved) if shapes.saved is not None else None
    training = [_training_row(shapes, t, lora_rank) for t in train]
    return MemoryTable(shapes.source, str(shapes.dtype).removeprefix("torch."), _params(shapes.model),
                       shapes.checkpoint_params, context, batch, kv_dtype, note, rows, training, saved)


def _specs(recipes) -> list[str]:
    """"fp32,w4g64:hqq" or a list -> ["fp32", "w4g64:hqq"] (dtypes kept, recipe specs checked by parse_specs)."""
    items = [i.strip() for i in recipes.split(",") if i.strip()] if isinstance(recipes, str) else list(recipes)
    if not items:
        raise ValueError("recipes: give at least one recipe or dtype, e.g. bf16,w4g64")
    out = []
    for item in items:
        if isinstance(item, str) and (item in DTYPE_ROWS or _is_gguf_type(item)):
            out.append(item)
        else:
            name, method = parse_specs([item])[0]
            out.append(f"{name}:{method}" if method else name)
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of `t` held in `dtype` (floating tensors; others keep their own)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
        else t.element_size()
    return t.numel() * size


def _is_gguf_type(name: str) -> bool:
    from ..io.gguf.mixtures import ALIASES, FILE_TYPES

    return name in FILE_TYPES or name in ALIASES


def gguf_row(shapes: ModelShapes, spec: str, kv_cache_bytes: int = 0) -> MemoryRow:
    """Bytes of the model written as GGUF file type `spec` (q8_0, q4_k_m, ...): each tensor's GGML type
    as llama.cpp's quantizer picks it (io.gguf.mixtures), blocks sized by core.ggml_blocks, as
    lowbit.save(format="gguf") writes them (tensor data only: the header and tokenizer are not counted)."""
    from ..core.ggml_blocks import get_type
    from ..io.gguf.arch import gguf_name, model_arch, n_expert
    from ..io.gguf.mixtures import file_type

    model = shapes.model
    try:
        config, arch = model_arch(model)
    except ValueError as e:
        raise ValueError(f"recipe {spec!r} is a GGUF file type: {e}") from None
    ft = file_type(spec)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
    if tied:
        state.pop("lm_head.weight", None)
    n_layer, n_gqa = config.num_hidden_layers, config.num_attention_heads // config.num_key_value_heads
    quantized = embedding = other = layer_weights = 0
    for key, t in state.items():
        name, layer = gguf_name(key, arch)
        shape = tuple(t.shape)
        kind = (ft.tensor_type(name, ne0=shape[-1], layer=layer, n_layer=n_layer, n_gqa=n_gqa, has_output=not tied,
                               arch=arch.gguf, n_expert=n_expert(config))
                if ft.quantizes(name, len(shape)) else "f32")
        g = get_type(kind)
        n = math.prod(shape) // g.block_size * g.type_size
        if name in ("token_embd.weight", "output.weight"):
            embedding += n
        elif layer >= 0 and len(shape) >= 2:
            quantized, layer_weights = quantized + n, layer_weights + math.prod(shape)
        else:
            other += n
    return MemoryRow(spec, _params(model), quantized, embedding, other, kv_cache_bytes,
                     8.0 * quantized / max(layer_weights, 1))


def weight_row(shapes: ModelShapes, spec: str, kv_cache_bytes: int = 0) -> MemoryRow:
    """Bytes of the model's weights under one recipe spec or dtype (see the module doc)."""
    if spec not in DTYPE_ROWS and _is_gguf_type(spec):
        return gguf_row(shapes, spec, kv_cache_bytes)
    model, dtype = shapes.model, DTYPE_ROWS.get(spec, shapes.dtype)
    recipe = None if spec in DTYPE_ROWS else get_recipe(*parse_specs(spec)[0])
    targets = plan(model, recipe) if recipe is not None else {}
    counted: set[int] = set()  # ids of tensors already counted
    quantized = layer_bytes = layer_weights = 0
    for name, r in targets.items():
        m = model.get_submodule(name)
        layout = qtensor_layout(tuple(linear_weight(m).shape), r.weights)
        quantized += layout.nbytes
        layer_bytes, layer_weights = layer_bytes + layout.nbytes, layer_weights + layout.numel
        bias = getattr(m, "bias", None)
        quantized += _nbytes(bias, dtype) if isinstance(bias, torch.Tensor) else 0
        if r.observer is not None:  # static activations: an fp32 scale (and zero point) per layer
            quantized += 4 * (1 if r.activations.symmetric else 2)
        counted.update(id(t) for t in m.parameters(recurse=False))
    embedding = _embedding_bytes(model, recipe, dtype, counted, set(targets))
    other = 0
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *(b for b in module.buffers(recurse=False) if b is not None)]:
            if id(t) not in counted:
                counted.add(id(t))
                other += _nbytes(t, dtype if isinstance(t, nn.Parameter) else None)
    # as eval.linear_bits_per_weight counts a model: the codes, scales and zeros of the quantized layers;
    # an unquantized model: its dtype's width
    layers = 8.0 * layer_bytes / layer_weights if layer_weights else 8.0 * torch.empty((), dtype=dtype).element_size()
    return MemoryRow(spec, _params(model), quantized, embedding, other, kv_cache_bytes, layers)


def _embedding_bytes(model: nn.Module, recipe, dtype, counted: set[int], taken: set[str]) -> int:
    """The input embedding tables and output layer as pipeline.embeddings stores them under `recipe`."""
    inputs, head = embedding_targets(model)
    head = head if head is not None and head[0] not in taken else None
    total = 0

    def add(module, scheme):
        nonlocal total
        w = module.weight
        if id(w) in counted:
            return
        total += qtensor_layout(tuple(w.shape), scheme).nbytes if scheme is not None else _nbytes(w, dtype)
        counted.add(id(w))

    tied = head is not None and any(head[1].weight is e.weight for _, e in inputs)
    if tied and recipe is not None and (recipe.embeddings or recipe.output):
        add(head[1], _tied_scheme(recipe))
    for _, e in inputs:
        add(e, recipe.embeddings if recipe is not None else None)
    if head is not None:
        add(head[1], recipe.output if recipe is not None else None)
        bias = getattr(head[1], "bias", None)
        if isinstance(bias, torch.Tensor) and id(bias) not in counted:
            total += _nbytes(bias, dtype)
            counted.add(id(bias))
    return total


def _kv_cache(shapes: ModelShapes, context: int, batch: int, kv_dtype: str) -> tuple[int, str]:
    """(bytes, the arithmetic in words): K and V per layer, per KV head, per position."""
    if not context:
        return 0, "KV cache: not asked (give a context length)"
    if shapes.layers is None:
        return 0, "KV cache: none (an encoder, or a model whose attention shape is unknown)"
    n = 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * context * batch * KV_BYTES[kv_dtype]
    return n, (f"KV cache: 2 x {shapes.layers} layers x {shapes.kv_heads} KV heads x {shapes.head_dim} head dim "
               f"x {context} tokens x batch {batch} x {KV_BYTES[kv_dtype]} B ({kv_dtype}) = "
               + (f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"))


def _training_row(shapes: ModelShapes, regime: str, lora_rank: int) -> TrainingRow:
    model = shapes.model
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    if regime == "adamw":
        w = weight_row(shapes, "fp32").weights_bytes
        return TrainingRow(regime, n, n, w, 4 * n, 8 * n)
    if regime == "adamw8bit":
        w = weight_row(shapes, "bf16").weights_bytes
        states = sum(adam8_state_bytes(p.numel()) for p in params)
        return TrainingRow(regime, n, n, w, 2 * n, states)
    base = ModelShapes(model, torch.bfloat16, shapes.source)
    recipe = get_recipe(QLORA_BASE)
    adapters = sum(lora_rank * sum(linear_weight(model.get_submodule(name)).shape) for name in plan(model, recipe))
    w = weight_row(base, QLORA_BASE).weights_bytes + 4 * adapters
    return TrainingRow(regime, n + adapters, adapters, w, 4 * adapters, 8 * adapters)


def gguf_weights(path) -> MemoryRow:
    """A .gguf file's own bytes and bits per weight, from its tensor table (shapes.gguf_saved)."""
    from ..io.gguf.file import parse_gguf

    return MemoryRow(kv_cache_bytes=0, **gguf_saved(parse_gguf(path)))


def format_memory(t: MemoryTable) -> str:
    """The table as text: one row per recipe, then the training rows when asked."""
    big = max([r.total_bytes for r in t.rows + ([t.saved] if t.saved else [])] + [r.total_bytes for r in t.training]) >= 1e9
    gb, unit = (1e9, "GB") if big else (1e6, "MB")
    lines = [f"{t.source}: {t.params / 1e6:,.1f}M parameters, unquantized tensors in {t.dtype}"
             + (f" (checkpoint headers: {t.checkpoint_params / 1e6:,.1f}M elements)" if t.checkpoint_params else "")]
    head = (f"{'recipe':<18} {BITS_LAYERS.short:>13} {BITS_MODEL.short:>12} {'weights ' + unit:>10} {'quantized':>10} "
            f"{'emb/out':>9} {'other':>8} {'KV cache':>9} {'total ' + unit:>9}")
    lines += [head, "-" * len(head)]
    for r in ([t.saved] if t.saved else []) + t.rows:
        lines.append(f"{r.recipe:<18} {r.bits_per_weight_layers:>13.2f} {r.bits_per_weight_model:>12.2f} "
                     f"{r.weights_bytes / gb:>10.4f} "
                     f"{r.quantized_bytes / gb:>10.4f} {r.embedding_bytes / gb:>9.4f} {r.other_bytes / gb:>8.4f} "
                     f"{r.kv_cache_bytes / gb:>9.4f} {r.total_bytes / gb:>9.4f}")
    lines.append(t.kv_note)
    lines.append(bits_legend())
    if t.training:
        head = (f"{'training':<10} {'trainable':>10} {'weights ' + unit:>10} {'grads ' + unit:>9} "
                f"{'optim ' + unit:>9} {'total ' + unit:>9} {'B/param':>7}")
        lines += ["", head, "-" * len(head)]
        for r in t.training:
            lines.append(f"{r.regime:<10} {r.trainable_params / 1e6:>9.1f}M {r.weights_bytes / gb:>10.4f} "
                         f"{r.gradient_bytes / gb:>9.4f} {r.optimizer_bytes / gb:>9.4f} {r.total_bytes / gb:>9.4f} "
                         f"{r.bytes_per_param:>7.2f}")
        lines.append("training: activations not counted; adamw = fp32 weights, grads, Adam m+v; adamw8bit = bf16 "
                     f"weights and grads, 8-bit Adam states (fp32 absmax per {ADAM8_BLOCK}, 32-bit under {MIN_8BIT_SIZE} values); qlora = {QLORA_BASE} "
                     "base + fp32 LoRA adapters with fp32 grads and Adam on every quantized Linear.")
    lines.append(f"{unit} = 1e{9 if big else 6} bytes; bytes counted as lowbit stores each tensor (scales and zero points included).")
    return "\n".join(lines)
