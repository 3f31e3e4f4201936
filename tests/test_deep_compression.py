"""Deep Compression: Huffman coding, relative indices, k-means sharing, centroid gradients, the file."""
import copy
import heapq
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import wikitext_excerpt
from lowbit.core.huffman import (canonical_codes, encoded_bits, huffman_decode, huffman_encode,
                                 huffman_lengths)
from lowbit.core.sparse_index import absolute_positions, relative_indices
from lowbit.formats import fit_centroids, kmeans_assign
from lowbit.formats.kmeans import linear_centroids
from lowbit.io.deep_compression import load_deep_compressed, read_deep_compressed, save_deep_compressed
from lowbit.methods.deep_compression import (centroid_gradient, decode_layer, encode_layer, magnitude_mask,
                                             share_weights, shared_weight)
from lowbit.nn import SharedLinear
from lowbit.pipeline.deep_compression import deep_compress

symbols_st = st.integers(1, 32).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=0, max_size=400)))


def merge_cost(counts):
    """Huffman's optimal total code length = the sum of all merge weights (an independent oracle)."""
    h = [c for c in counts if c > 0]
    if len(h) == 1:
        return h[0]
    heapq.heapify(h)
    total = 0
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h)
        total += a + b
        heapq.heappush(h, a + b)
    return total


@given(symbols_st)
def test_huffman_round_trip_and_optimal(case):
    k, syms = case
    s = torch.tensor(syms, dtype=torch.int64)
    counts = torch.bincount(s, minlength=k)
    L = huffman_lengths(counts)
    data = huffman_encode(s, L)
    bits = encoded_bits(s, L)
    assert data.numel() == math.ceil(bits / 8)
    assert torch.equal(huffman_decode(data, L, s.numel()), s)
    assert torch.equal(huffman_decode(data, L, s.numel(), kernel=False), s)
    assert torch.equal(huffman_encode(s, L, chunk=7), data)  # chunk seams carry the odd bits over
    if s.numel():
        assert bits == merge_cost(counts.tolist())  # optimal: same cost as the textbook merge sum
        used = L[counts > 0].double()
        assert float((2.0 ** -used).sum()) <= 1.0 + 1e-12  # Kraft: a prefix code


def test_huffman_codes_are_prefix_free_and_canonical():
    L = torch.tensor([3, 3, 3, 3, 3, 2, 4, 4], dtype=torch.uint8)  # DEFLATE RFC 1951 section 3.2.2 example
    assert canonical_codes(L).tolist() == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


def test_huffman_decode_rejects_truncated_data(gen):
    s = torch.randint(0, 8, (500,), generator=gen)
    L = huffman_lengths(torch.bincount(s, minlength=8))
    data = huffman_encode(s, L)
    for kernel in (True, False):
        with pytest.raises(ValueError, match="truncated"):
            huffman_decode(data[: data.numel() // 2], L, s.numel(), kernel=kernel)


def test_huffman_kernel_matches_reference_on_real_streams(gen):
    w = torch.randn(96, 200, generator=gen)
    c, codes = share_weights(w, magnitude_mask(w, 0.6), 5)
    e = encode_layer(c, codes)
    a = huffman_decode(e.index_stream, e.index_lengths, e.kept)
    b = huffman_decode(e.index_stream, e.index_lengths, e.kept, kernel=False)
    assert torch.equal(a, b) and torch.equal(a, codes.reshape(-1)[codes.reshape(-1) != 32].long())


@given(st.sets(st.integers(0, 3000), max_size=200), st.integers(1, 8))
def test_relative_indices_round_trip(positions, gap_bits):
    p = torch.tensor(sorted(positions), dtype=torch.int64)
    s = relative_indices(p, gap_bits)
    assert int(s.max()) < 2 ** gap_bits if s.numel() else True
    assert torch.equal(absolute_positions(s, gap_bits), p)
    # reference: the paper's rule, one gap at a time
    ref, prev, M = [], -1, 2 ** gap_bits - 1
    for q in p.tolist():
        r = q - prev - 1
        while r >= M:
            ref.append(M)
            r -= M
        ref.append(r)
        prev = q
    assert s.tolist() == ref


def test_magnitude_mask_keeps_the_largest(gen):
    w = torch.randn(64, 80, generator=gen)
    m = magnitude_mask(w, 0.7)
    assert int(m.sum()) == round(0.3 * w.numel())
    assert w.abs()[m].min() >= w.abs()[~m].max()
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(w, 1.0)


def test_linear_initialisation_and_kmeans_fixed_point(gen):
    x = torch.randn(1, 5000, generator=gen) ** 3  # heavy tails: where linear init matters
    lin = linear_centroids(x, 16)[0].double()
    ref = torch.linspace(float(x.min()), float(x.max()), 16, dtype=torch.float64)
    assert torch.allclose(lin, ref, rtol=0, atol=1e-5)
    c = fit_centroids(x, 16, init="linear", iters=200)[0]
    idx = kmeans_assign(x, c[None])[0]
    for j in range(16):  # Lloyd's fixed point: each non-empty centroid is the mean of its cluster
        if (idx == j).any():
            assert torch.isclose(c[j], x[0][idx == j].mean(), rtol=1e-5, atol=1e-6)
    # the extremes keep a centroid (k-means++ from a seed may leave them to a far one)
    assert c.max() > 0.5 * x.max() and c.min() < 0.5 * x.min()


def test_share_weights_codes_and_decode_identity(gen):
    w = torch.randn(48, 70, generator=gen)
    mask = magnitude_mask(w, 0.5)
    c, codes = share_weights(w, mask, 4)
    assert c.numel() == 16 and torch.equal(codes == 16, ~mask)
    W = shared_weight(c, codes)
    assert torch.equal(W[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(W[mask], c[codes[mask].long()])
    # nearest centroid for every kept weight
    d = (w[mask][:, None] - c[None]).abs()
    assert torch.equal(d.gather(1, codes[mask].long()[:, None])[:, 0], d.min(1).values)
    e = encode_layer(c, codes, gap_bits=3)
    assert torch.equal(decode_layer(e), W)


def test_centroid_gradient_is_the_per_cluster_sum(gen):
    w = torch.randn(20, 30, generator=gen)
    c, codes = share_weights(w, magnitude_mask(w, 0.4), 3)
    layer = SharedLinear(c, codes, torch.randn(20, generator=gen))
    x, t = torch.randn(7, 30, generator=gen), torch.randn(7, 20, generator=gen)
    loss = ((layer(x) - t) ** 2).sum()
    loss.backward()
    # dL/dW of the same dense weight, independently, in float64
    W = shared_weight(c, codes).double().requires_grad_(True)
    ((x.double() @ W.t() + layer.bias.double() - t.double()) ** 2).sum().backward()
    by_loop = torch.zeros(8, dtype=torch.float64)
    for (i, j), code in np.ndenumerate(codes.numpy()):
        if code < 8:
            by_loop[code] += W.grad[i, j]
    assert torch.allclose(layer.centroids.grad.double(), by_loop, rtol=1e-5, atol=1e-5)
    assert torch.allclose(centroid_gradient(W.grad, codes, 8), by_loop, rtol=1e-12, atol=1e-12)


def test_prune_share_save_load_is_exact(smollm2_2layers, tmp_path):
    model, tok = smollm2_2layers
    m = copy.deepcopy(model).eval()
    ids = tok(wikitext_excerpt()[:2000], return_tensors="pt").input_ids[:, :96]
    batches = [ids[:, :48], ids[:, 48:]]
    report = deep_compress(m, sparsity=0.6, bits=4, batches=batches, loss_fn=lambda mm, b: mm(b, labels=b).loss,
                           prune_steps=2, share_steps=2, progress=False)
    assert len(report.layers) == 14 and len(report.share_losses) == 2
    shared = {n: s for n, s in m.named_modules() if isinstance(s, SharedLinear)}
    for s in shared.values():
        assert int((s.codes == 16).sum()) == round(0.6 * s.codes.numel())
    size = save_deep_compressed(m, tmp_path / "m.dc.safetensors")
    state, meta = read_deep_compressed(tmp_path / "m.dc.safetensors")
    for n, s in shared.items():
        assert torch.equal(state[f"{n}.weight"], s.weight.detach())
    # every byte of the compressed layers counted: the sum of their tensors in the file
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.dc.safetensors"), "pt") as f:
        layer_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                          if k.rpartition(".")[0] in shared)
    assert size.layer_bytes == layer_bytes and size.file_bytes == (tmp_path / "m.dc.safetensors").stat().st_size
    assert size.bits_per_weight < 32 * 0.4 * 0.5  # 4-bit indices + gaps, Huffman-coded, for 40% kept
    loaded = load_deep_compressed(tmp_path / "m.dc.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)
    # the same through the public verbs
    import lowbit
    lowbit.save(m, tmp_path / "v.safetensors", format="deep-compression")
    again = lowbit.load(tmp_path / "v.safetensors")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, m(ids).logits)


def test_bad_file_gets_a_clear_error(tmp_path, gen):
    from safetensors.torch import save_file
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    c, codes = share_weights(lin[0].weight, magnitude_mask(lin[0].weight, 0.5), 2)
    lin[0] = SharedLinear.from_linear(lin[0], c, codes)
    p = tmp_path / "x.safetensors"
    save_deep_compressed(lin, p)
    state, meta = read_deep_compressed(p)
    meta["layers"]["0"]["kept"] += 3
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(p), metadata={"lowbit_deep_compression": json.dumps(meta)})
    with pytest.raises(ValueError, match="truncated|corrupt"):
        read_deep_compressed(p)
    save_file(tensors, str(p))
    with pytest.raises(ValueError, match="not a Deep Compression file"):
        read_deep_compressed(p)
