"""Atomic checkpoint writes (lowbit/io/atomic.py): fsync before the rename, a crash between the
two renames recovered on the next load or save, permissions from the umask."""
import os
import stat
import subprocess
import sys

import pytest
import torch

import lowbit.io.atomic as atomic
from lowbit.io.lowbit_format import load_lowbit, save_lowbit
from lowbit.pipeline import quantize

from test_pipeline import Toy


def toy(recipe: str):
    torch.manual_seed(0)
    return quantize(Toy().eval(), recipe, progress=False)


class Crash(BaseException):
    """The process dying: nothing after it runs, not even a rollback rename."""


def crash_at_second_rename(monkeypatch):
    calls, real = [], os.rename

    def rename(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) >= 2:
            raise Crash
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_a_crash_between_the_renames_is_recovered_by_the_next_load(tmp_path, monkeypatch):
    save_lowbit(toy("w8"), tmp_path / "q")
    calls = crash_at_second_rename(monkeypatch)
    with pytest.raises(Crash):
        save_lowbit(toy("w4g64"), tmp_path / "q")
    monkeypatch.undo()
    assert len(calls) >= 2 and calls[0][0] == str(tmp_path / "q")  # the old one went aside first
    assert not (tmp_path / "q").exists()  # the state a real crash leaves: target gone, old aside
    aside = [p.name for p in tmp_path.iterdir()]
    assert aside == [f".q.old-{os.getpid()}"]
    back = load_lowbit(tmp_path / "q", model=Toy())  # puts the previous checkpoint back
    assert back.lowbit_recipe.name == "w8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_crash_between_the_renames_is_recovered_by_the_next_save(tmp_path, monkeypatch):
    save_lowbit(toy("w8"), tmp_path / "q")
    crash_at_second_rename(monkeypatch)
    with pytest.raises(Crash):
        save_lowbit(toy("w4g64"), tmp_path / "q")
    monkeypatch.undo()
    save_lowbit(toy("nf4"), tmp_path / "q")
    assert load_lowbit(tmp_path / "q", model=Toy()).lowbit_recipe.name == "nf4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_failed_second_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    save_lowbit(toy("w8"), tmp_path / "q")
    n, real = [0], os.rename

    def rename(src, dst):
        n[0] += 1
        if n[0] == 2:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        save_lowbit(toy("w4g64"), tmp_path / "q")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert load_lowbit(tmp_path / "q", model=Toy()).lowbit_recipe.name == "w8"


def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    save_lowbit(toy("w8"), tmp_path / "q")
    first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    tmp = events[first_rename][1]
    synced = {p for kind, p in events[:first_rename] if kind == "fsync"}
    assert {f"{tmp}/model.safetensors", f"{tmp}/lowbit.json", tmp} <= synced
    assert ("fsync", str(tmp_path)) in events[first_rename:]  # the rename itself made durable


@pytest.mark.parametrize("mask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_permissions_follow_the_umask(tmp_path, mask, folder, file):
    old = os.umask(mask)
    try:
        save_lowbit(toy("w8"), tmp_path / "q")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == folder
    for p in (tmp_path / "q").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == file, p.name


def test_leftovers_of_dead_saves_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f".q.tmp-{dead}-abc", f".q.old-{dead}", f".q.tmp-{os.getpid()}-live", ".other.tmp-1-x"):
        (tmp_path / name).mkdir()
    save_lowbit(toy("w8"), tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1-x", f".q.tmp-{os.getpid()}-live", "q"]


def test_recover_ignores_an_incomplete_set_aside_folder(tmp_path):
    (tmp_path / ".q.old-1").mkdir()  # no lowbit.json: not a whole checkpoint
    assert not atomic.recover(tmp_path / "q", lambda p: (p / "lowbit.json").is_file())
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        load_lowbit(tmp_path / "q", model=Toy())
