"""Loading real models offline, and the evaluation texts."""
import copy
import os

import pytest
import torch

from conftest import wikitext_excerpt
from lowbit.io import default_text, load_model, wikitext2
from lowbit.io import models as io_models

# BOS + SmolLM2 tokens of tests/data's test.txt excerpt read as is and tokenized once; the whole
# test.txt gives 312,145 (the reference protocol in docs/benchmarks.md).
WIKITEXT_EXCERPT_TOKENS = 22_788


@pytest.fixture(scope="module")
def smollm2(smollm2_full):
    return smollm2_full


def test_smollm2_loads_as_fp32_causal_lm(smollm2):
    model, tok = smollm2
    assert model.dtype == torch.float32 and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "The capital of France is"


def test_gguf_tokenizer_isolates_numbers_like_llama_cpp(smollm2):
    # tokenizer.ggml.pre = "smollm": every \p{N} character is its own piece before BPE, so " ½" is
    # " " + "½" (SmolLM2's tokenizer.json: Digits(individual_digits=True)), not " Â" + "½".
    _, tok = smollm2
    assert tok.convert_ids_to_tokens(tok(" 4 ½ months")["input_ids"]) == ["Ġ", "4", "Ġ", "Â½", "Ġmonths"]
    assert tok.convert_ids_to_tokens(tok("2000")["input_ids"]) == ["2", "0", "0", "0"]


def test_wikitext2_token_count_is_the_reference_protocols(smollm2):
    # The trap: a slow LlamaTokenizer built from a saved folder splits this text differently
    # (344,186 tokens instead of 312,145 on the whole test.txt).
    _, tok = smollm2
    text = wikitext_excerpt("test")
    assert text.startswith(" \n = Robert <unk> = \n") and len(text.encode()) == 87_660
    from lowbit.eval import token_ids
    ids = token_ids(tok, text)
    assert len(ids) == WIKITEXT_EXCERPT_TOKENS and ids[0] == tok.bos_token_id == 1
    assert len(token_ids(tok, text, bos=False)) == WIKITEXT_EXCERPT_TOKENS - 1


def test_default_text_is_long_prose_without_shared(smollm2, monkeypatch, tmp_path):
    monkeypatch.setattr(io_models, "WIKITEXT2", tmp_path / "absent")
    text = default_text()
    _, tok = smollm2
    assert len(tok(text)["input_ids"]) > 50_000
    assert "::=" not in text and "*****" not in text and ">>>" not in text
    assert all(len(p.split()) >= 8 for p in text.split("\n\n"))


def test_wikitext2_errors_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(io_models, "WIKITEXT2", tmp_path / "absent")
    with pytest.raises(ValueError, match="absent.*test.txt is missing"):
        wikitext2("test")
    with pytest.raises(ValueError, match="split must be"):
        wikitext2("train")


def test_load_model_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in model"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="not supported"):
        load_model((tmp_path / "weights.bin").write_bytes(b"x") and tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="bad.gguf"):
        load_model(tmp_path / "bad.gguf")


@pytest.mark.parametrize("config, match", [
    ("not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json holds a JSON list, not an object"),
    ("{}", "config.json has no 'model_type'"),
    ('{"model_type": 3}', "config.json has no 'model_type'"),
    ('{"model_type": "llama", "architectures": "LlamaForCausalLM"}', "'architectures' must be a list"),
    ('{"model_type": "llama"}', "has no tokenizer files"),  # transformers would blame its tokenizer backend
])
def test_load_model_says_what_is_wrong_with_the_folder(tmp_path, config, match, capsys):
    from lowbit.cli import main

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and str(tmp_path) in err and err.count("\n") == 1


@pytest.mark.parametrize("before", [None, "0"])
def test_hub_offline_is_set_only_during_the_call(monkeypatch, tmp_path, before):
    seen = []
    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    monkeypatch.setattr(io_models, "_load_hf_dir", lambda path, dtype: seen.append(os.environ["HF_HUB_OFFLINE"]))
    load_model(tmp_path)
    assert seen == ["1"] and os.environ.get("HF_HUB_OFFLINE") == before
    with pytest.raises(ValueError, match="neither a built-in model"):  # restored after an error too
        load_model(tmp_path / "nope")
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_minilm_loads_as_encoder():
    model, tok = load_model("minilm-l6")
    enc = tok(["a sentence", "another one here"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (2, enc["input_ids"].shape[1], 384) and hidden.dtype == torch.float32


def test_saved_folder_tokenizer_splits_like_the_gguf(smollm2, tmp_path, monkeypatch):
    import transformers
    from tokenizers import pre_tokenizers

    from lowbit.io.models import PROBE, load_tokenizer

    _, tok = smollm2
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)(PROBE)["input_ids"] == tok(PROBE)["input_ids"]
    # The trap: AutoTokenizer hands back a tokenizer that splits differently from tokenizer.json
    # (transformers 5.x gave a slow LlamaTokenizer). Simulated by plain GPT-2 splitting: " Â" + "½".
    wrong = copy.deepcopy(tok)
    wrong.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert wrong(PROBE)["input_ids"] != tok(PROBE)["input_ids"]
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: wrong)
    assert load_tokenizer(tmp_path)(PROBE)["input_ids"] == tok(PROBE)["input_ids"]


@pytest.mark.parametrize("sharded", [False, True])
def test_a_config_without_architectures_loads_as_causal_lm_when_its_weights_have_the_head(tmp_path, sharded):
    """A hand-written config.json without `architectures` (bench/streaming.py's first 8B checkpoint): the
    LM head in the weights (one file, or a sharded index) makes it a causal LM, not a headless AutoModel
    whose GGUF writer then fails on its names; without a head it stays AutoModel."""
    import json

    import transformers as tf

    from conftest import tiny_transformer

    model = tiny_transformer("qwen2", 1)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "10GB")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer())
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    got, _ = load_model(tmp_path)
    assert type(got).__name__ == "Qwen2ForCausalLM" and torch.equal(got.lm_head.weight, model.lm_head.weight)
    headless = tmp_path / "headless"
    model.model.save_pretrained(headless)
    tok.save_pretrained(headless)
    config = json.loads((headless / "config.json").read_text())
    config.pop("architectures", None)
    (headless / "config.json").write_text(json.dumps(config))
    assert type(load_model(headless)[0]).__name__ == "Qwen2Model"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
