"""llama.cpp as the tests' judge of lowbit's GGUF files, through llama-cpp-python (a test dependency
that vendors llama.cpp and builds it from source; see INSTALL).

    quantize_file(f32_path, out_path, "q4_0")      # llama.cpp's own quantizer (llama_model_quantize)
    tokenize(path, "text", add_bos=False)          # llama.cpp's tokenizer over the file's vocabulary
    logits(path, ids)                              # [len(ids), vocab] float32, every position

Without llama-cpp-python these helpers FAIL the test (pytest.fail) with the install command: CI
installs it, and a llama.cpp check that skips is a check that never runs.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
           '-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AMX_TILE=OFF -DLLAMA_BUILD_TOOLS=OFF '
           '-DLLAMA_BUILD_EXAMPLES=OFF" pip install llama-cpp-python')
# llama.cpp's file types by lowbit's recipe names (include/llama.h enum llama_ftype)
FTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
          "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
          "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q4_k_s": "MOSTLY_Q4_K_S",
          "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K",
          "iq4_nl": "MOSTLY_IQ4_NL"}
THREADS = 2  # the CI machine's cores


def llama_cpp():
    """The llama_cpp module, or a failed test naming the install command."""
    try:
        import llama_cpp
    except ImportError as e:
        pytest.fail(f"llama-cpp-python is not installed, and the llama.cpp checks must run: {INSTALL} "
                    f"(the test command installs it; {e})", pytrace=False)
    return llama_cpp


def quantize_file(src: str | Path, dst: str | Path, recipe: str) -> Path:
    """llama.cpp's quantizer (llama-quantize's defaults: no imatrix, its own tensor type mixture) over
    the GGUF file `src`, written to `dst`."""
    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_{FTYPES[recipe]}")
    params.nthread = THREADS
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize({src}, {recipe}) returned {rc}"
    return Path(dst)


@functools.lru_cache(maxsize=4)
def _vocab(path: str, mtime_ns: int):
    return llama_cpp().Llama(model_path=path, vocab_only=True, verbose=False)


def tokenize(path: str | Path, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
    """llama.cpp's token ids for `text` with the vocabulary of GGUF file `path` (special: control
    tokens written in the text, such as <|im_start|>, are parsed as tokens, as transformers does)."""
    vocab = _vocab(str(path), Path(path).stat().st_mtime_ns)
    return vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)


def load(path: str | Path, n_ctx: int = 256):
    """A llama.cpp context over GGUF file `path` keeping every position's logits; the KV cache in f32
    (type 0), so the comparison measures the weights and the graph, not a f16 cache."""
    lc = llama_cpp()
    return lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                    type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32, n_threads=THREADS,
                    n_threads_batch=THREADS, verbose=False)


def logits(path: str | Path, ids, n_ctx: int = 256) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] float32 for token ids `ids`, every position, from a fresh context."""
    ids = [int(i) for i in ids]
    if len(ids) > n_ctx:
        raise ValueError(f"{len(ids)} tokens do not fit n_ctx={n_ctx}")
    llm = load(path, n_ctx)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def rel_err(got, want) -> float:
    """The largest relative error over positions: |got - want| / |want| in the 2-norm of each row of logits."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float((np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)).max())
