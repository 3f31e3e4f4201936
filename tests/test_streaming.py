"""Quantizing a sharded checkpoint a block at a time (io/streaming/): the same model as quantizing
in memory, byte-identical after kill -9 and a resume, clear errors that keep finished work."""
import errno
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
from lowbit.cli import main as cli
from lowbit import version
from lowbit.io.streaming import journal, parts
from lowbit.io.streaming.source import skeleton, source_tensors
from lowbit.io.streaming import quantize_checkpoint

SHARD = 60_000  # bytes: a handful of output shards for the tiny model


def tiny_llama(folder: Path, tied: bool = True, layers: int = 4, vocab: int = 384) -> Path:
    """A random Llama written as Hugging Face does: bf16, sharded, with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=layers, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, max_shard_size="150KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("tied,recipe", [(True, "w4g64"), (False, "w4g64"), (True, "w8"), (True, "nf4")])
def test_streamed_model_equals_quantizing_in_memory(tmp_path, tied, recipe):
    from transformers import LlamaForCausalLM

    src = tiny_llama(tmp_path / "src", tied)
    out = quantize_checkpoint(src, recipe, tmp_path / "out", shard_bytes=SHARD, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    streamed = lowbit.load(out)
    in_memory = lowbit.quantize(LlamaForCausalLM.from_pretrained(src, dtype=torch.float32), recipe, progress=False)
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, in_memory(x).logits)


def test_same_inputs_give_byte_identical_files(tmp_path):
    src = tiny_llama(tmp_path / "src")
    a = quantize_checkpoint(src, "w4g64", tmp_path / "a", shard_bytes=SHARD, progress=False)
    b = quantize_checkpoint(src, "w4g64", tmp_path / "b", shard_bytes=SHARD, progress=False)
    assert files(a) == files(b)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from lowbit.io.streaming import journal, quantize_checkpoint
    write, written = journal.write_shard, []
    def write_then_die(*args):
        write(*args)
        written.append(1)
        if len(written) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would: no cleanup runs
    journal.write_shard = write_then_die
    quantize_checkpoint(sys.argv[1], "w4g64", sys.argv[2], shard_bytes=60_000, progress=False)
""")


def test_kill_9_then_resume_gives_the_uninterrupted_bytes(tmp_path):
    src = tiny_llama(tmp_path / "src", layers=6)
    whole = quantize_checkpoint(src, "w4g64", tmp_path / "whole", shard_bytes=SHARD, progress=False)
    out = tmp_path / "out"
    (tmp_path / "killer.py").write_text(KILLER)
    repo = Path(__file__).resolve().parents[1]  # this checkout's lowbit, not another install's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(src), str(out), "2"],
                         cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    partial = tmp_path / ".out.partial"
    assert not out.exists() and not (partial / "lowbit.json").exists()  # nothing looks complete
    journal = json.loads((partial / "journal.json").read_text())
    assert len(journal["shards"]) == 2
    quantize_checkpoint(src, "w4g64", out, shard_bytes=SHARD, progress=False)
    assert files(out) == files(whole)
    assert not partial.exists()


def test_disk_full_names_the_file_and_keeps_the_finished_shards(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "src")
    whole = quantize_checkpoint(src, "w4g64", tmp_path / "whole", shard_bytes=SHARD, progress=False)
    import safetensors.torch

    save, calls = safetensors.torch.save_file, []

    def full_on_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_second)
    with pytest.raises(ValueError, match=r"no space left .*model-00002\.safetensors.*1 shards finished"):
        quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)
    partial = tmp_path / ".out.partial"
    assert (partial / "model-00001.safetensors").is_file() and not list(partial.glob("*.tmp"))
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    assert files(quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)) == files(whole)


def test_truncated_shard_and_mismatched_index_are_named(tmp_path):
    src = tiny_llama(tmp_path / "src")
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{index_file.name} does not match its shards: tensor '{key}'"):
        quantize_checkpoint(src, "w4g64", tmp_path / "out", progress=False)
    index["weight_map"][key] = shards[0]
    index_file.write_text(json.dumps(index))
    data = (src / shards[1]).read_bytes()
    (src / shards[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shards[1]} is unreadable or truncated"):
        quantize_checkpoint(src, "w4g64", tmp_path / "out", progress=False)


def test_calibrated_methods_are_refused_before_reading(tmp_path):
    src = tiny_llama(tmp_path / "src", layers=1)
    with pytest.raises(ValueError, match="data-free"):
        quantize_checkpoint(src, lowbit.pipeline.get_recipe("w4g64", "gptq"), tmp_path / "out", progress=False)


def test_cli_streams_a_hugging_face_folder(tmp_path, capsys):
    src = tiny_llama(tmp_path / "src", layers=2)
    cli(["quantize", str(src), "--recipe", "w4g64", "--method", "rtn", "--out", str(tmp_path / "out"),
         "--shard-size", "0.05"])
    assert "one block at a time" in capsys.readouterr().out
    assert lowbit.io.lowbit_format.weight_files(tmp_path / "out")[1:]  # more than one shard
    lowbit.load(tmp_path / "out")


@pytest.mark.parametrize("tied,recipe", [(True, "w4g64"), (False, "w4g64"), (False, "w8")])
def test_big_weights_read_a_block_of_rows_at_a_time_give_the_same_bytes(tmp_path, monkeypatch, tied, recipe):
    from lowbit.io.streaming.rows import StoredTensor

    src = tiny_llama(tmp_path / "src", tied, layers=2)
    whole = quantize_checkpoint(src, recipe, tmp_path / "whole", shard_bytes=SHARD, progress=False)
    read, reads = StoredTensor.read_rows, []

    def counted(self, a, b):
        reads.append((self.name, b - a))
        return read(self, a, b)

    monkeypatch.setattr(StoredTensor, "read_rows", counted)
    # 16 KiB: the 384 x 128 table (192 KiB in float32) in blocks of 32 rows, the 256 x 128 MLP weights too
    blocked = quantize_checkpoint(src, recipe, tmp_path / "blocked", shard_bytes=SHARD, block_bytes=16 << 10,
                                  progress=False)
    assert files(blocked) == files(whole)
    names = {n for n, _ in reads}
    assert "model.layers.1.mlp.down_proj.weight" in names and max(n for _, n in reads) == 32
    if recipe == "w8":  # no embeddings/output scheme: the table and head are loaded whole, kept in full precision
        assert not {"model.embed_tokens.weight", "lm_head.weight"} & names
    else:
        assert "model.embed_tokens.weight" in names and ("lm_head.weight" in names) != tied  # tied: read once


def test_a_shard_truncated_during_the_run_is_named_and_the_finished_shards_are_kept(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "src", layers=6)
    whole = quantize_checkpoint(src, "w4g64", tmp_path / "whole", shard_bytes=SHARD, progress=False)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    last = src / index["model.layers.5.mlp.down_proj.weight"]
    data, st = last.read_bytes(), last.stat()
    write, parts_quantized = journal.write_shard, []

    def write_then_truncate(*args):
        write(*args)
        last.write_bytes(data[: len(data) // 2])  # the file goes bad under the running job
    monkeypatch.setattr(journal, "write_shard", write_then_truncate)
    with pytest.raises(ValueError, match=rf"{last.name} is unreadable or truncated \(reading part model.layers.5\).*\n\(the 5 output shards finished "
                                         r"are kept in .*\.out\.partial"):
        quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)
    monkeypatch.setattr(journal, "write_shard", write)
    last.write_bytes(data)
    os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same file again: the journal matches
    quantize_part = parts.quantize_part
    monkeypatch.setattr(parts, "quantize_part", lambda m, r, part, *a: parts_quantized.append(part.name)
                        or quantize_part(m, r, part, *a))
    assert files(quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)) == files(whole)
    assert "embeddings" not in parts_quantized and "model.layers.5" in parts_quantized  # resumed after shard 1


def _crafted_journal(src: Path, partial: Path, **fields) -> list[str]:
    """A journal.json that matches src's inputs (so that a run would resume it), with `fields`."""
    names = [p.name for p in parts.model_parts(skeleton(src))]
    digest = journal.digest(src, source_tensors(src), lowbit.pipeline.get_recipe("w4g64"), SHARD)
    partial.mkdir()
    (partial / "journal.json").write_text(json.dumps({"digest": digest, "shards": [], "modules": {}, **fields}))
    return names


@pytest.mark.parametrize("escape", ["../victim.safetensors", "ABSOLUTE"])
def test_journal_shard_names_never_leave_the_partial_folder(tmp_path, escape):
    """A journal naming a file outside .partial (absolute or ..) was resumed, and _finish moved that
    file into the output; now the journal is refused and the job starts again."""
    src = tiny_llama(tmp_path / "src", layers=2)
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    name = str(victim) if escape == "ABSOLUTE" else escape
    parts = _crafted_journal(src, tmp_path / ".out.partial")
    journal = json.loads((tmp_path / ".out.partial" / "journal.json").read_text())
    journal["shards"] = [{"file": name, "parts": parts, "tensors": []}]
    (tmp_path / ".out.partial" / "journal.json").write_text(json.dumps(journal))
    with pytest.warns(UserWarning, match=r"cannot be resumed: .*shards\[0\]\.file is .*not a plain name inside"):
        out = quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)
    assert victim.read_bytes() == b"precious"
    assert files(out) == files(quantize_checkpoint(src, "w4g64", tmp_path / "again", shard_bytes=SHARD,
                                                   progress=False))


def test_journal_inputs_folder_never_leaves_the_partial_folder(tmp_path):
    """inputs.folder is deleted once the blocks are done: a journal naming another folder is refused."""
    src = tiny_llama(tmp_path / "src", layers=2)
    (tmp_path / "precious").mkdir()
    _crafted_journal(src, tmp_path / ".out.partial",
                     inputs={"block": 1, "folder": str(tmp_path / "precious"), "batches": 1})
    digest = json.loads((tmp_path / ".out.partial" / "journal.json").read_text())["digest"]
    with pytest.warns(UserWarning, match=r"inputs\.folder is .*precious'?, which is not a plain name inside"):
        j = journal.open_journal(tmp_path / ".out.partial", digest)
    assert j.inputs is None and j.shards == [] and (tmp_path / "precious").is_dir()


def test_resume_by_another_lowbit_version_starts_again_and_says_why(tmp_path, monkeypatch):
    """The digest covers lowbit's version: shards from two versions' quantizers are never mixed."""
    src = tiny_llama(tmp_path / "src", layers=2)
    whole = quantize_checkpoint(src, "w4g64", tmp_path / "whole", shard_bytes=SHARD, progress=False)
    write = journal.write_shard

    def write_one_then_stop(*args):
        write(*args)
        raise RuntimeError("stopped after one shard")
    monkeypatch.setattr(journal, "write_shard", write_one_then_stop)
    with pytest.raises(RuntimeError, match="stopped"):
        quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)
    monkeypatch.setattr(journal, "write_shard", write)
    monkeypatch.setattr(version, "__version__", "9.9.9")
    with pytest.warns(UserWarning, match=rf"started by lowbit {lowbit.__version__}, this is lowbit 9\.9\.9"):
        out = quantize_checkpoint(src, "w4g64", tmp_path / "out", shard_bytes=SHARD, progress=False)
    assert files(out) == files(whole)
