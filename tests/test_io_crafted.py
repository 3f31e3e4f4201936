"""Crafted files, one per hole a review found (issue 23): a few bytes asking for gigabytes, names
that leave their folder, a job resumed by another lowbit. Each must be a clear ValueError (or a
fresh start with a warning) within seconds, decided before anything of the asked size exists."""
import json
import struct

import pytest
import torch

from conftest import tiny_transformer
from test_io_fuzz import deadline, write_llama_gguf

from lowbit.io.gguf.read import load_gguf, read_gguf_tensors


# -- GGUF --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("align", [0, 3, 48])
def test_gguf_alignment_must_be_a_power_of_two(tmp_path, align):
    path = write_llama_gguf(tmp_path / "a.gguf", extra=lambda w: w.add_uint32("general.alignment", align))
    with deadline(10), pytest.raises(ValueError, match=rf"a.gguf: metadata general.alignment is {align}; GGUF needs"):
        read_gguf_tensors(path)


@pytest.mark.parametrize("key, value, match", [
    ("block_count", 2**31, r"block_count is 2147483648 but the tensor table holds blocks 0..0 \(1 of them\)"),
    ("block_count", 2**63, r"block_count is 9223372036854775808 but"),
    ("embedding_length", 2**20, r"token_embd.weight' has shape \(32, 64\), the config says \(32, 1048576\)"),
    ("embedding_length", 2**31, r"the metadata cannot build a llama model: .*overflow"),
    ("vocab_size", 2**40, r"token_embd.weight' has shape \(32, 64\), the config says \(1099511627776, 64\)"),
    ("feed_forward_length", 2**40, r"ffn_gate.weight' has shape \(128, 64\), the config says \(1099511627776, 64\)"),
    ("attention.head_count", 0, r"attention.head_count is 0; it must be a positive integer"),
    ("attention.head_count_kv", 2**40, r"attn_k.weight' has shape \(32, 64\), the config says"),
    ("embedding_length", "64", r"embedding_length is '64'; it must be a positive integer"),
])
def test_gguf_hyper_parameters_are_checked_against_the_tensor_table(tmp_path, key, value, match):
    """Before the fix the model was built from these numbers first: hours of layers, or terabytes."""
    path = write_llama_gguf(tmp_path / "h.gguf", {key: value})
    with deadline(10), pytest.raises(ValueError, match=match) as e:
        load_gguf(path)
    assert str(path) in str(e.value)


def test_gguf_tensor_past_the_end_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    path = write_llama_gguf(tmp_path / "t.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    import transformers

    built = []
    monkeypatch.setattr(transformers.LlamaForCausalLM, "post_init", lambda self: built.append(self))
    with pytest.raises(ValueError, match=r"t.gguf is truncated: tensor 'blk.0.ffn_down.weight'"):
        load_gguf(path)
    assert all(p.is_meta for m in built for p in m.parameters())  # only the shape-only model was made


# -- lowbit.json ----------------------------------------------------------------------------------------
@pytest.fixture
def lowbit_checkpoint(tmp_path):
    from lowbit.io.lowbit_format import save_lowbit
    from lowbit.pipeline import quantize

    model = tiny_transformer("qwen2", 1)
    quantize(model, "w4g64", progress=False)
    return save_lowbit(model, tmp_path / "q")


@pytest.mark.parametrize("field, value, match", [
    ("num_hidden_layers", 10**6, r"model.config.num_hidden_layers is 1000000, but the checkpoint holds \d+ tensors"),
    ("vocab_size", 2**28, r"describes a Qwen2ForCausalLM of [\d,]+ bytes, more than 32 times the [\d,]+ bytes"),
    ("intermediate_size", 2**26, r"describes a Qwen2ForCausalLM of [\d,]+ bytes, more than 32 times"),
])
def test_lowbit_json_config_is_sized_before_the_model_is_built(lowbit_checkpoint, field, value, match):
    """Before the fix: a million layers built one by one (minutes), or gigabytes allocated."""
    from lowbit.io.lowbit_format import load_lowbit

    meta = json.loads((lowbit_checkpoint / "lowbit.json").read_text())
    meta["model"]["config"][field] = value
    meta["model"]["config"].pop("layer_types", None)  # (transformers 5 derives it from num_hidden_layers)
    (lowbit_checkpoint / "lowbit.json").write_text(json.dumps(meta))
    with deadline(10), pytest.raises(ValueError, match=match) as e:
        load_lowbit(lowbit_checkpoint)
    assert str(lowbit_checkpoint) in str(e.value)


# -- Deep Compression ------------------------------------------------------------------------------
@pytest.fixture
def dc_file(tmp_path):
    from lowbit.io.deep_compression import save_deep_compressed
    from lowbit.methods.deep_compression import magnitude_mask, share_weights
    from lowbit.nn import SharedLinear

    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    c, codes = share_weights(lin[0].weight, magnitude_mask(lin[0].weight, 0.5), 2)
    lin[0] = SharedLinear.from_linear(lin[0], c, codes)
    save_deep_compressed(lin, tmp_path / "dc.safetensors")
    return tmp_path / "dc.safetensors"


@pytest.mark.parametrize("edit, match", [
    ({"kept": 2**40}, r"layer 0: 1099511627776 kept weights and \d+ relative indices do not fit"),
    ({"kept": 2**40, "gap_symbols": 2**40}, r"layer 0: Huffman stream of \d+ bytes cannot hold 1099511627776 symbols"),
    ({"gap_symbols": 2**40}, r"layer 0: \d+ kept weights and 1099511627776 relative indices do not fit"),
    ({"gap_bits": 2**40}, r"layer 0: gap_bits is 1099511627776; relative indices take 1..16 bits"),
    ({"shape": [2**20, 2**20]}, r"layer 0: a 1048576x1048576 tensor stored in \d+ bytes is below 0.0156 bits"),
    ({"gap_bits": True}, r"layers.0 needs integer kept, gap_symbols, gap_bits"),
])
def test_deep_compression_counts_are_checked_before_allocating(dc_file, edit, match):
    """Before the fix each of these sized an allocation first: terabytes (MemoryError, RuntimeError)
    or a 2^(2^40) integer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.io.deep_compression import KEY, read_deep_compressed

    with safe_open(str(dc_file), "pt") as f:
        meta, tensors = json.loads(f.metadata()[KEY]), {k: f.get_tensor(k) for k in f.keys()}
    meta["layers"]["0"].update(edit)
    save_file(tensors, str(dc_file), metadata={KEY: json.dumps(meta)})
    with deadline(10), pytest.raises(ValueError, match=match) as e:
        read_deep_compressed(dc_file)
    assert str(dc_file) in str(e.value)


def test_huffman_decode_refuses_more_symbols_than_bits():
    from lowbit.core.huffman import huffman_decode

    lengths = torch.tensor([1, 1], dtype=torch.uint8)
    for kernel in (True, False):
        with deadline(10), pytest.raises(ValueError, match="stream of 2 bytes cannot hold 17 symbols"):
            huffman_decode(torch.zeros(2, dtype=torch.uint8), lengths, 17, kernel=kernel)
    assert huffman_decode(torch.zeros(2, dtype=torch.uint8), lengths, 16).tolist() == [0] * 16


# -- the safetensors row reader -----------------------------------------------------------------------
def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]},
     r"'w' is F32 \[1048576, 1048576\] \(4398046511104 bytes\) but its data_offsets span 16 bytes"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}, r"data_offsets \[8, 4\], not \[begin, end\]"),
    ({"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}, r"shape \[2, -2\], not a list of non-negative"),
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, r"is truncated: tensor 'w' ends at byte"),
    ("F32", r"'w' has no header entry"),
])
def test_row_reader_checks_offsets_against_shape_and_file(tmp_path, entry, match):
    """Before the fix read_rows sized its buffer from the shape alone: 4 TB for 16 bytes of data."""
    from lowbit.io.streaming.rows import stored_tensors

    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors({"w": entry}, bytes(16)))
    with deadline(10), pytest.raises(ValueError, match=match) as e:
        stored_tensors(path)["w"].read_rows(0, 2**20)
    assert str(path) in str(e.value)


def test_row_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from lowbit.io.streaming.rows import stored_tensors

    w = torch.randn(5, 3)
    save_file({"w": w, "b": torch.arange(4, dtype=torch.int16)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(stored_tensors(tmp_path / "w.safetensors")["w"].read_rows(1, 4), w[1:4])
