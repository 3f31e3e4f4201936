"""GGUF file types: which GGML type each tensor gets, as llama.cpp's own quantizer picks it.

    file_type("q4_k_m").tensor_type("blk.3.attn_v.weight", ne0=576, layer=3, n_layer=30, n_gqa=3)

The rules mirror `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp (commit pinned in
bench/llama_cpp.sh) for dense models without an importance matrix: the output matrix (or the token
embedding when it is tied) gets more bits, the K-mixtures raise attn_v / ffn_down / attn_output in
chosen layers, and a tensor whose rows are not a multiple of the type's block falls back to a
32-block type (SmolLM2's 576-wide rows: Q2_K/Q3_K -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
Only weights ending in "weight", of 2+ dimensions and not norms, are quantized; the rest stay F32.
"""
from __future__ import annotations

from dataclasses import dataclass

# K-quant fallbacks when the row length is not a multiple of 256 (llama-quant.cpp convert_incompatible_tensor)
FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
         "iq4_nl": 32, "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type (`llama_ftype`): its id in general.file_type and its default tensor type."""
    name: str
    ftype: int
    default: str

    def quantizes(self, name: str, ndim: int) -> bool:
        return name.endswith("weight") and ndim >= 2 and "_norm.weight" not in name

    def tensor_type(self, name: str, *, ne0: int, layer: int, n_layer: int, n_gqa: int,
                    has_output: bool = True) -> str:
        """GGML type for tensor `name` whose rows hold `ne0` values; `layer`: its block index (-1 outside)."""
        if self.default in ("f32", "f16", "bf16"):
            return self.default  # llama.cpp applies no per-tensor rules to float file types
        t = self._choice(name, ne0, layer, n_layer, n_gqa, has_output)
        if ne0 % BLOCK[t]:
            if t not in FALLBACK:
                raise ValueError(f"tensor {name!r}: rows of {ne0} values are not a multiple of {t}'s "
                                 f"{BLOCK[t]}-value blocks and llama.cpp has no fallback type for {t}")
            t = FALLBACK[t]
            if ne0 % BLOCK[t]:
                t = "f16"
        return t

    def _choice(self, name, ne0, layer, n_layer, n_gqa, has_output) -> str:
        f, t = self.name, self.default
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            if ne0 % BLOCK[t]:
                return "q8_0"
            return t if t == "q8_0" else "q6_k"
        if name == "token_embd.weight":
            return t
        more = _use_more_bits(layer, n_layer)
        if "attn_v.weight" in name:
            if f == "q2_k":
                return "q4_k" if n_gqa >= 4 else "q3_k"
            if f == "q3_k_m":
                return "q5_k" if layer < 2 else "q4_k"
            if f == "q3_k_l":
                return "q5_k"
            if f == "iq4_nl" and n_gqa >= 4:
                return "q5_k"
            if f in ("q4_k_m", "q5_k_m") and more:
                return "q6_k"
            if f == "q4_k_s" and layer < 4:
                return "q5_k"
            return t
        if "ffn_down" in name:
            if f == "q2_k":
                return "q3_k"
            if f == "q3_k_m":
                return "q5_k" if layer < n_layer // 16 else "q4_k"
            if f == "q3_k_l":
                return "q5_k"
            if f == "q4_k_m":
                return "q6_k" if more else t
            if f == "iq4_nl" and layer < n_layer // 8:
                return "q5_k"
            if f == "q5_k_m" and more:
                return "q6_k"
            if f == "q4_k_s" and layer < n_layer // 8:
                return "q5_k"
            return t
        if "attn_output.weight" in name:
            return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(f, t)
        if "attn_qkv.weight" in name:
            return {"q3_k_m": "q4_k", "q3_k_l": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(f, t)
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
