"""Calibrated GGUF (AWQ + GPTQ on each tensor's llama.cpp type) against llama.cpp's own quantizer
with an importance matrix, both scored by llama.cpp's llama-perplexity.

    bench/llama_cpp.sh                                           # once: /tmp/llama.cpp/build/bin
    python bench/gguf_calibrated.py --recipes q4_0,q4_k_m,q3_k_m --calib-chunks 64 --chunks 20

Calibration text: the first --calib-chunks windows of 512 tokens of wikitext-2 valid, for both sides
(llama-imatrix -c 512 --chunks N on the same file; lowbit's windows tokenized the same way).
Scored on wikitext-2 test: llama-perplexity -c 512 --chunks --chunks (each chunk's second half).
Every file of a row has the same tensor types (llama.cpp's choice for the file type), so the same size.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf_check import FTYPE_NAMES, bins, llama_ppl, run  # noqa: E402

from lowbit.io import load_model, save, wikitext2  # noqa: E402
from lowbit.io.gguf.calibrated import quantize_gguf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="q4_0,q4_k_m,q3_k_m")
    ap.add_argument("--calib-chunks", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="awq+gptq")
    ap.add_argument("--act-order", type=int, default=1)
    ap.add_argument("--work", default="/tmp/lowbit-gguf-calibrated")
    args = ap.parse_args()
    b, work = bins(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test_file, valid_file = work / "wiki.test.raw", work / "wiki.valid.raw"
    test_file.write_text(wikitext2("test"), encoding="utf-8")
    valid = wikitext2("valid")
    valid_file.write_text(valid, encoding="utf-8")
    model, tok = load_model("smollm2-135m")
    f32 = save(model, work / "smollm2-f32.gguf", recipe="f32", source="smollm2-135m")
    imatrix = work / "imatrix.dat"
    if not imatrix.exists():
        run([b / "llama-imatrix", "-m", f32, "-f", valid_file, "-o", imatrix, "-c", 512, "--chunks", args.calib_chunks,
             "-t", args.threads], timeout=3600)
    ids = torch.tensor(tok(valid, add_special_tokens=False)["input_ids"])
    calib = [ids[i * 512:(i + 1) * 512][None] for i in range(args.calib_chunks)]
    base = llama_ppl(b, f32, test_file, args.chunks, args.threads)
    print(f"F32: ppl {base:.4f} (llama-perplexity, {args.chunks} chunks of 512)\n")
    print("| recipe | MB | bits/weight | llama.cpp (no imatrix) | llama.cpp + imatrix | lowbit " + args.method +
          " | lowbit vs imatrix | lowbit solve s |")
    print("|---|---|---|---|---|---|---|---|")
    n_params = sum(p.numel() for p in model.parameters())  # a tied output shares the embedding's parameter
    for recipe in args.recipes.split(","):
        ref, ref_im = work / f"llama-{recipe}.gguf", work / f"llama-{recipe}-imatrix.gguf"
        run([b / "llama-quantize", f32, ref, FTYPE_NAMES[recipe], args.threads])
        run([b / "llama-quantize", "--imatrix", imatrix, f32, ref_im, FTYPE_NAMES[recipe], args.threads])
        t0 = time.time()
        m = quantize_gguf(copy.deepcopy(model), recipe, calib, method=args.method, act_order=bool(args.act_order),
                          progress=False)
        t_solve = time.time() - t0
        ours = save(m, work / f"lowbit-{recipe}.gguf", source="smollm2-135m")
        p_ref, p_im, p_ours = (llama_ppl(b, f, test_file, args.chunks, args.threads) for f in (ref, ref_im, ours))
        mb = ours.stat().st_size / 1e6
        bpw = ours.stat().st_size * 8 / n_params

        def rel(p):
            return f"{p:.4f} ({100 * (p / base - 1):+.2f}%)"
        print(f"| {recipe} | {mb:.1f} | {bpw:.2f} | {rel(p_ref)} | {rel(p_im)} | {rel(p_ours)} | "
              f"{100 * (p_ours / p_im - 1):+.2f}% | {t_solve:.0f} |", flush=True)
        if ref_im.stat().st_size != ours.stat().st_size:
            print(f"  note: sizes differ: llama.cpp {ref_im.stat().st_size} bytes, lowbit {ours.stat().st_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
