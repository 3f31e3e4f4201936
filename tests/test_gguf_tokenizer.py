"""Hugging Face tokenizer -> GGUF tokenizer.* metadata (lowbit/io/gguf/tokenizer.py).

References: the tokenizer.* fields llama.cpp's converter wrote into SmolLM2's GGUF, transformers' GGUF
tokenizer reader (what lowbit.load and other tools build from our file), and llama.cpp's own tokenizer
(llama-cpp-python's Llama(vocab_only=True).tokenize, tests/llama_cpp_judge.py).
"""
import copy
import json

import pytest
import torch
from llama_cpp_judge import tokenize as llama_cpp_tokenize

import lowbit
from lowbit.io import builtin_model_path
from lowbit.io.gguf.file import parse_gguf
from lowbit.io.gguf.tokenizer import (LLAMA3_SPLIT, PRE_TOKENIZERS, QWEN2_SPLIT, pre_tokenizer_name,
                                     tokenizer_fields)

# SmolLM2-135M-Instruct's published tokenizer.json splits digits one by one before GPT-2's byte-level
# regex; transformers' GGUF reader does not rebuild that (it knows no "smollm") and writes plain ByteLevel.
SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
SENTENCES = ["The capital of France is Paris.", "  two spaces, tabs\tand\nnew lines\n\n",
             "Numbers 12345 and 3.14159; émigré naïve café 東京 🚀",
             "<|im_start|>user\nHi there!<|im_end|>\n", "It's 'quoted' and we'll see", ""]


@pytest.fixture(scope="module")
def smollm2_tok_dir(tmp_path_factory):
    """SmolLM2's tokenizer read from its GGUF by transformers, saved as tokenizer.json; with the model's
    published pre-tokenizer and clean_up_tokenization_spaces put back."""
    from transformers import AutoTokenizer

    path = builtin_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    folder = tmp_path_factory.mktemp("smollm2-tok")
    tok.save_pretrained(folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = SMOLLM2_PRE
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["clean_up_tokenization_spaces"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return folder


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tok_dir), local_files_only=True)


@pytest.fixture(scope="module")
def source_meta():
    return parse_gguf(builtin_model_path("smollm2-135m")).meta


def test_smollm2_round_trip_gives_llama_cpps_fields(smollm2_tok_dir, source_meta):
    ours = {k: v for k, (v, _, _) in tokenizer_fields(smollm2_tok_dir, 49152).items()}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key] == source_meta[key], key
    # Fields that legitimately differ: we always say whether EOS is appended (False, llama.cpp's default
    # for BPE, which is why its converter omitted the key); llama.cpp also wrote add_space_prefix=False,
    # which its BPE tokenizer assumes anyway, so we leave it out.
    assert ours["tokenizer.ggml.add_eos_token"] is False and "tokenizer.ggml.add_eos_token" not in source_meta
    assert set(ours) ^ {k for k in source_meta if k.startswith("tokenizer.")} == {
        "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"}


def test_pre_tokenizer_names(smollm2_tok_dir):
    tj = json.loads((smollm2_tok_dir / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

    def named(pre, tok=None, ignore_merges=False):
        return pre_tokenizer_name(dict(tj, pre_tokenizer=pre, model=dict(tj["model"], ignore_merges=ignore_merges)), tok)

    def split(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, byte_level]}

    assert named(SMOLLM2_PRE) == "smollm"
    assert named(split(r"\p{N}") | {"pretokenizers": [split(r"\p{N}")["pretokenizers"][0],
                                                     dict(byte_level, use_regex=True)]}) == "smollm"  # lowbit.load_model's spelling
    assert named(SMOLLM2_PRE, type("T", (), {"clean_up_tokenization_spaces": True})) == "starcoder"
    assert named(SMOLLM2_PRE["pretokenizers"][1]) == "gpt-2"
    assert named(split(LLAMA3_SPLIT), ignore_merges=True) == "llama-bpe"
    assert named(split(LLAMA3_SPLIT)) == "dbrx"  # the same split; llama.cpp's llama-bpe ignores merges
    assert named(split(QWEN2_SPLIT)) == "qwen2"
    with pytest.raises(ValueError, match=r"pre-tokenizer .*Split.*not one lowbit recognises.*pre_tokenizer="):
        named(split(r"\p{L}+"))
    with pytest.raises(ValueError, match="ignore_merges True"):
        named(SMOLLM2_PRE, ignore_merges=True)


def test_pre_tokenizer_regexes_are_transformers(smollm2_tok_dir):
    """Our split regexes are the ones transformers rebuilds for llama.cpp's names."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for (steps, _), name in PRE_TOKENIZERS.items():
        if steps[0][0] == "Split":
            assert GGUF_PRE_TOKENIZER_SPLITS[name] == steps[0][1], name


def test_token_types_padding_and_added_tokens(smollm2_tok_dir):
    """Ids past the vocabulary are "[PAD<id>]" UNUSED; an added non-special token is USER_DEFINED, a
    `<|...|>` one CONTROL even when not flagged special (llama.cpp's converter rule)."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_tok_dir), local_files_only=True)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("<|tool|>", special=False)])
    f = tokenizer_fields(tok, 49160)
    tokens, types = f["tokenizer.ggml.tokens"][0], f["tokenizer.ggml.token_type"][0]
    assert tokens[49152:] == ["<think>", "<|tool|>"] + [f"[PAD{i}]" for i in range(49154, 49160)]
    assert types[49152:] == [4, 3] + [5] * 6
    with pytest.raises(ValueError, match="token id 49153, the model only 49152"):
        tokenizer_fields(tok, 49152)


def test_refuses_what_it_cannot_convert(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="found model 'WordPiece'"):
        tokenizer_fields(PreTrainedTokenizerFast(tokenizer_object=wp), 2)
    bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match=r"found model 'BPE', pre_tokenizer \['Whitespace'\]"):
        tokenizer_fields(PreTrainedTokenizerFast(tokenizer_object=bpe), 3)
    # spaces as "▁" but no <0xNN> tokens: llama.cpp's SentencePiece tokenizer would have no byte to fall back to
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(ValueError, match="without byte fallback"):
        tokenizer_fields(PreTrainedTokenizerFast(tokenizer_object=bpe), 3)
    # byte-level BPE under a normalizer llama.cpp does not apply
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match=r"normalizer \['Lowercase'\]"):
        tokenizer_fields(PreTrainedTokenizerFast(tokenizer_object=bpe), 3)
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer_fields(tmp_path, 3)


def _tiny_llama(vocab_size=49152):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=True,
                         max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def written(smollm2_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("written") / "tiny.gguf"
    return lowbit.save(_tiny_llama(), path, recipe="f32", tokenizer=smollm2_tok)


def test_written_file_tokenizes_like_the_source(written, smollm2_tok, source_meta):
    from transformers import AutoTokenizer

    meta = parse_gguf(written).meta
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.tokens"] == source_meta["tokenizer.ggml.tokens"]
    back = AutoTokenizer.from_pretrained(str(written.parent), gguf_file=written.name, local_files_only=True)
    # transformers' GGUF reader splits "smollm" text as plain GPT-2 does (no digit split): compare on the
    # source tokenizer with that split, and the digit-splitting one through lowbit.load_model, which
    # restores llama.cpp's "smollm" split.
    plain = copy.deepcopy(smollm2_tok)
    plain.backend_tokenizer.pre_tokenizer = back.backend_tokenizer.pre_tokenizer
    for s in SENTENCES:
        assert back.encode(s) == plain.encode(s), s
        assert back.decode(back.encode(s)) == s
    _, tok = lowbit.load_model(written)
    for s in SENTENCES:
        assert tok.encode(s) == smollm2_tok.encode(s), s
    assert tok.encode("12345", add_special_tokens=False) == smollm2_tok.convert_tokens_to_ids(list("12345"))


def test_save_needs_a_tokenizer_or_source(tmp_path, smollm2_tok):
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"pass tokenizer=.*or source="):
        lowbit.save(model, tmp_path / "m.gguf", recipe="f32")
    with pytest.raises(ValueError, match="not a .gguf file"):
        lowbit.save(model, tmp_path / "m.gguf", recipe="f32", tokenizer=smollm2_tok, source=tmp_path)
    with pytest.raises(ValueError, match="token id 49151, the model only 1000"):
        lowbit.save(_tiny_llama(1000), tmp_path / "m.gguf", recipe="f32", tokenizer=smollm2_tok)
    assert not list(tmp_path.iterdir())


def test_llama_cpp_tokenizes_the_written_file_like_transformers(written, smollm2_tok):
    for s in SENTENCES + _wikitext_paragraphs():
        assert llama_cpp_tokenize(written, s) == smollm2_tok.encode(s, add_special_tokens=False), s[:80]


def test_llama_cpp_tokenizes_the_packaged_smollm2_like_transformers(smollm2_tok):
    """The reference pair itself: llama.cpp over the GGUF file lowbit ships SmolLM2 in (written by
    llama.cpp's converter) against transformers' tokenizer, on real text; BOS-less, as SmolLM2 is."""
    path = builtin_model_path("smollm2-135m")
    for s in SENTENCES + _wikitext_paragraphs():
        assert llama_cpp_tokenize(path, s) == smollm2_tok.encode(s, add_special_tokens=False), s[:80]
    assert llama_cpp_tokenize(path, "Hi", add_bos=True) == smollm2_tok.encode("Hi")  # add_bos_token is False


def _wikitext_paragraphs(n: int = 12) -> list[str]:
    from conftest import wikitext_excerpt

    return [p for p in wikitext_excerpt().split("\n") if len(p) > 200][:n]


def _spm_bpe_tokenizer(n_merged: int = 800):
    """A Llama-2-shaped tokenizer (BPE over "▁"-prefixed text with <0xNN> byte fallback), trained here on
    the wikitext excerpt: no Llama 2 tokenizer ships with the test data."""
    from conftest import wikitext_excerpt
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trainer.normalizer = normalizer
    trainer.train_from_iterator(wikitext_excerpt().splitlines(),
                                trainers.BpeTrainer(vocab_size=n_merged, limit_alphabet=100, show_progress=False))
    trained = json.loads(trainer.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_bpe_is_written_as_llama(tmp_path):
    from transformers import AutoTokenizer

    tok = _spm_bpe_tokenizer()
    path = lowbit.save(_tiny_llama(len(tok)), tmp_path / "spm.gguf", recipe="f32", tokenizer=tok)
    meta = parse_gguf(path).meta
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6] and meta["tokenizer.ggml.tokens"][3 + 0x41] == "<0x41>"
    assert "tokenizer.ggml.merges" not in meta  # llama.cpp's SPM tokenizer merges by score, as its converter writes
    # transformers rebuilds the merges from our scores. (It also handles leading spaces its own way, a
    # reader difference, so the sentence starting with spaces is left to llama.cpp below.)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name, local_files_only=True)
    for s in SENTENCES:
        if not s.startswith(" "):
            assert back.encode(s) == tok.encode(s), s
    for s in SENTENCES + _wikitext_paragraphs(4):
        assert llama_cpp_tokenize(path, s, add_bos=True) == tok.encode(s), s[:80]
