"""Make the golden K-quant bytes in tests/golden/ for types that no SmolLM2 mixture writes (Q2_K, Q3_K).

    python bench/gguf_check.py --recipes f32                       # once: /tmp/lowbit-gguf-check/smollm2-f32.gguf
    python bench/kquant_golden.py --types Q2_K,Q3_K_S

SmolLM2's 576-wide rows are not a multiple of 256, so `llama-quantize --pure` aborts on them; this script
copies the F32 file's metadata and only the 1536-wide ffn_down tensors into a smaller GGUF, lets
llama-quantize --pure turn that into the type, and keeps the first 16 rows of one tensor.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf_check import bins  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
GGML = {"Q2_K": "q2_k", "Q3_K_S": "q3_k"}


def ffn_down_only(f32: Path, out: Path) -> None:
    r = gguf.GGUFReader(f32)
    w = gguf.GGUFWriter(out, arch=r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name.endswith("ffn_down.weight"):
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", default="/tmp/lowbit-gguf-check/smollm2-f32.gguf")
    ap.add_argument("--types", default="Q2_K,Q3_K_S")
    ap.add_argument("--tensor", default="blk.3.ffn_down.weight")
    ap.add_argument("--work", default="/tmp/lowbit-kquant-golden")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "ffn_down-f32.gguf"
    ffn_down_only(Path(args.f32), src)
    for ftype in args.types.split(","):
        out = work / f"ffn_down-{ftype}.gguf"
        subprocess.run([bins() / "llama-quantize", "--pure", src, out, ftype, "2"], check=True, capture_output=True)
        t = next(t for t in gguf.GGUFReader(out).tensors if t.name == args.tensor)
        assert t.tensor_type.name.lower() == GGML[ftype], t.tensor_type
        rows = np.asarray(t.data)[:16]
        short = args.tensor.removesuffix(".weight").replace(".", "", 1).replace(".", "_")
        dest = GOLDEN / f"{GGML[ftype]}_smollm2_{short}_rows0-15.bin"
        rows.tofile(dest)
        print(f"{dest}: {rows.shape} from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
