"""The folder of built kernels (`ops/kernel_cache.py`): who may write it, and which libraries in it are loaded.

These tests reuse the library this process has built (or found) instead of compiling again: they copy it
into a temporary cache, and stand-ins for the compiler calls write that copy where a rebuild would."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import windowed_attention
from windowed_attention.ops import fused_cpu, kernel_cache

ROOT = Path(windowed_attention.__file__).resolve().parent.parent  # subprocesses run the code under test


@pytest.fixture
def built():
    """The library this process loaded (built once per cache, then reused)."""
    assert fused_cpu.available(), fused_cpu._state.get("error")
    return fused_cpu._state["library"]


def _cache_with(folder, built, data=None, record=None):
    """`folder` holding a copy of `built` (its bytes, or `data`) and a record of it (or the text `record`)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    library = folder / built.name
    library.write_bytes(built.read_bytes() if data is None else data)
    kernel_cache.record_path(library).write_text(kernel_cache.record(library.read_bytes()) if record is None else record)
    return library


def _fresh_build(monkeypatch, cache):
    """What a fresh process does to get the kernel from `cache` (None: the default folder): `(library path,
    whether it was rebuilt)`. The loading itself is left out (this process has the kernel loaded already: a
    second copy would clash)."""
    monkeypatch.setattr(fused_cpu, "_state", {})
    if cache is None:
        monkeypatch.delenv(kernel_cache.CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    fused_cpu.kernel()
    return fused_cpu._state["library"], "build_seconds" in fused_cpu._state


def _copy_instead_of_compiling(monkeypatch, built):
    """Stand-ins for the compiler calls: the compiles do nothing, the link writes the library we already built."""

    class Compile:
        returncode = 0

        def __init__(self, command, **kwargs):
            pass

        def communicate(self):
            return "", ""

    def link(command, **kwargs):
        shutil.copy(built, command[command.index("-o") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fused_cpu.subprocess, "Popen", Compile)
    monkeypatch.setattr(fused_cpu.subprocess, "run", link)


def test_kernel_cache_is_created_private_and_verified(monkeypatch, tmp_path, built):
    """A named cache folder that does not exist is created 0700; a library is loaded only when its hash
    matches the one recorded at build time, so a damaged (or swapped) library is rebuilt."""
    cache = tmp_path / "cache"
    _cache_with(cache, built)
    library, rebuilt = _fresh_build(monkeypatch, cache)
    assert library == cache / built.name and not rebuilt  # verified copy: loaded as it is
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700

    with open(library, "r+b") as f:  # damage it
        f.seek(4096)
        f.write(b"\0" * 64)
    _copy_instead_of_compiling(monkeypatch, built)
    library, rebuilt = _fresh_build(monkeypatch, cache)
    assert rebuilt and library.read_bytes() == built.read_bytes()

    kernel_cache.record_path(library).unlink()  # no record: not ours, rebuilt
    _, rebuilt = _fresh_build(monkeypatch, cache)
    assert rebuilt

    nested = tmp_path / "new" / "cache"
    _fresh_build(monkeypatch, nested)
    assert stat.S_IMODE(nested.stat().st_mode) == 0o700


def test_a_folder_the_user_names_keeps_its_mode(monkeypatch, tmp_path, built):
    """`$WINDOWED_ATTENTION_CACHE` naming a folder of the user's that others can read but not write: the
    library in it is loaded and the folder keeps its mode (it used to be made 0700)."""
    cache = tmp_path / "cache"
    _cache_with(cache, built)
    cache.chmod(0o755)
    library, rebuilt = _fresh_build(monkeypatch, cache)
    assert library == cache / built.name and not rebuilt
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_folder_the_user_names_that_others_can_write_is_refused(monkeypatch, tmp_path, built, mode):
    """Refused with the folder and the fix, and left as it is; `auto` falls back (tested in test_dispatch)."""
    cache = tmp_path / "cache"
    _cache_with(cache, built)
    cache.chmod(mode)
    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    reason = fused_cpu.unavailable_reason()
    assert f"kernel cache {cache} ($WINDOWED_ATTENTION_CACHE) is writable by other users" in reason
    assert f"chmod go-w {cache}" in reason
    assert stat.S_IMODE(cache.stat().st_mode) == mode


def test_the_default_folder_is_created_private_and_made_private(monkeypatch, tmp_path, built):
    """The library's own folder (`$XDG_CACHE_HOME/windowed_attention` here) is ours: created 0700, made 0700
    when it is not, and refused when others can write it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "windowed_attention"
    _copy_instead_of_compiling(monkeypatch, built)
    library, rebuilt = _fresh_build(monkeypatch, None)
    assert library.parent == default and rebuilt
    assert stat.S_IMODE(default.stat().st_mode) == 0o700
    default.chmod(0o755)
    _, rebuilt = _fresh_build(monkeypatch, None)
    assert not rebuilt and stat.S_IMODE(default.stat().st_mode) == 0o700
    default.chmod(0o777)
    monkeypatch.setattr(fused_cpu, "_state", {})
    assert f"kernel cache {default} is writable by other users; make it private (chmod 700)" in (
        fused_cpu.unavailable_reason())


def test_a_library_is_checked_against_its_record_and_its_own_layout(tmp_path, built):
    """Before a library is loaded: its size and hash must be the recorded ones (a record without the size,
    as `sha256sum` writes, does not count), and its ELF tables and loadable segments must lie inside the
    file, which catches a cut library even when its record was regenerated to match it."""
    whole = built.read_bytes()
    assert kernel_cache.flaw(_cache_with(tmp_path / "whole", built)) is None
    assert kernel_cache.flaw(tmp_path / "whole" / "missing.so") == kernel_cache.MISSING

    cut = whole[: len(whole) // 2]
    recorded_size = kernel_cache.record(cut).split()[0] + f" {len(whole)}\n"  # the hash redone, the size not
    assert "bytes" in kernel_cache.flaw(_cache_with(tmp_path / "size", built, cut, recorded_size))
    hash_only = kernel_cache.record(cut).split()[0] + f"  {built.name}\n"
    assert "record" in kernel_cache.flaw(_cache_with(tmp_path / "sha256sum", built, cut, hash_only))

    for end in (10, 100, 4096, len(whole) // 2, len(whole) - 1):  # each with a record that matches it
        reason = kernel_cache.flaw(_cache_with(tmp_path / f"cut{end}", built, whole[:end]))
        assert reason is not None and ("cut short" in reason or "not an ELF" in reason), (end, reason)


_FRESH_PROCESS = """
import shutil, subprocess, sys, warnings
import torch
from windowed_attention import local_attention
from windowed_attention.ops import fused_cpu

built, compiles = sys.argv[1], sys.argv[2] == "compiles"

class Compile:  # stand-in compiler: compiles nothing; fails unless `compiles`
    def __init__(self, command, **kwargs):
        self.returncode = 0 if compiles else 1

    def communicate(self):
        return "", ("" if compiles else "stand-in compiler: no compiler here")

def link(command, **kwargs):  # writes the library built already
    shutil.copy(built, command[command.index("-o") + 1])
    return subprocess.CompletedProcess(command, 0, "", "")

subprocess.Popen, subprocess.run = Compile, link
q = torch.randn(1, 16, 8)
reference = local_attention(q, q, q, window_size=4, backend="reference")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [local_attention(q, q, q, window_size=4) for _ in range(2)]
print("auto", all(torch.allclose(out, reference, atol=1e-5) for out in outs))
print("warnings", sum("fused CPU kernel is unavailable" in str(w.message) for w in caught))
print("rebuilt", "build_seconds" in fused_cpu._state)
try:
    print("fused", torch.allclose(local_attention(q, q, q, window_size=4, backend="fused"), reference, atol=1e-5))
except ValueError as exc:
    print("refused", exc)
"""


@pytest.mark.parametrize("compiles", [True, False], ids=["rebuilt", "no-compiler"])
def test_a_cut_library_whose_record_matches_is_never_loaded(tmp_path, built, compiles):
    """A library cut short with a record regenerated to match it (by hand, or by a sync tool that cut both)
    used to kill the process that loaded it with SIGBUS. In a fresh process now it is rebuilt and the kernel
    runs; where it cannot be rebuilt, `auto` falls back with one warning and `backend="fused"` raises naming
    the library in its cache folder."""
    cache = tmp_path / "cache"
    whole = built.read_bytes()
    library = _cache_with(cache, built, whole[: len(whole) // 2])
    env = {**os.environ, kernel_cache.CACHE_ENV: str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(built), "compiles" if compiles else "fails"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # a signal: negative
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert f"not loading {library}" in done.stderr
    assert lines["auto"] == "True"
    if compiles:
        assert lines["warnings"] == "0" and lines["rebuilt"] == "True" and lines["fused"] == "True"
        assert library.read_bytes() == whole
    else:
        assert lines["warnings"] == "1" and lines["rebuilt"] == "False"
        assert str(cache) in lines["refused"] and "no compiler here" in lines["refused"]
