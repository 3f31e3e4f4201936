"""Turn a Hugging Face tokenizer into GGUF `tokenizer.*` metadata, as llama.cpp's converter would write it.

    fields = tokenizer_fields(tok, vocab_size=49152)   # {key: (value, GGUF value type, array item type)}

`tok` is a transformers tokenizer backed by `tokenizers` (what AutoTokenizer gives), or a folder with
tokenizer.json + tokenizer_config.json. Two BPE flavours are converted:

- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2) -> tokenizer.ggml.model "gpt2": tokens, token
  types, merges, and `tokenizer.ggml.pre`, the name llama.cpp uses to pick its pre-tokenizer regex.
  llama.cpp's converter finds that name by hashing the tokenization of a check text against its own
  table; we read it off the tokenizer's pre_tokenizer configuration instead (PRE_TOKENIZERS below).
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral) -> "llama": tokens with scores (minus the
  merge rank: llama.cpp's SPM tokenizer merges the pair whose result scores highest), <0xNN> tokens as BYTE.

Anything else (Unigram, WordPiece, BPE that is neither) is a ValueError. The result's dict form is the one
gguf.write copies from a GGUF source, so both paths write through GGUFWriter.add_key_value.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

# gguf.TokenType values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# GGUF value types (gguf.GGUFValueType)
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9

# The split regexes of the models' tokenizer.json files (Llama 3, Qwen2); llama.cpp rewrites them with
# case-insensitive groups spelled out, but selects them by these names.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_EACH_DIGIT = (("Digits", True), ("ByteLevel", True))  # SmolLM2, StarCoder: digits one by one, then GPT-2's regex

# pre_tokenizer steps (see _pre_steps) -> tokenizer.ggml.pre. "smollm" and "starcoder" split text alike;
# llama.cpp keeps spaces around punctuation when detokenizing "smollm" (clean_spaces off), which is what
# clean_up_tokenization_spaces=False says in tokenizer_config.json.
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    _EACH_DIGIT: "smollm",
}


def tokenizer_fields(tokenizer, vocab_size: int) -> dict[str, tuple]:
    """{GGUF key: (value, value type, array item type or None)} for `tokenizer` (a transformers fast
    tokenizer or a folder holding tokenizer.json); `vocab_size`: the model's embedding rows, ids without a
    token are filled with "[PAD<id>]" (type UNUSED) as llama.cpp's converter does."""
    tok = _load(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF tokenizer conversion needs a fast (tokenizers-backed) tokenizer; got "
                         f"{type(tok).__name__}")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export converts BPE tokenizers only; this one is {model.get('type')!r} "
                         f"(pass source=<a .gguf file> to copy a tokenizer from GGUF instead)")
    if model.get("byte_fallback"):
        out = _spm_bpe(tj, vocab_size)
    elif _is_byte_level(tj):
        out = _byte_level_bpe(tj, vocab_size, tok)
    else:
        raise ValueError("GGUF export converts byte-level BPE (GPT-2 style) and byte-fallback BPE (Llama 2 "
                         "style); this BPE tokenizer is neither (no ByteLevel pre-tokenizer, no byte_fallback)")
    out.update(_special(tok, vocab_size))
    return out


def _load(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        folder = Path(tokenizer)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {str(tokenizer)!r}: expected a folder with tokenizer.json")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tokenizer


def _string_array(values: list[str]) -> tuple:
    return values, _ARRAY, _STRING


def _vocab_table(tj: dict, vocab_size: int) -> tuple[list[str | None], dict[int, dict]]:
    """(token text by id, None where no token has the id; added-token entries by id)."""
    vocab = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    top = max([*vocab.values(), *added, -1])
    if top >= vocab_size:
        raise ValueError(f"the tokenizer has token id {top}, the model only {vocab_size} embedding rows")
    tokens: list[str | None] = [None] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a["content"]
    return tokens, added


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL even when not flagged special (`<|...|>` etc.)."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _added_type(entry: dict) -> int:
    return CONTROL if entry.get("special") or _looks_special(entry["content"]) else USER_DEFINED


def _merges(tj: dict) -> list[str]:
    """Merges as "left right" strings; the newer tokenizer.json form is a list of pairs."""
    out = []
    for m in tj["model"].get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ValueError(f"merge {m!r} cannot be written as GGUF's 'left right' string")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _byte_level_bpe(tj: dict, vocab_size: int, tok) -> dict[str, tuple]:
    tokens, added = _vocab_table(tj, vocab_size)
    types = [UNUSED if t is None else (_added_type(added[i]) if i in added else NORMAL)
             for i, t in enumerate(tokens)]
    merges = _merges(tj)
    if not merges:
        raise ValueError("the byte-level BPE tokenizer has no merges")
    return {
        "tokenizer.ggml.model": ("gpt2", _STRING, None),
        "tokenizer.ggml.pre": (pre_tokenizer_name(tj, tok), _STRING, None),
        "tokenizer.ggml.tokens": _string_array([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]),
        "tokenizer.ggml.token_type": (types, _ARRAY, _INT32),
        "tokenizer.ggml.merges": _string_array(merges),
    }


def _spm_bpe(tj: dict, vocab_size: int) -> dict[str, tuple]:
    tokens, added = _vocab_table(tj, vocab_size)
    unk = tj["model"].get("unk_token")
    rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(_merges(tj))))}
    types, scores = [], []
    for i, t in enumerate(tokens):
        if t is None:
            types.append(UNUSED)
        elif t == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(_added_type(added[i]))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        # llama.cpp merges the adjacent pair whose result has the highest score: minus the merge rank
        # reproduces the BPE merge order; tokens no merge makes (characters, bytes, specials) score 0
        scores.append(-float(rank.get(t, 0)) if types[-1] == NORMAL else -1000.0 if types[-1] in (USER_DEFINED, UNUSED)
                      else 0.0)
    return {
        "tokenizer.ggml.model": ("llama", _STRING, None),
        "tokenizer.ggml.pre": ("default", _STRING, None),
        "tokenizer.ggml.tokens": _string_array([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]),
        "tokenizer.ggml.scores": (scores, _ARRAY, _FLOAT32),
        "tokenizer.ggml.token_type": (types, _ARRAY, _INT32),
        "tokenizer.ggml.add_space_prefix": (_adds_space_prefix(tj), _BOOL, None),
    }


def _adds_space_prefix(tj: dict) -> bool:
    """SentencePiece's "▁" before the text: a Prepend normalizer (Llama 2) or a Metaspace pre-tokenizer."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            if node.get("type") == "Metaspace":
                return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return bool(walk(tj.get("normalizer")) or walk(tj.get("pre_tokenizer")))


def _steps(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for sub in node.get("pretokenizers", []) for s in _steps(sub)]
    return [node]


def _is_byte_level(tj: dict) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _steps(tj.get("pre_tokenizer")))


def _pre_steps(tj: dict) -> tuple:
    """The pre_tokenizer as a tuple of (kind, the setting that changes the split)."""
    out = []
    for s in _steps(tj.get("pre_tokenizer")):
        kind = s.get("type")
        if kind == "ByteLevel":
            out.append(("ByteLevel", bool(s.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("Digits", bool(s.get("individual_digits"))))
        elif kind == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            pattern = s.get("pattern") or {}
            regex = pattern.get("Regex", re.escape(pattern.get("String", "")))
            # isolating each \p{N} character is Digits(individual_digits=True) by another name
            out.append(("Digits", True) if regex == r"\p{N}" else ("Split", regex))
        else:
            out.append((kind, json.dumps(s, sort_keys=True)))
    return tuple(out)


def pre_tokenizer_name(tj: dict, tok=None) -> str:
    """tokenizer.ggml.pre for a tokenizer.json dict: a name from PRE_TOKENIZERS, else "default" (warned)."""
    steps = _pre_steps(tj)
    name = PRE_TOKENIZERS.get(steps)
    if name == "smollm" and getattr(tok, "clean_up_tokenization_spaces", False):
        name = "starcoder"
    if name is None:
        warnings.warn(f"GGUF export: pre-tokenizer {steps!r} is not one lowbit recognises "
                      f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); writing tokenizer.ggml.pre = "
                      f"'default', llama.cpp may split text differently from transformers", stacklevel=3)
        name = "default"
    return name


def _special(tok, vocab_size: int) -> dict[str, tuple]:
    """Special token ids, whether encoding adds BOS/EOS (measured by encoding, so a post-processor
    template counts as much as a tokenizer_config flag), and the chat template(s)."""
    out = {}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = getattr(tok, f"{kind}_token_id", None)
        if isinstance(i, int) and 0 <= i < vocab_size:
            out[f"tokenizer.ggml.{key}_token_id"] = (i, _UINT32, None)
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    out["tokenizer.ggml.add_bos_token"] = (len(full) > len(plain) and bos is not None and full[0] == bos, _BOOL, None)
    out["tokenizer.ggml.add_eos_token"] = (len(full) > len(plain) and eos is not None and full[-1] == eos, _BOOL, None)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        out["tokenizer.chat_template"] = (template, _STRING, None)
    elif isinstance(template, dict):  # named templates: "default" is the plain key, the rest get a suffix
        for name, text in template.items():
            key = "tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"
            out[key] = (text, _STRING, None)
    return out
