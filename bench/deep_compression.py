"""Deep Compression (pruning + k-means weight sharing + Huffman coding) on MiniLM and SmolLM2-135M.

For each (sparsity, bits) setting, every Linear of the model's blocks (not the embeddings or the
head, which stay fp32) goes through the paper's stages, measured after each:

    pruned             magnitude pruning to the sparsity, per layer
    + retrained        `--prune-steps` AdamW steps on the kept weights (pruned ones held at zero)
    + shared           2^bits k-means clusters per layer, linear initialisation
    + centroids tuned  `--share-steps` AdamW steps on the centroids (summed gradients per cluster)

then written with io.save_deep_compressed (Huffman-coded cluster indices and relative indices of
`--gap-bits`) and read back; size counts every stored byte of the compressed layers (codebooks,
Huffman code lengths, both streams) as bits per weight and the ratio to fp32, next to the same
streams at fixed width (bits per index, gap_bits per relative index) to show what Huffman adds.

MiniLM-L6: fidelity of mean-pooled sentence embeddings against fp32 on `--sentences` wikitext-2
test sentences; retraining distils the fp32 embeddings (1 - cosine) on wikitext-2 valid sentences,
batches of 16. SmolLM2-135M: perplexity over the first `--windows` windows of 512 tokens of
wikitext-2 test (bench/bitnet.py's protocol); retraining is next-token loss on random windows of
`--seq` tokens of wikitext-2 valid, batches of `--batch`.

    PYTHONPATH=. python bench/deep_compression.py --threads 1 --text ../shared/data/wikitext-2/test.txt
"""
from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.eval import embedding_fidelity, perplexity, sentences_from_text, token_ids
from lowbit.io import load_model
from lowbit.io.deep_compression import load_deep_compressed, save_deep_compressed
from lowbit.methods.deep_compression import encode_layer
from lowbit.nn import SharedLinear
from lowbit.pipeline.deep_compression import finetune_centroids, prune, retrain_pruned, select_linears, share


def fixed_width_bits(model, bits: int, gap_bits: int) -> float:
    """The same streams without Huffman: `bits` per cluster index, `gap_bits` per relative index."""
    total, n = 0, 0
    for m in model.modules():
        if isinstance(m, SharedLinear):
            e = encode_layer(m.centroids, m.codes, gap_bits)
            total += e.kept * bits + e.gap_symbols * gap_bits + 8 * (e.nbytes - e.index_stream.numel()
                                                                     - e.gap_stream.numel())
            n += m.codes.numel()
    return total / n


def run(name, model, score, batches, loss_fn, sparsity, bits, args):
    m = copy.deepcopy(model)
    layers = select_linears(m)
    rows = []
    t = time.perf_counter()
    masks = prune(layers, sparsity)
    rows.append(("pruned", score(m)))
    if args.prune_steps:
        losses = retrain_pruned(m, layers, masks, batches, loss_fn, args.prune_steps, args.lr)
        rows.append((f"+ retrained {args.prune_steps} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f})", score(m)))
    shared = share(m, layers, masks, bits)
    rows.append((f"+ shared, {1 << bits} clusters/layer", score(m)))
    if args.share_steps:
        losses = finetune_centroids(m, shared, batches, loss_fn, args.share_steps, args.centroid_lr)
        rows.append((f"+ centroids tuned {args.share_steps} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f})",
                     score(m)))
    took = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.dc.safetensors"
        size = save_deep_compressed(m, path, gap_bits=args.gap_bits)
        back = load_deep_compressed(path, copy.deepcopy(model))
        exact = all(torch.equal(back.get_submodule(n).weight, s.weight.detach()) for n, s in shared.items())
        after = score(back)
    fixed = fixed_width_bits(m, bits, args.gap_bits)
    print(f"\n{name}, sparsity {sparsity}, {bits}-bit sharing ({took:.0f} s): {len(layers)} layers, "
          f"{size.weights:,} weights", flush=True)
    print("| stage | score |\n|---|---|")
    for stage, s in rows:
        print(f"| {stage} | {s} |")
    print(f"| decoded from the file (weights bit-exact: {exact}) | {after} |")
    print(f"size of the compressed layers: {size.bits_per_weight:.3f} bits/weight (ratio to fp32 "
          f"{size.ratio_fp32:.1f}x; indices {8 * size.index_bytes / size.weights:.3f}, relative indices "
          f"{8 * size.gap_bytes / size.weights:.3f}, codebooks + Huffman tables "
          f"{8 * size.table_bytes / size.weights:.4f}); without Huffman {fixed:.3f} bits/weight "
          f"({32 / fixed:.1f}x); whole file {size.file_bytes / 1e6:.1f} MB", flush=True)


def minilm(args, test_text, valid_text):
    model, tok = load_model("minilm-l6")
    model.eval()
    sentences = sentences_from_text(test_text, args.sentences)
    train = sentences_from_text(valid_text, 16 * max(args.prune_steps, args.share_steps, 1))
    batches = []
    with torch.no_grad():
        for i in range(0, len(train), 16):
            enc = tok(train[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
            batches.append((dict(enc), _pool(model(**enc).last_hidden_state, enc["attention_mask"])))

    def loss_fn(m, b):
        enc, target = b
        return 1 - F.cosine_similarity(_pool(m(**enc).last_hidden_state, enc["attention_mask"]), target).mean()

    def score(m):
        f = embedding_fidelity(m, model, tok, sentences)
        return f"cosine {f.cosine:.5f} (min {f.cosine_min:.4f}), Spearman {f.spearman:.4f}"

    print(f"MiniLM-L6: {len(sentences)} wikitext-2 test sentences, fp32 = cosine 1")
    for s, b in args.settings:
        run("MiniLM-L6", model, score, batches, loss_fn, s, b, args)


def _pool(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def smollm2(args, test_text, valid_text):
    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = token_ids(tok, test_text)
    train_ids = token_ids(tok, valid_text)
    rng = random.Random(0)
    steps = max(args.prune_steps, args.share_steps, 1)
    batches = []
    for _ in range(steps):
        starts = [rng.randrange(0, train_ids.numel() - args.seq - 1) for _ in range(args.batch)]
        batches.append(torch.stack([train_ids[s:s + args.seq] for s in starts]))

    def score(m):
        return f"ppl {perplexity(m, ids, max_windows=args.windows, progress=False).ppl:.3f}"

    print(f"\nSmolLM2-135M: {args.windows} x 512 tokens of wikitext-2 test; fp32 {score(model)}", flush=True)
    for s, b in args.settings:
        run("SmolLM2-135M", model, score, batches, lambda m, x: m(x, labels=x).loss, s, b, args)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--settings", default="0.5:5,0.7:4", help="comma list of sparsity:bits")
    p.add_argument("--prune-steps", type=int, default=20)
    p.add_argument("--share-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--centroid-lr", type=float, default=1e-4)
    p.add_argument("--gap-bits", type=int, default=5)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", default=None, help="wikitext-2 test.txt (valid.txt beside it trains)")
    args = p.parse_args()
    args.settings = [(float(s), int(b)) for s, b in (x.split(":") for x in args.settings.split(","))]
    torch.set_num_threads(args.threads)
    from lowbit.io.models import wikitext2
    test = open(args.text, encoding="utf-8").read() if args.text else wikitext2("test")
    valid = open(args.text.replace("test.txt", "valid.txt"), encoding="utf-8").read() if args.text else wikitext2("valid")
    if "minilm" in args.models:
        minilm(args, test, valid)
    if "smollm2" in args.models:
        smollm2(args, test, valid)


if __name__ == "__main__":
    main()
