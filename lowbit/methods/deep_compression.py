"""Deep Compression (Han, Mao, Dally, ICLR 2016): pruning, trained quantization, Huffman coding.

For one weight W [out, in]:

    1. prune      mask = |W| >= the (sparsity)-quantile of |W|        (then retrain the kept weights)
    2. share      k = 2^b centroids C by 1-D k-means over the kept weights, linear initialisation
                  (evenly spaced over [min, max]); codes[i, j] = nearest centroid, or k if pruned
                  W~ = [C, 0][codes]
                  dL/dC_k = sum over (i, j) with codes[i, j] = k of dL/dW~_ij   (centroid fine-tuning)
    3. Huffman    the cluster index of each kept weight, and the relative index (gap) of each kept
                  position (core.sparse_index), each Huffman-coded with its own canonical code

`encode_layer` and `decode_layer` are stage 3 and its inverse: decode(encode(C, codes)) is
exactly W~. The model-wide stages (which layers, the retraining loops) are in
pipeline/deep_compression.py; the file in io/deep_compression.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.huffman import huffman_decode, huffman_encode, huffman_lengths
from ..core.sparse_index import absolute_positions, relative_indices
from ..formats import fit_centroids, kmeans_assign


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """w: [out, in] -> bool mask (True = kept) keeping the round((1 - sparsity) * numel) largest |w|
    (ties broken by position, so exactly that many are kept)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}: give the share of weights to prune, 0 <= sparsity < 1")
    n = w.numel()
    keep = n - int(round(sparsity * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.topk(w.detach().abs().reshape(-1).float(), keep, sorted=False).indices] = True
    return mask.reshape(w.shape)


def share_weights(w: torch.Tensor, mask: torch.Tensor, bits: int, *, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """w, mask: [out, in] -> (centroids fp32 [2^bits], codes uint8 [out, in]; code 2^bits = pruned).

    k-means over the kept weights only, linearly initialised (the paper's best); sorted centroids."""
    if not 1 <= bits <= 7:
        raise ValueError(f"bits={bits}: weight sharing uses 2^bits clusters, 1 <= bits <= 7 "
                         "(one code is kept for pruned weights in a uint8)")
    k = 1 << bits
    kept = w.detach().float()[mask]
    if kept.numel() == 0:
        raise ValueError("share_weights: every weight is pruned; lower the sparsity")
    c = fit_centroids(kept[None], k, iters=iters, init="linear")[0]
    codes = torch.full(w.shape, k, dtype=torch.uint8)
    codes[mask] = kmeans_assign(kept[None], c[None])[0].to(torch.uint8)
    return c, codes


def shared_weight(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """W~ = [C, 0][codes]: differentiable in the centroids (autograd of the gather sums the
    gradients of every weight of a cluster into its centroid, the paper's update rule)."""
    table = torch.cat([centroids, centroids.new_zeros(1)])
    return table[codes.long()]


def centroid_gradient(grad_w: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's dL/dC_k = sum of dL/dW over the weights in cluster k (pruned weights excluded)."""
    g = torch.zeros(k + 1, dtype=grad_w.dtype).index_add_(0, codes.reshape(-1).long(), grad_w.reshape(-1))
    return g[:k]


@dataclass(frozen=True)
class EncodedLayer:
    """One shared, pruned weight after Huffman coding; every field is what the file stores."""
    shape: tuple[int, int]
    centroids: torch.Tensor      # fp32 [k]
    index_lengths: torch.Tensor  # uint8 [k]: canonical Huffman code length of each cluster index
    index_stream: torch.Tensor   # uint8 [bytes]: cluster index of each kept weight, in position order
    gap_lengths: torch.Tensor    # uint8 [2^gap_bits]: code lengths of the relative indices
    gap_stream: torch.Tensor     # uint8 [bytes]
    kept: int                    # kept weights (= symbols in index_stream)
    gap_symbols: int             # symbols in gap_stream (kept + fillers)
    gap_bits: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids, "index_lengths": self.index_lengths, "index_stream": self.index_stream,
                "gap_lengths": self.gap_lengths, "gap_stream": self.gap_stream}

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codebook, both Huffman tables, both streams."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])


def encode_layer(centroids: torch.Tensor, codes: torch.Tensor, gap_bits: int = 5) -> EncodedLayer:
    """(centroids [k], codes uint8 [out, in] with k = pruned) -> EncodedLayer (Huffman-coded)."""
    k = centroids.numel()
    if codes.dim() != 2 or int(codes.max()) > k:
        raise ValueError(f"encode_layer needs codes [out, in] in 0..{k} ({k} = pruned), got shape "
                         f"{tuple(codes.shape)} and max {int(codes.max())}")
    flat = codes.reshape(-1).long()
    positions = torch.nonzero(flat != k).reshape(-1)
    index = flat[positions]
    gaps = relative_indices(positions, gap_bits)
    il = huffman_lengths(torch.bincount(index, minlength=k)) if index.numel() else torch.zeros(k, dtype=torch.uint8)
    gl = (huffman_lengths(torch.bincount(gaps, minlength=1 << gap_bits)) if gaps.numel()
          else torch.zeros(1 << gap_bits, dtype=torch.uint8))
    return EncodedLayer(tuple(codes.shape), centroids.detach().float().contiguous(), il, huffman_encode(index, il),
                        gl, huffman_encode(gaps, gl), int(index.numel()), int(gaps.numel()), gap_bits)


# A layer stores at least this many bits per weight of its dense shape: 1/64 bit, beyond any
# sparsity Deep Compression uses (its most pruned layers keep about 0.4 bits per weight), so that a
# few bytes claiming a huge shape are refused before the dense weight is allocated.
MIN_BITS_PER_WEIGHT = 1 / 64


def check_layer(e: EncodedLayer) -> None:
    """The counts and the shape of an EncodedLayer (read from a file) against what its streams can
    hold, before any of them sizes an allocation: a ValueError saying which does not fit."""
    n = e.shape[0] * e.shape[1]
    if not 1 <= e.gap_bits <= 16:
        raise ValueError(f"gap_bits is {e.gap_bits}; relative indices take 1..16 bits")
    if e.gap_lengths.numel() != 1 << e.gap_bits or e.index_lengths.numel() != e.centroids.numel():
        raise ValueError(f"Huffman tables of {e.index_lengths.numel()} and {e.gap_lengths.numel()} lengths do not "
                         f"match the codebook ({e.centroids.numel()}) and 2^gap_bits ({1 << e.gap_bits})")
    if not e.kept <= e.gap_symbols <= e.kept + n:
        raise ValueError(f"{e.kept} kept weights and {e.gap_symbols} relative indices do not fit a "
                         f"{e.shape[0]}x{e.shape[1]} tensor: corrupt data")
    if n * MIN_BITS_PER_WEIGHT > 8 * e.nbytes:
        raise ValueError(f"a {e.shape[0]}x{e.shape[1]} tensor stored in {e.nbytes} bytes is below "
                         f"{MIN_BITS_PER_WEIGHT:.4f} bits per weight: corrupt data (or pruned beyond any use)")


def decode_layer(e: EncodedLayer) -> torch.Tensor:
    """EncodedLayer -> the dense shared weight W~ fp32 [out, in] (exactly [C, 0][codes])."""
    check_layer(e)
    index = huffman_decode(e.index_stream, e.index_lengths, e.kept)
    positions = absolute_positions(huffman_decode(e.gap_stream, e.gap_lengths, e.gap_symbols), e.gap_bits)
    n = e.shape[0] * e.shape[1]
    if positions.numel() != e.kept or (e.kept and int(positions[-1]) >= n):
        raise ValueError(f"relative indices give {positions.numel()} positions (last {int(positions[-1]) if e.kept else -1})"
                         f" for {e.kept} kept weights of a {e.shape[0]}x{e.shape[1]} tensor: corrupt data")
    w = torch.zeros(n, dtype=torch.float32)
    w[positions] = e.centroids[index]
    return w.reshape(e.shape)
