"""The GPTQ / AWQ bit packing written out the obvious way (one shift-and-or per code), from each
format's definition: an independent packer for tests that build other tools' checkpoints."""
import numpy as np
import torch


def pack_words(values: np.ndarray, bits: int, axis: int, order=None) -> torch.Tensor:
    """Pack unsigned ints along `axis`, 32 // bits per int32 word, value j of a word at bits j*bits
    (AWQ: slot j holds the value at position order[j] of its run of 8)."""
    v = np.moveaxis(values.astype(np.int64), axis, 0)
    per = 32 // bits
    out = np.zeros((v.shape[0] // per,) + v.shape[1:], dtype=np.int64)
    for w in range(out.shape[0]):
        for j in range(per):
            src = w * per + (order[j] if order else j)
            out[w] |= v[src] << (j * bits)
    return torch.from_numpy(np.moveaxis(out.astype(np.uint32).view(np.int32), 0, axis).copy())


def v1_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel's v2 -> v1 zero points: each packed word minus one per field, modulo 2^32."""
    ones = sum(1 << (i * bits) for i in range(32 // bits))
    return torch.from_numpy(((words.numpy().view(np.uint32).astype(np.int64) - ones) % 2**32)
                            .astype(np.uint32).view(np.int32))
