"""GPTQ over a sharded checkpoint a block at a time (io/streaming/calibrated.py): the same QTensors
as lowbit.quantize in memory, one block's weights loaded at a time, activations spilled to disk
past a limit with the same result, and a killed run resumed to the same bytes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.io.streaming import journal, parts
from lowbit.io.streaming import quantize_checkpoint
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.pipeline import get_recipe

from test_rowwise import same
from test_streaming import SHARD, files, tiny_llama

GPTQ = get_recipe("w4g64", "gptq")


def calibration(n: int = 4, seq: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 384, (1, seq), generator=g) for _ in range(n)]


def qtensors(model) -> dict:
    return {n: m.qweight for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def run(src, out, **kw):
    kw = {"shard_bytes": SHARD, "calibration_dtype": "fp32", "batch_size": 2, "progress": False, **kw}
    return quantize_checkpoint(src, GPTQ, out, calibration=calibration(), **kw)


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_gptq_equals_gptq_in_memory(tmp_path, monkeypatch, tied):
    from transformers import LlamaForCausalLM

    src = tiny_llama(tmp_path / "src", tied, layers=3)
    loaded = []  # blocks holding real weights whenever a part is written
    add = journal.Output.add

    def add_and_count(self, model, part):
        loaded.append(sum(any(not p.is_meta for p in b.parameters()) for b in model.model.layers))
        add(self, model, part)
    monkeypatch.setattr(journal.Output, "add", add_and_count)
    out = run(src, tmp_path / "out", block_bytes=16 << 10)  # the 384 x 128 table read 32 rows at a time
    assert max(loaded) == 1  # one block in memory at a time
    streamed = lowbit.load(out)
    in_memory = lowbit.quantize(LlamaForCausalLM.from_pretrained(src, dtype=torch.float32), GPTQ,
                                calibration=calibration(), calibration_dtype="fp32", batch_size=2, progress=False)
    a, b = qtensors(streamed), qtensors(in_memory)
    assert a.keys() == b.keys() and len(a) == 3 * 7 + 2  # the blocks, the table and the head (tied or not)
    for name in a:
        same(a[name], b[name])
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, in_memory(x).logits)
    # GPTQ, not round to nearest: the blocks' codes differ from rtn's
    rtn = lowbit.load(quantize_checkpoint(src, "w4g64", tmp_path / "rtn", progress=False))
    assert not torch.equal(qtensors(rtn)["model.layers.1.mlp.up_proj"].codes, a["model.layers.1.mlp.up_proj"].codes)


def test_spilled_activations_give_the_same_bytes_and_say_so(tmp_path, capsys, monkeypatch):
    src = tiny_llama(tmp_path / "src", layers=2)
    held = run(src, tmp_path / "held")
    spill = tmp_path / ".spilled.partial" / "activations"
    written = []
    import safetensors.torch as st
    real = st.save_file

    def watch(tensors, path, *a, **k):
        written.append(Path(path))
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(st, "save_file", watch)
    spilled = run(src, tmp_path / "spilled", activation_bytes=2 * 24 * 128 * 4)
    # 4 windows in 2 batches of [2, 24, 128] float32: one fits, the other is spilled at each of the 2
    # boundaries (block 0's inputs, block 1's; the last block's outputs feed nothing and are not computed)
    assert files(spilled) == files(held)
    assert "spilling block inputs/outputs to" in capsys.readouterr().err
    assert sum(p.parent == spill for p in written) == 2
    assert not spill.exists() and not (spilled / "activations").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from lowbit.io.streaming import journal, quantize_checkpoint
    from lowbit.pipeline import get_recipe
    write, written = journal.write_shard, []
    def write_then_die(*args):
        write(*args)
        written.append(1)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    journal.write_shard = write_then_die
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 384, (1, 24), generator=g) for _ in range(4)]
    quantize_checkpoint(sys.argv[1], get_recipe("w4g64", "gptq"), sys.argv[2], calibration=calib,
                        shard_bytes=60_000, calibration_dtype="fp32", batch_size=2, progress=False)
""")


def test_killed_gptq_run_resumes_to_the_same_bytes(tmp_path):
    src = tiny_llama(tmp_path / "src", layers=4)
    whole = run(src, tmp_path / "whole")
    (tmp_path / "killer.py").write_text(KILLER)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(src), str(tmp_path / "out")],
                          cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    journal = json.loads((tmp_path / ".out.partial" / "journal.json").read_text())
    assert len(journal["shards"]) == 2 and not (tmp_path / "out").exists()
    # killed writing block 1's shard: the inputs saved are block 1's (after the first shard)
    assert journal["inputs"]["block"] == 1 and (tmp_path / ".out.partial" / journal["inputs"]["folder"]).is_dir()
    assert files(run(src, tmp_path / "out")) == files(whole)


@pytest.mark.parametrize("spilled", [False, True])
def test_resumed_gptq_run_starts_at_the_first_unfinished_block(tmp_path, monkeypatch, spilled):
    """Interrupted (Ctrl-C) as block 2 starts: the resumed run loads and solves blocks 2 and 3 only."""
    from lowbit.pipeline import sequential

    src = tiny_llama(tmp_path / "src", layers=4)
    kw = {"shard_bytes": 1, "activation_bytes": 2 * 24 * 128 * 4 if spilled else 4 << 30}  # a shard per part
    whole = run(src, tmp_path / "whole", **kw)
    solved, loaded = [], []
    one_block, materialize = sequential._one_block, parts.materialize

    def solve(i, *args, **kwargs):
        if i == 2 and interrupt:
            raise KeyboardInterrupt
        solved.append(i)
        return one_block(i, *args, **kwargs)

    def load(model, part, *args, **kwargs):
        loaded.append(part.name)
        return materialize(model, part, *args, **kwargs)
    monkeypatch.setattr(sequential, "_one_block", solve)
    monkeypatch.setattr(parts, "materialize", load)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", **kw)
    journal = json.loads((tmp_path / ".out.partial" / "journal.json").read_text())
    assert journal["inputs"]["block"] == 2 and {"embeddings", "model.layers.0", "model.layers.1"} == {
        p for s in journal["shards"] for p in s["parts"]}
    assert solved == [0, 1]
    interrupt, solved[:], loaded[:] = False, [], []
    assert files(run(src, tmp_path / "out", **kw)) == files(whole)
    assert solved == [2, 3]
    assert not {"model.layers.0", "model.layers.1"} & set(loaded)
    assert not (tmp_path / "out" / journal["inputs"]["folder"]).exists()


def test_saved_block_inputs_come_back_bit_for_bit_and_are_checked(tmp_path):
    from lowbit.io.streaming import block_inputs
    from lowbit.pipeline.blocks import BlockInput

    g = torch.Generator().manual_seed(3)
    cos = torch.randn(1, 24, 32, generator=g)
    inputs = [BlockInput(torch.randn(2, 24, 128, generator=g).to(torch.bfloat16),
                         {"position_embeddings": (cos, cos[..., :16]), "attention_mask": None, "flag": True,
                          "position_ids": torch.arange(24)[None], "scale": 0.5})]
    block_inputs.save(tmp_path / "b", inputs, digest="abc", block=3)
    assert block_inputs.batches(tmp_path / "b", digest="abc", block=3) == 1
    back = []
    block_inputs.load(tmp_path / "b", back, 1)
    (a,), (b,) = inputs, back
    assert a.hidden.dtype == b.hidden.dtype and torch.equal(a.hidden, b.hidden)
    assert b.kwargs.keys() == a.kwargs.keys() and type(b.kwargs["position_embeddings"]) is tuple
    assert all(torch.equal(x, y) for x, y in zip(a.kwargs["position_embeddings"], b.kwargs["position_embeddings"]))
    assert torch.equal(b.kwargs["position_ids"], a.kwargs["position_ids"])
    assert (b.kwargs["attention_mask"], b.kwargs["flag"], b.kwargs["scale"]) == (None, True, 0.5)
    with pytest.raises(ValueError, match="another job or block"):
        block_inputs.batches(tmp_path / "b", digest="abc", block=4)
    (tmp_path / "b" / "00000.safetensors").write_bytes(b"12")
    with pytest.raises(ValueError, match="truncated"):
        block_inputs.batches(tmp_path / "b", digest="abc", block=3)
    with pytest.raises(block_inputs.NotSaved, match="argument kw.cache is a object"):
        block_inputs.save(tmp_path / "c", [BlockInput(a.hidden, {"cache": object()})], digest="abc", block=1)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.tmp").exists()


def test_calibrated_recipes_need_calibration_and_static_activations_are_refused(tmp_path):
    src = tiny_llama(tmp_path / "src", layers=1)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_checkpoint(src, GPTQ, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="static activation ranges"):
        quantize_checkpoint(src, "w8a8-static", tmp_path / "out", calibration=calibration(), progress=False)


def byte_level_bpe(text: str, vocab: int):
    """A byte-level BPE tokenizer of `vocab` tokens trained on `text` (the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t)


def test_cli_streams_gptq_with_calibration_windows_of_the_text(tmp_path, capsys):
    from conftest import wikitext_excerpt
    from lowbit.cli import main as cli
    from lowbit.cli.common import calibration_split
    from lowbit.eval import token_ids
    from lowbit.io import load_model

    src = tiny_llama(tmp_path / "src", layers=2)
    byte_level_bpe(wikitext_excerpt(), 384).save_pretrained(src)
    (tmp_path / "text.txt").write_text(wikitext_excerpt())
    cli(["quantize", str(src), "--method", "gptq", "--out", str(tmp_path / "out"), "--text", str(tmp_path / "text.txt"),
         "--window", "64", "--calibration-windows", "4", "--calibration-dtype", "fp32", "--activation-memory", "0.05"])
    said = capsys.readouterr()
    assert "one block at a time (gptq: calibrated)" in said.out and "spilling" in said.err
    meta = json.loads((tmp_path / "out" / "lowbit.json").read_text())
    assert meta["calibration_text"]["windows"] == 4 and meta["recipe"]["method"] == "gptq"
    fp32, tok2 = load_model(src)
    calib = calibration_split(token_ids(tok2, wikitext_excerpt()), 64, 4)[0]
    in_memory = lowbit.quantize(fp32, "w4g64", calibration=calib, method="gptq", calibration_dtype="fp32", progress=False)
    streamed = qtensors(lowbit.load(tmp_path / "out"))
    for name, q in qtensors(in_memory).items():
        same(streamed[name], q)
