"""GGUF mixtures: the GGML type of every tensor kind, per file type, against tables written by hand
from llama_tensor_get_type in the llama.cpp that llama-cpp-python 0.3.36 vendors (src/llama-quant.cpp):
a 70B-shaped llama (80 layers, 8 query heads per KV head, untied output, rows multiple of 256) and a
SmolLM2-shaped one (30 layers, GQA 3, tied embedding, 576-wide rows that K blocks do not fit)."""
import pytest

from lowbit.io.gguf.mixtures import FILE_TYPES, category

KINDS = ("attn_v", "ffn_down", "attn_output", "attn_q", "ffn_up", "attn_k")


def _row(v, d, o, q, head):
    """attn_v and ffn_down at the table's four layers; attn_output, attn_q (also ffn_up, attn_k) in every
    layer; the output matrix (70B) or the tied token embedding (small)."""
    return v.split(), d.split(), o, q, head


def _same(t, head):
    return _row(f"{t} {t} {t} {t}", f"{t} {t} {t} {t}", t, t, head)


# layers 1, 4, 11, 12 of 80: use_more_bits is true for 1, 4 (< 80/8) and 12 ((12 - 10) % 3 == 2), not 11;
# 80/16 = 5. The 70B rule raises an attn_v of Q3_K or Q4_K to Q5_K.
LAYERS_70B = (1, 4, 11, 12)
TABLE_70B = {
    "q4_0": _same("q4_0", "q6_k"), "q4_1": _same("q4_1", "q6_k"), "q5_0": _same("q5_0", "q6_k"),
    "q5_1": _same("q5_1", "q6_k"), "q8_0": _same("q8_0", "q8_0"), "q6_k": _same("q6_k", "q6_k"),
    "f16": _same("f16", "f16"), "bf16": _same("bf16", "bf16"), "f32": _same("f32", "f32"),
    "q2_k": _row("q5_k q5_k q5_k q5_k", "q3_k q3_k q3_k q3_k", "q3_k", "q2_k", "q6_k"),
    "q3_k_s": _row("q5_k q5_k q5_k q5_k", "q3_k q3_k q3_k q3_k", "q3_k", "q3_k", "q6_k"),
    "q3_k_m": _row("q5_k q5_k q5_k q5_k", "q5_k q5_k q4_k q4_k", "q4_k", "q3_k", "q6_k"),
    "q3_k_l": _row("q5_k q5_k q5_k q5_k", "q5_k q5_k q5_k q5_k", "q5_k", "q3_k", "q6_k"),
    "q4_k_s": _row("q5_k q5_k q5_k q5_k", "q5_k q5_k q4_k q4_k", "q4_k", "q4_k", "q6_k"),
    "q4_k_m": _row("q6_k q6_k q5_k q6_k", "q6_k q6_k q4_k q6_k", "q4_k", "q4_k", "q6_k"),
    "q5_k_s": _row("q5_k q5_k q5_k q5_k", "q5_k q5_k q5_k q5_k", "q5_k", "q5_k", "q6_k"),
    "q5_k_m": _row("q6_k q6_k q5_k q6_k", "q6_k q6_k q5_k q6_k", "q5_k", "q5_k", "q6_k"),
    "iq4_nl": _row("q5_k q5_k q5_k q5_k", "q5_k q5_k iq4_nl iq4_nl", "iq4_nl", "iq4_nl", "q6_k"),
}

# layers 0, 2, 5, 9 of 30: use_more_bits for 0, 2 (< 30/8 = 3) and 5 ((5 - 3) % 3 == 2), not 9; 30/16 = 1.
# 576-wide rows: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; ffn_down (1536) keeps K.
LAYERS_SMALL = (0, 2, 5, 9)
TABLE_SMALL = {
    "q4_0": _same("q4_0", "q8_0"), "q4_1": _same("q4_1", "q8_0"), "q5_0": _same("q5_0", "q8_0"),
    "q5_1": _same("q5_1", "q8_0"), "q8_0": _same("q8_0", "q8_0"), "f16": _same("f16", "f16"),
    "q2_k": _row("q4_0 q4_0 q4_0 q4_0", "q3_k q3_k q3_k q3_k", "q4_0", "q4_0", "q8_0"),
    "q3_k_s": _row("q4_0 q4_0 q4_0 q4_0", "q3_k q3_k q3_k q3_k", "q4_0", "q4_0", "q8_0"),
    "q3_k_m": _row("q5_1 q5_0 q5_0 q5_0", "q5_k q4_k q4_k q4_k", "q5_0", "q4_0", "q8_0"),
    "q3_k_l": _row("q5_1 q5_1 q5_1 q5_1", "q5_k q5_k q5_k q5_k", "q5_1", "q4_0", "q8_0"),
    "q4_k_s": _row("q5_1 q5_1 q5_0 q5_0", "q5_k q5_k q4_k q4_k", "q5_0", "q5_0", "q8_0"),
    "q4_k_m": _row("q8_0 q8_0 q8_0 q5_0", "q6_k q6_k q6_k q4_k", "q5_0", "q5_0", "q8_0"),
    "q5_k_s": _row("q5_1 q5_1 q5_1 q5_1", "q5_k q5_k q5_k q5_k", "q5_1", "q5_1", "q8_0"),
    "q5_k_m": _row("q8_0 q8_0 q8_0 q5_1", "q6_k q6_k q6_k q5_k", "q5_1", "q5_1", "q8_0"),
    "q6_k": _row("q8_0 q8_0 q8_0 q8_0", "q6_k q6_k q6_k q6_k", "q8_0", "q8_0", "q8_0"),
    "iq4_nl": _row("iq4_nl iq4_nl iq4_nl iq4_nl", "q5_k q5_k iq4_nl iq4_nl", "iq4_nl", "iq4_nl", "q8_0"),
}


def _types(ft, layers, width, ffn_width, head, **kw):
    def at(kind, layer):
        return ft.tensor_type(f"blk.{layer}.{kind}.weight", ne0=ffn_width if kind == "ffn_down" else width,
                              layer=layer, **kw)
    attn_v = [at("attn_v", i) for i in layers]
    ffn_down = [at("ffn_down", i) for i in layers]
    every = {kind: {at(kind, i) for i in layers} for kind in ("attn_output", "attn_q", "ffn_up", "attn_k")}
    return attn_v, ffn_down, every, ft.tensor_type(head, ne0=width, layer=-1, **kw)


@pytest.mark.parametrize("name", sorted(TABLE_70B))
def test_70b_shaped_llama(name):
    v, d, o, q, head = TABLE_70B[name]
    attn_v, ffn_down, every, got_head = _types(FILE_TYPES[name], LAYERS_70B, 8192, 28672, "output.weight",
                                               n_layer=80, n_gqa=8, has_output=True, arch="llama")
    assert (attn_v, ffn_down, got_head) == (v, d, head)
    assert every == {"attn_output": {o}, "attn_q": {q}, "ffn_up": {q}, "attn_k": {q}}
    untied = FILE_TYPES[name].tensor_type("token_embd.weight", ne0=8192, layer=-1, n_layer=80, n_gqa=8)
    assert untied == FILE_TYPES[name].default


@pytest.mark.parametrize("name", sorted(TABLE_SMALL))
def test_smollm2_shaped_llama(name):
    v, d, o, q, head = TABLE_SMALL[name]
    attn_v, ffn_down, every, got_head = _types(FILE_TYPES[name], LAYERS_SMALL, 576, 1536, "token_embd.weight",
                                               n_layer=30, n_gqa=3, has_output=False, arch="llama")
    assert (attn_v, ffn_down, got_head) == (v, d, head)
    assert every == {"attn_output": {o}, "attn_q": {q}, "ffn_up": {q}, "attn_k": {q}}


def test_which_models_are_70b():
    """LLM_TYPE_70B: llama with 80 layers and n_head != n_head_kv (llama-model: 65B otherwise), qwen2 with 80."""
    ft, kw = FILE_TYPES["q4_k_m"], dict(ne0=8192, layer=11, n_layer=80)
    v = "blk.11.attn_v.weight"
    assert ft.tensor_type(v, n_gqa=8, arch="llama", **kw) == "q5_k"
    assert ft.tensor_type(v, n_gqa=1, arch="llama", **kw) == "q4_k"  # 65B: every head has its own KV
    assert ft.tensor_type(v, n_gqa=1, arch="qwen2", **kw) == "q5_k"
    assert ft.tensor_type(v, n_gqa=8, arch="llama", ne0=8192, layer=11, n_layer=64) == "q4_k"


def test_eight_experts_raise_attention():
    """n_expert == 8 (Mixtral-like): attn_v and attn_k Q8_0, attn_output Q5_K for the Q2_K..Q4_K_M mixes."""
    kw = dict(ne0=4096, layer=11, n_layer=32, n_gqa=4, n_expert=8)
    ft = FILE_TYPES["q4_k_m"]
    assert [ft.tensor_type(f"blk.11.{k}.weight", **kw) for k in ("attn_v", "attn_k", "attn_output", "attn_q")] \
        == ["q8_0", "q8_0", "q5_k", "q4_k"]
    assert FILE_TYPES["q5_k_m"].tensor_type("blk.11.attn_output.weight", **kw) == "q5_k"  # its default


def test_fused_qkv_follows_attn_v_and_routers_stay_float():
    """llama-quant.cpp counts attn_qkv and attn_kv_b as attn_v-like (category_is_attn_v)."""
    assert category("blk.3.attn_qkv.weight") == "attn_qkv.weight"
    assert category("blk.3.attn_kv_b.weight") == "attn_kv_b.weight"
    ft, kw = FILE_TYPES["q3_k_m"], dict(ne0=4096, n_layer=32, n_gqa=4)
    assert [ft.tensor_type("blk.1.attn_qkv.weight", layer=1, **kw),
            ft.tensor_type("blk.9.attn_kv_b.weight", layer=9, **kw)] == ["q5_k", "q4_k"]
    assert not ft.quantizes("blk.0.ffn_gate_inp.weight", 2)
    assert ft.quantizes("blk.0.ffn_gate_exps.weight", 3)
