"""Turn a Hugging Face tokenizer into GGUF `tokenizer.*` metadata, as llama.cpp's converter would write it.

    fields = tokenizer_fields(tok, vocab_size=49152)   # {key: (value, GGUF value type, array item type)}

`tok` is a transformers tokenizer backed by `tokenizers` (what AutoTokenizer gives), or a folder with
tokenizer.json + tokenizer_config.json. Which llama.cpp tokenizer the file gets is decided from the whole
tokenizer.json (gguf_tokenizer_model): the model's type and flags, the pre-tokenizer, the normalizer and
the decoder, never from one flag alone:

- byte-level BPE (a ByteLevel pre-tokenizer: GPT-2, SmolLM2, Llama 3, Qwen2/3) -> tokenizer.ggml.model
  "gpt2": tokens, token types, merges, and `tokenizer.ggml.pre`, the name llama.cpp picks its split regex
  (and its ignore_merges flag) by. llama.cpp's converter finds that name by hashing the tokenization of a
  check text; we read it off the pre_tokenizer's steps and regexes (PRE_TOKENIZERS below). `byte_fallback`
  means nothing here (every byte already is a token), though transformers 4.x writes it for GGUF vocabularies.
- SentencePiece-style BPE with byte fallback ("▁" for spaces, by a Metaspace pre-tokenizer or a Replace
  normalizer: Llama 2, Mistral, Gemma) -> "llama": tokens with scores (minus the merge rank: llama.cpp's
  SPM tokenizer merges the pair whose result scores highest), <0xNN> tokens as BYTE.
- SentencePiece-style Unigram (T5) -> "t5", llama.cpp's Viterbi (UGM) tokenizer: tokens with their log
  probabilities as scores.

Anything else is a ValueError naming what was found. The result's dict form is the one gguf.write copies
from a GGUF source, so both paths write through GGUFWriter.add_key_value.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# gguf.TokenType values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# GGUF value types (gguf.GGUFValueType)
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9

# The split regexes of the models' tokenizer.json files, as transformers' GGUF reader rebuilds them for
# llama.cpp's names (llama.cpp rewrites them with the case-insensitive groups spelled out).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = (("ByteLevel", True),)  # GPT-2's own regex, inside the ByteLevel step
_EACH_DIGIT = (("Digits", True), ("ByteLevel", True))  # SmolLM2, StarCoder: digits one by one, then GPT-2's


def _split(regex: str) -> tuple:
    return (("Split", regex), ("ByteLevel", False))


# (pre_tokenizer steps (see _pre_steps), the BPE model's ignore_merges) -> tokenizer.ggml.pre. llama.cpp
# fixes ignore_merges per name (llama-vocab.cpp: on for llama-bpe, off for dbrx, which splits alike), so
# the flag is part of the key. "smollm" and "starcoder" split text alike; llama.cpp keeps spaces around
# punctuation when detokenizing "smollm" (clean_spaces off), which is what clean_up_tokenization_spaces=False
# says in tokenizer_config.json.
PRE_TOKENIZERS = {
    (_GPT2, False): "gpt-2",
    (_EACH_DIGIT, False): "smollm",
    (_split(LLAMA3_SPLIT), True): "llama-bpe",
    (_split(LLAMA3_SPLIT), False): "dbrx",
    (_split(QWEN2_SPLIT), False): "qwen2",
    (_split(QWEN35_SPLIT), False): "qwen35",
}
_PRE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def tokenizer_fields(tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> dict[str, tuple]:
    """{GGUF key: (value, value type, array item type or None)} for `tokenizer` (a transformers fast
    tokenizer or a folder holding tokenizer.json); `vocab_size`: the model's embedding rows, ids without a
    token are filled with "[PAD<id>]" (type UNUSED) as llama.cpp's converter does. `pre_tokenizer`: the
    tokenizer.ggml.pre name to write for a byte-level BPE whose pre-tokenizer lowbit does not recognise
    (one of llama.cpp's names, e.g. "llama-bpe"), instead of the name read off tokenizer.json."""
    tok = _load(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF tokenizer conversion needs a fast (tokenizers-backed) tokenizer; got "
                         f"{type(tok).__name__}")
    tj = json.loads(backend.to_str())
    where = _where(tokenizer, tok)
    kind = gguf_tokenizer_model(tj, where)
    if pre_tokenizer is not None and kind != "gpt2":
        raise ValueError(f"pre_tokenizer={pre_tokenizer!r}: llama.cpp splits text by a named pre-tokenizer for "
                         f"byte-level BPE only; {where} is converted as a {kind!r} tokenizer, drop the option")
    if kind == "gpt2":
        out = _byte_level_bpe(tj, vocab_size, pre_tokenizer or pre_tokenizer_name(tj, tok, where))
    elif kind == "llama":
        out = _spm_bpe(tj, vocab_size)
    else:
        out = _unigram(tj, vocab_size)
    out.update(_special(tok, vocab_size))
    return out


def check_pre_tokenizer(name: str | None, option: str = "pre_tokenizer") -> None:
    """A tokenizer.ggml.pre override is a name as llama.cpp spells them (lowercase, e.g. "llama-bpe");
    llama.cpp itself refuses a name it does not know when it loads the file."""
    if name is not None and not (isinstance(name, str) and _PRE_NAME.fullmatch(name)):
        raise ValueError(f"{option}={name!r}: give one of llama.cpp's pre-tokenizer names (lowercase, such as "
                         f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}, starcoder, gpt-4o, tekken)")


def _where(tokenizer, tok) -> str:
    """The tokenizer.json the conversion reads, for error messages."""
    if isinstance(tokenizer, (str, Path)):
        return str(Path(tokenizer) / "tokenizer.json")
    name = getattr(tok, "name_or_path", "") or ""
    return f"the tokenizer.json of {type(tok).__name__}" + (f" {name!r}" if name else "")


def _load(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        folder = Path(tokenizer)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {str(tokenizer)!r}: expected a folder with tokenizer.json")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tokenizer


def _nodes(node) -> list[dict]:
    """A normalizer / pre_tokenizer / decoder node and the ones its Sequence holds, in order."""
    if not isinstance(node, dict):
        return []
    children = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
    return [node] + [n for c in children for n in _nodes(c)]


def _types(node) -> list[str]:
    return [n.get("type") for n in _nodes(node) if n.get("type") != "Sequence"]


def _spaces_as_metaspace(tj: dict) -> bool:
    """SentencePiece's way with spaces: "▁" by a Metaspace pre-tokenizer/decoder or a Replace normalizer."""
    replaces = any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in _nodes(tj.get("normalizer")))
    return replaces or "Metaspace" in _types(tj.get("pre_tokenizer")) + _types(tj.get("decoder"))


def gguf_tokenizer_model(tj: dict, where: str = "tokenizer.json") -> str:
    """tokenizer.ggml.model for a tokenizer.json dict: "gpt2" (byte-level BPE), "llama" (SentencePiece-style
    BPE with byte fallback) or "t5" (SentencePiece-style Unigram); a ValueError for anything else."""
    model = tj.get("model") or {}
    kind = model.get("type")
    byte_level = "ByteLevel" in _types(tj.get("pre_tokenizer"))
    metaspace = _spaces_as_metaspace(tj)
    found = (f"model {kind!r}, pre_tokenizer {_types(tj.get('pre_tokenizer')) or None}, normalizer "
             f"{_types(tj.get('normalizer')) or None}, decoder {_types(tj.get('decoder')) or None}")
    if kind == "BPE" and byte_level and not metaspace:
        _check_byte_level_normalizer(tj, where)
        return "gpt2"
    if kind == "BPE" and metaspace and not byte_level:
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in model.get("vocab", {})]
        if not model.get("byte_fallback") or missing:
            raise ValueError(f"{where}: a SentencePiece-style BPE without byte fallback ({found}; byte_fallback "
                             f"{model.get('byte_fallback')}, {len(missing)} of the <0x00>..<0xFF> tokens missing): "
                             "llama.cpp's SentencePiece tokenizer spells unknown characters as <0xNN> byte tokens")
        return "llama"
    if kind == "Unigram" and metaspace and not byte_level:
        return "t5"
    raise ValueError(f"{where}: GGUF export converts byte-level BPE (a ByteLevel pre-tokenizer, GPT-2 style) and "
                     f"SentencePiece-style BPE with byte fallback or Unigram (spaces as \"\u2581\"); found {found}. "
                     "Pass source=<a .gguf file> to copy a tokenizer from GGUF instead")


def _check_byte_level_normalizer(tj: dict, where: str) -> None:
    """llama.cpp's BPE tokenizer normalizes nothing: a tokenizer.json normalizer other than NFC (Qwen2's,
    a no-op on text already in NFC, the form nearly all text is in) would tokenize differently."""
    kinds = [k for k in _types(tj.get("normalizer")) if k != "NFC"]
    if kinds:
        raise ValueError(f"{where}: byte-level BPE with normalizer {kinds}; llama.cpp's BPE tokenizer applies no "
                         "normalizer, so its ids would differ from transformers'")


def _string_array(values: list[str]) -> tuple:
    return values, _ARRAY, _STRING


def _vocab_table(tj: dict, vocab_size: int) -> tuple[list[str | None], dict[int, dict]]:
    """(token text by id, None where no token has the id; added-token entries by id)."""
    vocab = tj["model"]["vocab"]
    if isinstance(vocab, list):  # Unigram: [[piece, log probability], ...] in id order
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
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


def _token_strings(tokens: list[str | None]) -> tuple:
    return _string_array([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL even when not flagged special (`<|...|>` etc.)."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _added_type(entry: dict) -> int:
    return CONTROL if entry.get("special") or _looks_special(entry["content"]) else USER_DEFINED


def _spm_type(i: int, text: str | None, added: dict, unk: str | None, byte_tokens: bool) -> int:
    """A SentencePiece-style token's type: UNUSED (no token), UNKNOWN, an added token's, BYTE, NORMAL."""
    if text is None:
        return UNUSED
    if text == unk:
        return UNKNOWN
    if i in added:
        return _added_type(added[i])
    if byte_tokens and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
        return BYTE
    return NORMAL


def _merges(tj: dict) -> list[str]:
    """Merges as "left right" strings; the newer tokenizer.json form is a list of pairs."""
    out = []
    for m in tj["model"].get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ValueError(f"merge {m!r} cannot be written as GGUF's 'left right' string")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _byte_level_bpe(tj: dict, vocab_size: int, pre: str) -> dict[str, tuple]:
    tokens, added = _vocab_table(tj, vocab_size)
    types = [UNUSED if t is None else (_added_type(added[i]) if i in added else NORMAL)
             for i, t in enumerate(tokens)]
    merges = _merges(tj)
    if not merges:
        raise ValueError("the byte-level BPE tokenizer has no merges")
    return {
        "tokenizer.ggml.model": ("gpt2", _STRING, None),
        "tokenizer.ggml.pre": (pre, _STRING, None),
        "tokenizer.ggml.tokens": _token_strings(tokens),
        "tokenizer.ggml.token_type": (types, _ARRAY, _INT32),
        "tokenizer.ggml.merges": _string_array(merges),
    }


def _spm_bpe(tj: dict, vocab_size: int) -> dict[str, tuple]:
    tokens, added = _vocab_table(tj, vocab_size)
    unk = tj["model"].get("unk_token")
    rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(_merges(tj))))}
    types = [_spm_type(i, t, added, unk, byte_tokens=True) for i, t in enumerate(tokens)]
    # llama.cpp merges the adjacent pair whose result has the highest score: minus the merge rank
    # reproduces the BPE merge order; tokens no merge makes (characters, bytes, specials) score 0
    scores = [-float(rank.get(t, 0)) if k == NORMAL else -1000.0 if k in (USER_DEFINED, UNUSED) else 0.0
              for t, k in zip(tokens, types)]
    return {
        "tokenizer.ggml.model": ("llama", _STRING, None),
        "tokenizer.ggml.pre": ("default", _STRING, None),
        "tokenizer.ggml.tokens": _token_strings(tokens),
        "tokenizer.ggml.scores": (scores, _ARRAY, _FLOAT32),
        "tokenizer.ggml.token_type": (types, _ARRAY, _INT32),
        "tokenizer.ggml.add_space_prefix": (_adds_space_prefix(tj), _BOOL, None),
    }


def _unigram(tj: dict, vocab_size: int) -> dict[str, tuple]:
    """llama.cpp's "t5" (UGM) tokenizer: Viterbi over the pieces' log probabilities, as Unigram does."""
    model = tj["model"]
    if _types(tj.get("normalizer")):
        raise ValueError(f"Unigram tokenizer with normalizer {_types(tj.get('normalizer'))}: lowbit writes "
                         "SentencePiece-style Unigram tokenizers without a normalizer only")
    tokens, added = _vocab_table(tj, vocab_size)
    unk_id = model.get("unk_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) else None
    types = [_spm_type(i, t, added, unk, byte_tokens=bool(model.get("byte_fallback"))) for i, t in enumerate(tokens)]
    scores = [float(s) for _, s in model["vocab"]] + [0.0] * (vocab_size - len(model["vocab"]))
    return {
        "tokenizer.ggml.model": ("t5", _STRING, None),
        "tokenizer.ggml.pre": ("default", _STRING, None),
        "tokenizer.ggml.tokens": _token_strings(tokens),
        "tokenizer.ggml.scores": (scores, _ARRAY, _FLOAT32),
        "tokenizer.ggml.token_type": (types, _ARRAY, _INT32),
        "tokenizer.ggml.add_space_prefix": (_adds_space_prefix(tj), _BOOL, None),
        "tokenizer.ggml.remove_extra_whitespaces": (False, _BOOL, None),
    }


def _adds_space_prefix(tj: dict) -> bool:
    """SentencePiece's "▁" before the text: a Prepend normalizer (Llama 2) or a Metaspace pre-tokenizer."""
    for node in _nodes(tj.get("normalizer")) + _nodes(tj.get("pre_tokenizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
    return False


def _pre_steps(tj: dict) -> tuple:
    """The pre_tokenizer as a tuple of (kind, the setting that changes the split)."""
    out = []
    for s in _nodes(tj.get("pre_tokenizer")):
        kind = s.get("type")
        if kind == "Sequence":
            continue
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


def pre_tokenizer_name(tj: dict, tok=None, where: str = "tokenizer.json") -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json dict: the name from PRE_TOKENIZERS for its
    pre-tokenizer steps and ignore_merges flag; a ValueError naming what was found when there is none."""
    ignore_merges = bool((tj.get("model") or {}).get("ignore_merges"))
    name = PRE_TOKENIZERS.get((_pre_steps(tj), ignore_merges))
    if name == "smollm" and getattr(tok, "clean_up_tokenization_spaces", False):
        name = "starcoder"
    if name is None:
        raise ValueError(
            f"{where}: pre-tokenizer {json.dumps(tj.get('pre_tokenizer'), ensure_ascii=False)} (BPE ignore_merges "
            f"{ignore_merges}) is not one lowbit recognises (it knows {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
            "); llama.cpp would split text differently from transformers. If you know llama.cpp's name for it, "
            "pass it: lowbit.save(..., pre_tokenizer=\"NAME\") or lowbit quantize --pre-tokenizer NAME")
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
