"""`lowbit formats [NAME] [--value V] [--plot F ...]`: the number formats, how a value is stored in one."""
from __future__ import annotations

import math

from .. import formats


def register(sub) -> dict:
    pf = sub.add_parser("formats", help="list number formats, or show how a value is stored in one")
    pf.add_argument("name", nargs="?", help="a format name, e.g. fp8_e4m3")
    pf.add_argument("--value", type=float, action="append", help="a value to round (repeatable)")
    pf.add_argument("--plot", nargs="+", metavar="FORMAT", help="draw these formats' values and rounding error")
    pf.add_argument("--out", default="formats.png", help="PNG for --plot (default formats.png)")
    return {"formats": cmd_formats}


def _fmt_num(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def formats_table() -> str:
    head = f"{'format':<18} {'kind':<9} {'bits':>4} {'max':>12} {'min normal':>12} {'min subnormal':>14} " \
           f"{'epsilon':>10} {'range dB':>9}"
    rows = [head, "-" * len(head)]
    for name in formats.names():
        f = formats.get(name)
        rows.append(f"{name:<18} {f.kind:<9} {f.bits:>4} {_fmt_num(f.max):>12} {_fmt_num(f.smallest_normal):>12} "
                    f"{_fmt_num(f.smallest_subnormal):>14} {_fmt_num(f.eps):>10} {f.dynamic_range_db:>9.1f}")
    rows.append("fixed point qM.N (e.g. q3.4) and learned kmeans1..kmeans8 are accepted too.")
    return "\n".join(rows)


def explain_value(name: str, value: float) -> str:
    """How `value` is stored in format `name`: the code, its bit fields and the error."""
    import torch

    f = formats.get(name)
    code = int(f.encode(torch.tensor([value], dtype=torch.float64), saturate=True)[0])
    got = float(f.decode(torch.tensor([code]))[0])
    bits = format(code, f"0{f.bits}b")
    lines = [f"{name}: {value!r} -> {got!r}  (code {code}, 0b{bits})"]
    if isinstance(f, formats.FloatFormat):
        s, e, m = bits[0], bits[1:1 + f.exp_bits], bits[1 + f.exp_bits:]
        lines.append(f"  sign {s} | exponent {e} (unbiased {int(e, 2) - f.bias if int(e, 2) else 1 - f.bias}) "
                     f"| mantissa {m or '-'}")
    elif isinstance(f, formats.E8M0Format):
        lines.append(f"  exponent {bits} (2^{code - 127})")
    elif isinstance(f, formats.CodebookFormat):
        lines.append(f"  index {code} of {f.values.numel()} codebook values")
    limit = _out_of_range(f, value, got)
    if limit:
        lines.append(limit)
    if math.isnan(value) or math.isinf(value):
        return "\n".join(lines)
    err = got - value
    rel = abs(err) / abs(value) if value else 0.0
    lines.append(f"  error {err:+.6g} (relative {rel:.3%})")
    if got == float(f.round(torch.tensor([1.0], dtype=torch.float64))[0]) and value != 1.0 and abs(value - 1) < 0.5:
        lines.append(f"  in {name}, {value!r} and 1.0 look the same")
    return "\n".join(lines)


def _out_of_range(f, value: float, got: float) -> str | None:
    """A line saying the value was not represented but replaced: NaN where the format has none, or a
    value beyond its range, saturated (float formats) or clipped (integers, codebooks) to its end."""
    if math.isnan(value):
        return (f"  NaN: stored as {f.name}'s NaN code" if math.isnan(got) else
                f"  NaN: {f.name} has no NaN; the encoder stores it as {got!r}, an ordinary value")
    if f.min <= value <= f.max or got == value:
        return None
    word = "saturated" if f.kind == "float" else "clipped"
    return (f"  {word}: {value!r} is outside {f.name}'s range [{_fmt_num(f.min)}, {_fmt_num(f.max)}]; stored as "
            f"{got!r}" + (f" ({f.name} has no infinity)" if math.isinf(value) else ""))


def check_args(args) -> None:
    """`lowbit formats`: names known and --out's folder existing, before anything is drawn."""
    from pathlib import Path

    for name in [*(args.plot or []), *([args.name] if args.name else [])]:
        formats.get(name)  # unknown format 'x': the known ones listed
    if args.plot:
        parent = Path(args.out).absolute().parent
        if not parent.is_dir():
            raise ValueError(f"--out {args.out}: the folder {parent} does not exist; create it or choose another")
    if args.value and not args.name:
        raise ValueError("--value: give a format name too, e.g. lowbit formats fp8_e4m3 --value 500")


def cmd_formats(args) -> None:
    check_args(args)
    if args.plot:
        from ..analysis import plot_formats

        print(f"wrote {plot_formats(args.plot, args.out)}")
    elif args.name is None:
        print(formats_table())
    elif not args.value:
        f = formats.get(args.name)
        print(f"{f.name}: {f.kind}, {f.bits} bits, max {_fmt_num(f.max)}, epsilon {_fmt_num(f.eps)}")
        if f.bits <= 6:
            print("values:", ", ".join(_fmt_num(float(v)) for v in f.values))
    else:
        print("\n".join(explain_value(args.name, v) for v in args.value))
