"""GGUF reading: our parser and model builder against gguf-py and transformers' GGUF loader; bad files."""
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.io import builtin_model_path, read_gguf_tensors
from lowbit.io.gguf.file import parse_gguf


@pytest.fixture(scope="module")
def written(smollm2_2layers, tmp_path_factory):
    """A 2-layer SmolLM2 written as q8_0 by lowbit."""
    return lowbit.save(smollm2_2layers[0], tmp_path_factory.mktemp("gguf") / "small.gguf", recipe="q8_0",
                       source="smollm2-135m")


def test_parser_agrees_with_gguf_py(smollm2_gguf):
    ours, ref = parse_gguf(builtin_model_path("smollm2-135m")), smollm2_gguf
    for k, field in ref.fields.items():
        if not k.startswith("GGUF."):
            assert ours.meta[k] == field.contents(), k
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.type_id, info.offset, info.shape) == (int(t.tensor_type), t.data_offset,
                                                           tuple(int(d) for d in reversed(t.shape)))


def test_tensors_decode_like_gguf_py(smollm2_gguf):
    path = builtin_model_path("smollm2-135m")
    names = ["token_embd.weight", "blk.3.ffn_down.weight", "blk.3.attn_norm.weight"]  # q8_0, q4_1, f32
    ours = read_gguf_tensors(path, names)
    for t in smollm2_gguf.tensors:
        if t.name in names:
            ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[t.name].shape)
            assert np.array_equal(ours[t.name].numpy(), ref), t.name


def test_model_equals_transformers_gguf_loader(smollm2_full):
    ours = lowbit.load(builtin_model_path("smollm2-135m"))
    ref = smollm2_full[0].state_dict()
    got = ours.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_own_output_reads_back_identical(written, smollm2_2layers):
    """Each tensor in our file decodes to what our writer encoded: dequantize(quantize(w)), q/k un-permuted."""
    from lowbit.core.ggml_blocks import dequantize_rows, quantize_rows

    back = lowbit.load(written).state_dict()
    for k, v in smollm2_2layers[0].state_dict().items():
        expected = v if v.ndim == 1 else torch.from_numpy(
            dequantize_rows(quantize_rows(v.numpy(), "q8_0"), "q8_0", v.shape[1]).reshape(v.shape))
        assert torch.equal(back[k], expected), k


def _patch(src, dst, find: bytes, offset: int, value: bytes):
    shutil.copy(src, dst)
    data = bytearray(dst.read_bytes())
    at = data.index(find) + len(find) + offset
    data[at:at + len(value)] = value
    dst.write_bytes(bytes(data))


def test_bad_files_name_the_file_and_tensor(written, tmp_path):
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"trunc.gguf is truncated: tensor '.*'"):
        lowbit.load(trunc)
    head = tmp_path / "head.gguf"
    head.write_bytes(written.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"head.gguf is truncated or corrupt: metadata 'tokenizer"):
        lowbit.load(head)
    (tmp_path / "no.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="no.gguf is not a GGUF file"):
        lowbit.load(tmp_path / "no.gguf")
    # tensor info: name, ndim u32, dims u64..., type u32, offset u64; output_norm.weight is 1-D
    name = b"output_norm.weight"
    _patch(written, tmp_path / "type.gguf", name, 4 + 8, struct.pack("<I", 99))
    with pytest.raises(ValueError, match=r"type.gguf: tensor 'output_norm.weight' has unknown GGML type 99"):
        lowbit.load(tmp_path / "type.gguf")
    _patch(written, tmp_path / "shape.gguf", name, 4, struct.pack("<Q", 544))
    with pytest.raises(ValueError, match=r"shape.gguf: tensor 'output_norm.weight' has shape \(544,\), the config"):
        lowbit.load(tmp_path / "shape.gguf")
