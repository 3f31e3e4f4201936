"""Hybrid recipes as serving stacks build them (issue 13), SmolLM2-135M, measured on the same test
windows as bench/mixed_precision.py (first 16 windows of 512 of wikitext-2 test.txt):

  w8 linears in fp32 / the whole model in bf16 (attention, softmax and logits too) / bf16 with the
  logits in fp32 (the output layer's input and weight in fp32);
  w3g64 / w4g64 with the first and last blocks kept in 8-bit (overrides), next to the mixed recipe
  that lowbit.search picks at the same bits per weight (the sensitivity measured by
  bench/mixed_precision.py, read from its --out folder).

    flock /tmp/lowbit-heavy.lock nice -n 5 env PYTHONPATH=. .venv/bin/python bench/hybrid_recipes.py
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from lowbit.analysis.mixed import plan_mixed
from lowbit.analysis.sensitivity import Sensitivity
from lowbit.eval import Reference, evaluate, linear_bits_per_weight, model_size, token_ids
from lowbit.io import load_model, models, wikitext2
from lowbit.pipeline import Override, get_recipe, quantize

W8 = get_recipe("w8").weights


def fp32_logits(model) -> None:
    """The output layer in fp32 on fp32 inputs, the rest as it is (an untied fp32 copy of the head)."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().float().clone())
    head.register_forward_pre_hook(lambda m, args: (args[0].float(),))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/mixed")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not models.WIKITEXT2.is_dir():  # a git worktree beside the main clone: ../shared is one level up
        models.WIKITEXT2 = Path("/work/shared/data/wikitext-2")
    model, tok = load_model("smollm2-135m")
    test = token_ids(tok, wikitext2("test"))
    ref = Reference.capture(model, test[: args.windows * 512], window=512, max_windows=args.windows,
                            batch_size=4, progress=False)
    sens = Sensitivity.from_dict(json.loads((Path(args.out) / "sensitivity.json").read_text()))
    last = len(model.model.layers) - 1
    ends = (Override("model.layers.0.*", weights=W8), Override(f"model.layers.{last}.*", weights=W8))
    runs = [("w8 fp32", get_recipe("w8"), None), ("w8 bf16", get_recipe("w8"), "bf16"),
            ("w8 bf16 + fp32 logits", get_recipe("w8"), "bf16+logits")]
    for base in ("w3g64", "w4g64-sym"):
        r = get_recipe(base)
        runs.append((f"{base} + first/last blocks w8", r.replace(overrides=ends, name=f"{base}-ends8"), None))
    for name, recipe, dtype in runs:
        q = quantize(copy.deepcopy(model), recipe, progress=False)
        size = model_size(q).bytes
        bits = linear_bits_per_weight(q)
        if dtype:
            q = q.to(torch.bfloat16)
            if dtype == "bf16+logits":
                fp32_logits(q)
        rep = evaluate(q, ref, batch_size=4, progress=False)
        print(json.dumps({"recipe": name, "bits_per_weight": bits, "model_bytes": size, "ppl": rep.ppl,
                          "delta_ppl_pct": rep.delta_ppl_pct, "kl": rep.kl}), flush=True)
        if "blocks w8" in name:  # lowbit.search at the same bits per weight
            plan = plan_mixed(sens, bits)
            q = quantize(copy.deepcopy(model), plan.recipe, progress=False)
            rep = evaluate(q, ref, batch_size=4, progress=False)
            print(json.dumps({"recipe": f"mixed at {bits:.4f}", "bits_per_weight": linear_bits_per_weight(q),
                              "model_bytes": model_size(q).bytes, "ppl": rep.ppl,
                              "delta_ppl_pct": rep.delta_ppl_pct, "kl": rep.kl}), flush=True)


if __name__ == "__main__":
    main()
