"""GGUF file types: which GGML type each tensor gets, as llama.cpp's own quantizer picks it.

    file_type("q4_k_m").tensor_type("blk.3.attn_v.weight", ne0=576, layer=3, n_layer=30, n_gqa=3)

The rules mirror `llama_tensor_get_type` (with `tensor_get_category`, `tensor_type_fallback` and
`tensor_allows_quantization`) in src/llama-quant.cpp of the llama.cpp that llama-cpp-python 0.3.36
vendors (2026-10), for a quantization without an importance matrix, --pure or per-tensor overrides:
the output matrix (or the token embedding when it is tied) gets more bits, the K-mixtures raise
attn_v (and the attn_v-like attn_qkv / attn_kv_b), ffn_down and attn_output in chosen layers, a
70B-class model (llama with 80 layers and grouped-query attention; qwen2 with 80) raises an attn_v
of Q3_K/Q4_K to Q5_K, a model of 8 experts raises attn_v/attn_k to Q8_0 and attn_output to Q5_K,
and a tensor whose rows are not a multiple of the type's block falls back to a 32-block type
(SmolLM2's 576-wide rows: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; then F16).
Only weights ending in "weight", of 2+ dimensions, not norms and not an MoE router are quantized;
the rest stay F32.

Left out, with the reason:
- rules for file types lowbit does not write (IQ1/IQ2/IQ3, IQ4_XS, Q2_K_S, TQ*, Q1_0/Q2_0, MXFP4_MOE,
  NVFP4), and the Q4_0/Q5_0 ffn_down rule that needs an importance matrix (lowbit passes none);
- rules for architectures lowbit does not write (Falcon, GLM5-next, and the tensors of BERT, RWKV,
  Mamba, T5 and vision/audio towers that tensor_allows_quantization keeps unquantized);
- llama.cpp (2026) writes F16 where a 32-block file type (q4_0 .. q8_0, iq4_nl) meets rows that are
  not a multiple of 32; lowbit refuses instead, naming the tensor, since a `q4_0` recipe that writes
  F16 is not what was asked for (a K type still falls back through its 32-block type to F16, as there).
- llama.cpp counts attn_v-like and ffn_down tensors in file order; `layer` stands for that count,
  which is the same for the one-per-layer models lowbit writes.
"""
from __future__ import annotations

from dataclasses import dataclass

# K-quant fallbacks when the row length is not a multiple of 256 (llama-quant.cpp tensor_type_fallback)
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
         "iq4_nl": 32, "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}
# llama.cpp's LLM_TYPE_70B by architecture: the layer count (llama also needs n_head != n_head_kv)
LAYERS_OF_70B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
TOKEN_EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")
# tensor_get_category: the first substring found names the category (order matters: attn_qkv first)
CATEGORIES = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
              "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down")
ATTN_V_LIKE = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")


def category(name: str) -> str:
    """llama.cpp's tensor category: "output", "token_embd", one of CATEGORIES, or "other"."""
    if name == "output.weight":
        return "output"
    if name in TOKEN_EMBEDDINGS:
        return "token_embd"
    return next((c for c in CATEGORIES if c in name), "other")


def is_70b(arch: str, n_layer: int, n_gqa: int, n_expert: int = 0) -> bool:
    """llama.cpp's LLM_TYPE_70B: an 80-layer llama with grouped-query attention (8x7B-style models of
    8 experts are typed by their own table), an 80-layer qwen2, ... (LAYERS_OF_70B)."""
    if arch == "llama" and (n_gqa == 1 or n_expert == 8):
        return False
    return LAYERS_OF_70B.get(arch) == n_layer


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type (`llama_ftype`): its id in general.file_type and its default tensor type."""
    name: str
    ftype: int
    default: str

    def quantizes(self, name: str, ndim: int) -> bool:
        return (name.endswith("weight") and ndim >= 2 and "_norm.weight" not in name
                and "ffn_gate_inp.weight" not in name)

    def tensor_type(self, name: str, *, ne0: int, layer: int, n_layer: int, n_gqa: int,
                    has_output: bool = True, arch: str = "llama", n_expert: int = 0) -> str:
        """GGML type for tensor `name` whose rows hold `ne0` values; `layer`: its block index (-1 outside);
        `arch`: the GGUF architecture name; `n_expert`: experts per MoE layer (0 for a dense model)."""
        if self.default in ("f32", "f16", "bf16"):
            return self.default  # llama.cpp applies no per-tensor rules to float file types
        t = self._choice(name, ne0, layer, n_layer, n_gqa, has_output, is_70b(arch, n_layer, n_gqa, n_expert),
                         n_expert)
        if ne0 % BLOCK[t]:
            if t not in FALLBACK:
                raise ValueError(f"tensor {name!r}: rows of {ne0} values are not a multiple of {t}'s "
                                 f"{BLOCK[t]}-value blocks (llama.cpp would write F16; lowbit refuses)")
            t = FALLBACK[t]
            if ne0 % BLOCK[t]:
                t = "f16"
        return t

    def _choice(self, name, ne0, layer, n_layer, n_gqa, has_output, big, n_expert) -> str:
        f, t, cat = self.name, self.default, category(name)
        if cat == "output" or (cat == "token_embd" and not has_output):
            if ne0 % BLOCK[t]:
                return "q8_0"
            return t if t == "q8_0" else "q6_k"
        if cat in ATTN_V_LIKE:
            return _attn_v(f, t, layer, n_layer, n_gqa, big, n_expert)
        if cat == "attn_k.weight":
            return "q8_0" if n_expert == 8 else t
        if cat == "ffn_down":
            return _ffn_down(f, t, layer, n_layer)
        if cat == "attn_output.weight":
            if n_expert == 8:
                return "q5_k" if f in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m") else t
            return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(f, t)
        return t  # token_embd (untied), attn_q, ffn_up, ffn_gate: rules only for IQ file types


def _attn_v(f: str, t: str, layer: int, n_layer: int, n_gqa: int, big: bool, n_expert: int) -> str:
    if f == "q2_k":
        t = "q4_k" if n_gqa >= 4 else "q3_k"
    elif f == "q3_k_m":
        t = "q5_k" if layer < 2 else "q4_k"
    elif f == "q3_k_l":
        t = "q5_k"
    elif f == "iq4_nl" and n_gqa >= 4:
        t = "q5_k"
    elif f in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layer):
        t = "q6_k"
    elif f == "q4_k_s" and layer < 4:
        t = "q5_k"
    if big and t in ("q3_k", "q4_k"):
        t = "q5_k"  # a 70B's attn_v is 8x smaller than attn_q (8 heads share it): more bits cost little
    return "q8_0" if n_expert == 8 else t


def _ffn_down(f: str, t: str, layer: int, n_layer: int) -> str:
    if f == "q2_k":
        return "q3_k"
    if f == "q3_k_m":
        return "q5_k" if layer < n_layer // 16 else "q4_k"
    if f == "q3_k_l":
        return "q5_k"
    if f == "q4_k_m":
        return "q6_k" if _use_more_bits(layer, n_layer) else t
    if f == "iq4_nl" and layer < n_layer // 8:
        return "q5_k"
    if f == "q5_k_m" and _use_more_bits(layer, n_layer):
        return "q6_k"
    if f == "q4_k_s" and layer < n_layer // 8:
        return "q5_k"
    return t


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


FILE_TYPES: dict[str, FileType] = {f.name: f for f in (
    FileType("f32", 0, "f32"), FileType("f16", 1, "f16"), FileType("bf16", 32, "bf16"),
    FileType("q8_0", 7, "q8_0"), FileType("q4_0", 2, "q4_0"), FileType("q4_1", 3, "q4_1"),
    FileType("q5_0", 8, "q5_0"), FileType("q5_1", 9, "q5_1"),
    FileType("q2_k", 10, "q2_k"), FileType("q3_k_s", 11, "q3_k"), FileType("q3_k_m", 12, "q3_k"),
    FileType("q3_k_l", 13, "q3_k"), FileType("q4_k_s", 14, "q4_k"), FileType("q4_k_m", 15, "q4_k"),
    FileType("q5_k_s", 16, "q5_k"), FileType("q5_k_m", 17, "q5_k"), FileType("q6_k", 18, "q6_k"),
    FileType("iq4_nl", 25, "iq4_nl"),
)}


# llama-quantize's short names (its QUANT_OPTIONS table): each is the _M mixture, same file type id
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}


def file_type(name: str) -> FileType:
    """The file type for a recipe name or one of llama-quantize's aliases (q4_k is q4_k_m)."""
    ft = FILE_TYPES.get(ALIASES.get(name, name))
    if ft is None:
        raise ValueError(f"unknown GGUF recipe {name!r}; known: {', '.join([*FILE_TYPES, *ALIASES])}")
    return ft
