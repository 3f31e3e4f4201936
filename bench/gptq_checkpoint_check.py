"""Read a real GPTQModel checkpoint with lowbit.load and compare every layer with GPTQModel's own
dequantize_weight() (issue 10). Reuses bench/peer_gptq.py's peer side: GPTQModel quantizes SmolLM2-135M
in its own venv, saves the checkpoint (work/gptqmodel_out), reloads it and writes its dequantized
weights (work/peer_weights.safetensors).

    python3 -m venv /tmp/gq && /tmp/gq/bin/pip install torch==2.13.0 && /tmp/gq/bin/pip install gptqmodel
    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/gptq_checkpoint_check.py --peer-python /tmp/gq/bin/python

Few calibration windows by default (--calibration 8): the layout is under test, not GPTQ's quality.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--work", default="/tmp/lowbit_gptq_checkpoint")
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from model_quality import calibration
    from peer_gptq import export, load_peer
    from safetensors.torch import load_file

    import lowbit
    from lowbit.io import load_model
    from lowbit.nn import QuantLinear

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m")
    export(copy.deepcopy(model), tok, work, calibration(tok, args.calibration))
    if not (work / "peer_weights.safetensors").exists():
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
        subprocess.run([args.peer_python, str(Path(__file__).with_name("peer_gptq.py")), "--peer-side", str(work)],
                       check=True, env=env, cwd=work)
    ckpt = work / "gptqmodel_out"
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    t = time.perf_counter()
    ours = lowbit.load(ckpt)
    load_s = time.perf_counter() - t
    theirs = load_file(str(work / "peer_weights.safetensors"))
    worst, kinds = 0.0, {}
    for name, m in ours.named_modules():
        if f"{name}.weight" not in theirs:
            continue
        w = m.qweight.dequantize() if isinstance(m, QuantLinear) else m.weight.detach()
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
        ref = theirs[f"{name}.weight"].float()
        # GPTQModel dequantizes in fp16: lowbit's exact float32 product rounded once to fp16
        worst = max(worst, (w.half().float() - ref).abs().max().item())
    peer = copy.deepcopy(model)
    load_peer(peer, work)
    ids = tok(Path(__file__).resolve().parents[1].joinpath("tests/data/wikitext-2/test-excerpt.txt").read_text(),
              return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        d = (ours(ids).logits - peer(ids).logits).abs().max().item()
    print(f"GPTQModel checkpoint {ckpt}: quantization_config {json.dumps(qcfg)}")
    print(f"lowbit.load {load_s:.1f} s; layers {kinds}; max |lowbit weight (fp16) - GPTQModel dequantize_weight()| "
          f"= {worst:.3g}; max |logit diff| vs GPTQModel's weights in fp32 over {ids.shape[1]} tokens = {d:.3g}")


if __name__ == "__main__":
    main()
