"""lowbit's GPTQ side by side with GPTQModel's (issue 4): same model, same 128 calibration windows,
same scheme (4-bit affine, group 64, fp16 scales, integer zero points), same evaluation.

GPTQModel is never a lowbit dependency. Install it in its own environment under /tmp and give
this script that environment's python; this file runs there too (`--peer-side`), importing only
torch, safetensors and gptqmodel on that side:

    python3 -m venv /tmp/gq && /tmp/gq/bin/pip install torch==2.13.0 && /tmp/gq/bin/pip install gptqmodel
    OMP_NUM_THREADS=2 .venv/bin/python bench/peer_gptq.py --peer-python /tmp/gq/bin/python

Steps: (1) export SmolLM2-135M (fp32, dequantized from the shipped GGUF) as a plain HF folder and
the calibration windows (bench/model_quality.py's: 128 x 512 tokens of valid.txt, seed 0) as
safetensors; (2) the peer process loads them, times `model.quantize(...)` alone, dequantizes every
quantized Linear with GPTQModel's own `dequantize_weight()` and writes the fp32 weights (its CPU
kernel is far too slow to evaluate 40 windows through); (3) lowbit quantizes the same model on the
same windows (timed the same way: quantize only); (4) both are evaluated with the reference
protocol (40 windows of wikitext-2 test). Prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# everything else GPTQModel's defaults, but for offload_to_disk (its default moves each quantized layer to
# disk and leaves meta tensors behind; off, the layers stay in memory to be read back here)
PEER_CONFIG = dict(bits=4, group_size=64, sym=False, offload_to_disk=False)


def peer_side(work: Path) -> None:
    """Runs in GPTQModel's environment: quantize, dequantize, save weights + timing."""
    from safetensors.torch import load_file, save_file
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = load_file(str(work / "calibration.safetensors"))["input_ids"]
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    cfg = QuantizeConfig(**PEER_CONFIG)
    model = GPTQModel.load(str(work / "fp32"), cfg, device="cpu")
    t = time.perf_counter()
    model.quantize(data, batch_size=1)
    seconds = time.perf_counter() - t
    # Read its weights back the way its users do: save the checkpoint, load it. (The modules
    # left in memory after quantize() hold the on-disk GPTQ v1 zero points, one step off.)
    model.save(str(work / "gptqmodel_out"))
    del model
    model = GPTQModel.load(str(work / "gptqmodel_out"), device="cpu")
    weights = {}
    for name, m in model.model.named_modules():
        if hasattr(m, "dequantize_weight") and hasattr(m, "qweight"):
            w = m.dequantize_weight().float()
            # GPTQ kernels keep [in, out]; orient by the layer's own forward on a probe input
            x = torch.randn(4, m.in_features)
            with torch.no_grad():
                y = m(x.to(m.scales.dtype)).float()
            bias = m.bias.float() if getattr(m, "bias", None) is not None else 0
            cands = [c for c in (w, w.t()) if c.shape == (m.out_features, m.in_features)]
            err = {i: (x @ c.t() + bias - y).abs().max().item() for i, c in enumerate(cands)}
            best = min(err, key=err.get)
            if err[best] > 1e-2 * y.abs().max().item():
                raise RuntimeError(f"{name}: dequantize_weight() does not reproduce the layer's forward")
            weights[name + ".weight"] = cands[best].contiguous()
    save_file(weights, str(work / "peer_weights.safetensors"))
    keep = ("bits", "group_size", "sym", "desc_act", "act_group_aware", "static_groups", "damp_percent",
            "damp_auto_increment", "true_sequential", "mse", "format", "method", "offload_to_disk")
    config = {k: str(getattr(model.quantize_config, k, None)) for k in keep}
    (work / "peer.json").write_text(json.dumps({"seconds": seconds, "version": gptqmodel.__version__,
                                                "torch": torch.__version__, "config": config,
                                                "layers": len(weights)}))


def export(model, tok, work: Path, calib: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file
    out = work / "fp32"
    if not (out / "config.json").exists():
        model.hf_quantizer = None  # loaded from GGUF: already fp32, save it as a plain model
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    save_file({"input_ids": torch.cat(calib).contiguous()}, str(work / "calibration.safetensors"))


def load_peer(model, work: Path) -> None:
    from safetensors.torch import load_file
    weights = load_file(str(work / "peer_weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.dim() == 2 and n.endswith("proj.weight") and n not in weights]
    if missing:
        raise ValueError(f"peer weights lack {len(missing)} Linear weights, e.g. {missing[0]}")
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", help="python of the environment where gptqmodel is installed")
    ap.add_argument("--peer-side", metavar="WORKDIR", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/lowbit_peer_gptq")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calibration", type=int, default=128, help="calibration windows of 512 (smoke tests: fewer)")
    ap.add_argument("--skip-peer", action="store_true", help="reuse the peer weights already in --work")
    args = ap.parse_args()
    if args.peer_side:
        return peer_side(Path(args.peer_side))
    if not args.peer_python and not args.skip_peer:
        sys.exit("peer_gptq: give --peer-python (the python of a venv with gptqmodel) or --skip-peer")

    import copy
    sys.path.insert(0, str(Path(__file__).parent))
    from model_quality import calibration
    from lowbit import Recipe, Scheme
    from lowbit.core import PerGroup
    from lowbit.eval import Reference, evaluate, token_ids
    from lowbit.io import load_model, wikitext2
    from lowbit.pipeline import quantize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m")
    calib = calibration(tok, args.calibration)
    export(copy.deepcopy(model), tok, work, calib)
    if not args.skip_peer:
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
        t = time.perf_counter()
        # cwd: GPTQModel writes a logs/ folder wherever it runs
        subprocess.run([args.peer_python, str(Path(__file__).resolve()), "--peer-side", str(work)], check=True,
                       env=env, cwd=work)
        print(f"peer process: {time.perf_counter() - t:.0f} s including its model load", flush=True)
    peer = json.loads((work / "peer.json").read_text())

    ids = token_ids(tok, wikitext2("test"))
    ref = Reference.capture(model, ids, window=512, max_windows=args.windows)
    scheme = Scheme("uint4", PerGroup(64), symmetric=False, range="minmax", scale_format="fp16", integer_zero=True)
    rows = []
    for label, recipe in (("lowbit gptq, integer zero (GPTQ format)", Recipe(scheme, method="gptq", name="w4g64-izero")),
                          ("lowbit gptq, float zero (recipe w4g64)", Recipe(scheme.replace(integer_zero=False),
                                                                             method="gptq", name="w4g64"))):
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, recipe, calibration=calib)
        took = time.perf_counter() - t
        rows.append((label, evaluate(q, ref, progress=False), took))
        print(q.lowbit_calibration.summary(), flush=True)
        del q
    q = copy.deepcopy(model)
    load_peer(q, work)
    rows.insert(0, (f"GPTQModel {peer['version']}", evaluate(q, ref, progress=False), peer["seconds"]))

    print(f"\nfp32 ppl {ref.ppl:.3f}, {args.windows} windows; calibration {len(calib)} x 512 (valid.txt, seed 0)")
    print(f"GPTQModel config: {json.dumps(peer['config'])}; its torch {peer['torch']}\n")
    print("| quantizer | ppl | Δppl | KL | top-1 | quantize s | time vs GPTQModel |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r, s in rows:
        print(f"| {label} | {r.ppl:.3f} | {r.delta_ppl_pct:+.2f}% | {r.kl:.4f} | {r.top1_agreement:.3f} | "
              f"{s:.0f} | {s / peer['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
