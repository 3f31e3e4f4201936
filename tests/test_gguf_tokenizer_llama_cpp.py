"""Converted tokenizers judged by llama.cpp's own tokenizer (llama-cpp-python, a test dependency).

Each case writes a tiny random llama through lowbit.save(..., format="gguf", tokenizer=...), as users do,
loads it in llama.cpp with vocab_only, and asks for the ids of a multilingual text: they must equal
transformers' ids from the same tokenizer.json. llama.cpp runs in a subprocess: on a bad vocabulary it
aborts the process (std::out_of_range), which would take pytest down with it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.io.gguf.file import parse_gguf

# The split regexes transformers' GGUF reader rebuilds for llama.cpp's names (an outside reference)
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as SPLITS

TEXT = ("Hello, world! It's a test; we'll see what they've done.\n"
        "Grüße aus München: Äpfel, Öl und Übermut für 3 Kinder.\n"
        "你好，世界。今天天气很好，我们去公园吧。\n"
        "日本語のテキストです。カタカナとひらがなも。\n"
        "مرحبا بالعالم، هذا نص عربي.\n"
        "Emoji: 🚀🎉 👍🏽 ❤️\n"
        "Numbers 1234567, 3.14159 and 2026-05-09.\n"
        "def f(x):\n\tif x:\n\t\treturn x  # two spaces\n\n\n"
        "spaces:     five,    four   and three   \n")
UNSEEN = "Ελληνικά και 한국어 ✓ ǅ"  # scripts the trained tokenizers never saw: byte fallback, <unk>
CHAT = "<|im_start|>user\nWie spät ist es? 12:30<|im_end|>\n<|im_start|>assistant\n"

_LLAMA_CPP = """
import json, sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts, special = json.loads(sys.stdin.read())
print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=special) for t in texts]))
"""


def llama_cpp_ids(path, texts: list[str], special: bool = False) -> list[list[int]]:
    """llama.cpp's token ids for each text (no BOS), from the GGUF file at `path`."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort would otherwise run gdb for a backtrace
    out = subprocess.run([sys.executable, "-c", _LLAMA_CPP, str(path)], input=json.dumps([texts, special]),
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, f"llama.cpp failed on {path} (exit {out.returncode}): {out.stderr[-1500:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_llama(vocab_size: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab_size, tie_word_embeddings=True,
                         max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


def write(tokenizer, path, vocab_size: int, **kw):
    return lowbit.save(tiny_llama(vocab_size), path, recipe="f32", tokenizer=tokenizer, **kw)


def hf_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


# --- (a) SmolLM2's real tokenizer, as transformers saves it to a folder -------------------------------

@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """SmolLM2's tokenizer loaded from the packaged GGUF as lowbit.load_model loads it (transformers' GGUF
    reader, then llama.cpp's "smollm" digit split put back), without the model, and saved by transformers."""
    from transformers import AutoTokenizer

    from lowbit.io import builtin_model_path
    from lowbit.io.models import _fix_gguf_pre_tokenizer

    path = builtin_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    _fix_gguf_pre_tokenizer(tok, path)
    folder = tmp_path_factory.mktemp("smollm2")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2_folder_4x(smollm2_folder, tmp_path_factory):
    """The same folder as transformers 4.x writes it from the GGUF (the file issue 24 reports): BPE with
    byte_fallback true under a plain ByteLevel pre-tokenizer (its GGUF reader knows no digit split)."""
    folder = tmp_path_factory.mktemp("smollm2-4x")
    for f in smollm2_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"].update(byte_fallback=True, fuse_unk=True)
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.mark.parametrize("folder, pre", [("smollm2_folder", "smollm"), ("smollm2_folder_4x", "gpt-2")])
def test_smollm2_folder_tokenizes_in_llama_cpp_like_transformers(folder, pre, request, tmp_path):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue(folder)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tj["model"]["merges"]) == 48900
    path = write(folder, tmp_path / "smollm2.gguf", 49152)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert llama_cpp_ids(path, [TEXT, UNSEEN]) == [hf_ids(tok, TEXT), hf_ids(tok, UNSEEN)]
    assert llama_cpp_ids(path, [CHAT], special=True) == [hf_ids(tok, CHAT)]  # control tokens parsed as such
    meta = parse_gguf(path).meta
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", pre)
    assert len(meta["tokenizer.ggml.merges"]) == 48900


# --- (b) tokenizers of each kind, trained here ---------------------------------------------------------

def corpus() -> list[str]:
    from conftest import wikitext_excerpt

    return wikitext_excerpt().splitlines()[:1000] + TEXT.splitlines() * 20


def wrap(tokenizer, **specials):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **specials)


def byte_level_bpe(pre_tokenizer, ignore_merges=False, normalizer=None):
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen2 shape) of ~600 tokens trained on wikitext and TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tj = json.loads(tok.to_str())
    tj["model"]["ignore_merges"] = ignore_merges  # Llama 3's tokenizer.json sets it; no trainer option does
    return wrap(Tokenizer.from_str(json.dumps(tj)), bos_token="<|im_start|>", eos_token="<|endoftext|>")


def split_then_bytes(regex):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2():
    from tokenizers import pre_tokenizers

    return byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))


def _smollm():
    from tokenizers import pre_tokenizers

    return byte_level_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)]))


def _qwen2():
    from tokenizers import normalizers

    return byte_level_bpe(split_then_bytes(SPLITS["qwen2"]), normalizer=normalizers.NFC())


BYTE_LEVEL = {
    "gpt-2": _gpt2,
    "smollm": _smollm,
    "llama-bpe": lambda: byte_level_bpe(split_then_bytes(SPLITS["llama-bpe"]), ignore_merges=True),
    "dbrx": lambda: byte_level_bpe(split_then_bytes(SPLITS["dbrx"])),  # Llama 3's split, merges always applied
    "qwen2": _qwen2,
    "qwen35": lambda: byte_level_bpe(split_then_bytes(SPLITS["qwen35"])),
}


@pytest.mark.parametrize("pre", sorted(BYTE_LEVEL))
def test_trained_byte_level_bpe_tokenizes_in_llama_cpp_like_transformers(pre, tmp_path):
    tok = BYTE_LEVEL[pre]()
    path = write(tok, tmp_path / f"{pre}.gguf", len(tok))
    assert llama_cpp_ids(path, [TEXT, UNSEEN]) == [hf_ids(tok, TEXT), hf_ids(tok, UNSEEN)]
    assert llama_cpp_ids(path, [CHAT], special=True) == [hf_ids(tok, CHAT)]
    meta = parse_gguf(path).meta
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", pre)


def sentencepiece_bpe(style: str):
    """A SentencePiece-style BPE with <0xNN> byte fallback: "llama2" ("▁" by Prepend + Replace normalizers,
    no pre-tokenizer) or "mistral" (a Metaspace pre-tokenizer that prepends "▁" to the first word)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def shaped(model):
        tok = Tokenizer(model)
        if style == "llama2":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        return tok

    trainer = shaped(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trainer.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, limit_alphabet=150,
                                                              show_progress=False))
    trained = json.loads(trainer.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = shaped(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def unigram():
    """A SentencePiece-style Unigram (T5 shape): Metaspace pre-tokenizer and decoder, no byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    return wrap(tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


SENTENCEPIECE = {"llama2": lambda: sentencepiece_bpe("llama2"), "mistral": lambda: sentencepiece_bpe("mistral"),
                 "unigram": unigram}


@pytest.mark.parametrize("style", sorted(SENTENCEPIECE))
def test_trained_sentencepiece_tokenizes_in_llama_cpp_like_transformers(style, tmp_path):
    tok = SENTENCEPIECE[style]()
    path = write(tok, tmp_path / f"{style}.gguf", len(tok))
    assert llama_cpp_ids(path, [TEXT, UNSEEN]) == [hf_ids(tok, TEXT), hf_ids(tok, UNSEEN)]
    assert parse_gguf(path).meta["tokenizer.ggml.model"] == ("t5" if style == "unigram" else "llama")


# --- the pre-tokenizer is recognised, or named in the error; the override ----------------------------

def test_unknown_pre_tokenizer_is_an_error_naming_it_and_the_override(tmp_path):
    tok = byte_level_bpe(split_then_bytes(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*pre-tokenizer .*Split.*\\\\p\{L\}\+.*"
                                         r"pre_tokenizer=.*--pre-tokenizer NAME"):
        write(tok, tmp_path / "x.gguf", len(tok))
    assert not list(tmp_path.iterdir())
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match=f"{folder / 'tokenizer.json'}: pre-tokenizer"):
        write(folder, tmp_path / "x.gguf", len(tok))
    # the override writes the name given (here one llama.cpp knows, though it splits differently)
    path = write(tok, tmp_path / "x.gguf", len(tok), pre_tokenizer="gpt-2")
    assert parse_gguf(path).meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(llama_cpp_ids(path, [TEXT])[0]) > 0


def test_override_is_checked(tmp_path):
    tok = _gpt2()
    with pytest.raises(ValueError, match="pre_tokenizer='Llama 3'"):
        write(tok, tmp_path / "x.gguf", len(tok), pre_tokenizer="Llama 3")
    with pytest.raises(ValueError, match="byte-level BPE only.*'llama'"):
        write(sentencepiece_bpe("llama2"), tmp_path / "x.gguf", 1000, pre_tokenizer="llama-bpe")
    with pytest.raises(ValueError, match="pre_tokenizer='gpt-2'.*format='lowbit'"):
        lowbit.save(tiny_llama(len(tok)), tmp_path / "x", format="lowbit", tokenizer=tok, pre_tokenizer="gpt-2")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("ignore_merges, pre", [(True, "llama-bpe"), (False, "dbrx")])
def test_ignore_merges_picks_the_name(ignore_merges, pre, tmp_path):
    """Llama 3's split with and without ignore_merges: "abc" is a token, but merging b+c first leaves
    a + bc, which no merge joins; only ignore_merges (llama.cpp's llama-bpe) takes the whole word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + ["bc", "ab", "abc"])}
    bpe = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=ignore_merges))
    bpe.pre_tokenizer = split_then_bytes(SPLITS["llama-bpe"])
    bpe.decoder = decoders.ByteLevel()
    tok = wrap(bpe)
    path = write(tok, tmp_path / "m.gguf", len(tok))
    assert hf_ids(tok, "abc") == ([vocab["abc"]] if ignore_merges else [vocab["a"], vocab["bc"]])
    assert llama_cpp_ids(path, ["abc"]) == [hf_ids(tok, "abc")]
    assert parse_gguf(path).meta["tokenizer.ggml.pre"] == pre


def test_cli_pre_tokenizer_override(tmp_path, capsys):
    """`lowbit quantize FOLDER --out x.gguf`: an unknown split is refused by name, --pre-tokenizer writes one."""
    from lowbit.cli import main

    tok = byte_level_bpe(split_then_bytes(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+"))
    folder = tmp_path / "hf"
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(folder), "--recipe", "f32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pre-tokenizer" in err and "--pre-tokenizer NAME" in err and not out.exists()
    assert main(["quantize", str(folder), "--recipe", "f32", "--out", str(out), "--pre-tokenizer", "gpt-2"]) == 0
    assert parse_gguf(out).meta["tokenizer.ggml.pre"] == "gpt-2"
    assert main(["quantize", str(folder), "--out", str(tmp_path / "q"), "--pre-tokenizer", "gpt-2"]) == 2
    assert "give an --out ending in .gguf" in capsys.readouterr().err
    assert main(["quantize", str(folder), "--recipe", "f32", "--out", str(tmp_path / "y.gguf"),
                 "--pre-tokenizer", "Llama 3"]) == 2
    assert "--pre-tokenizer='Llama 3'" in capsys.readouterr().err
