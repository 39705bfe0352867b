"""The folder of built kernel libraries (`ops/fused_cpu.py` builds into it): where it is, whether this
process may use it, and whether a library in it is whole enough to load.

A library loaded from the folder runs as our code, so the folder must belong to the user and be writable by
no one else. The default one (`~/.cache/windowed_attention`) is ours to manage: created 0700, and made 0700
when it is not. A folder the user names (`$WINDOWED_ATTENTION_CACHE`) is used as it is and its mode never
changed; one that others can write is refused, naming the folder and the fix (created 0700 only when it does
not exist yet).

Beside each library the build writes a record of its SHA-256 and size. Before loading, `flaw` checks what
can be checked in this process without running the library: the record, and the layout of the ELF file (its
header tables, and the file bytes of every segment the loader maps, lie inside the file). A library cut
short is mapped all the same, and touching the missing pages kills the process with SIGBUS, with no Python
error to catch; a record regenerated for the cut file (by hand, or by a sync tool that cut both) would let
it through the hash check alone.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
from pathlib import Path

CACHE_ENV = "WINDOWED_ATTENTION_CACHE"
RECORD_FORMAT = "sha256 size"  # part of a library's name, so versions that record differently never share a file
MISSING = "not built yet"
_ELF_PLATFORM = not sys.platform.startswith(("darwin", "win", "cygwin"))  # where the build writes ELF files


def cache_dir() -> Path:
    """Where built libraries live: `$WINDOWED_ATTENTION_CACHE`, else `$XDG_CACHE_HOME/windowed_attention`,
    else `~/.cache/windowed_attention`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "windowed_attention"
    )
    return Path(root)


def open_cache() -> Path:
    """`cache_dir()`, ready to build into and load from; OSError naming the folder and the fix when it belongs
    to another user or others can write it."""
    folder = cache_dir()
    named = bool(os.environ.get(CACHE_ENV))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise OSError(f"kernel cache {folder} belongs to another user; set ${CACHE_ENV} to a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if named:
            raise OSError(f"kernel cache {folder} (${CACHE_ENV}) is writable by other users, who could put code in "
                          f"it that this process would run; make it writable only by you (chmod go-w {folder}) "
                          f"or set ${CACHE_ENV} to a folder that is")
        raise OSError(f"kernel cache {folder} is writable by other users; make it private (chmod 700) "
                      f"or set ${CACHE_ENV}")
    if not named and stat.S_IMODE(info.st_mode) != 0o700:
        folder.chmod(0o700)
    return folder


def record_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def record(data: bytes) -> str:
    """The record the build writes beside a library of bytes `data`: its SHA-256 and its size."""
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def flaw(library: Path) -> str | None:
    """Why `library` must not be loaded (`MISSING` when there is none), or None when it may: its size and
    SHA-256 must equal the ones recorded at build time, and its ELF layout must lie inside the file."""
    try:
        data = library.read_bytes()
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"unreadable: {exc}"
    try:
        digest, size = record_path(library).read_text().split()
        size = int(size)
    except (OSError, ValueError):
        return "no valid record of its build beside it"
    if len(data) != size:
        return f"{len(data)} bytes, {size} when it was built"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its SHA-256 differs from the one recorded when it was built"
    return elf_flaw(data) if _ELF_PLATFORM else None


def elf_flaw(data: bytes) -> str | None:
    """Why `data` is not a whole ELF file (None when it is): its program and section header tables, and the
    file part of every loadable segment, must lie inside it."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return "not an ELF file"
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit: e_phoff, e_shoff at 0x20; the table sizes at 0x36
        if len(data) < 64:
            return "its ELF header is cut short"
        ph_table, sh_table = struct.unpack_from(order + "QQ", data, 0x20)
        ph_size, ph_count, sh_size, sh_count = struct.unpack_from(order + "HHHH", data, 0x36)
        segment = order + "IIQQQQ"  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz
        fields = (0, 2, 5)
    else:  # 32-bit: e_phoff, e_shoff at 0x1c; the table sizes at 0x2a
        ph_table, sh_table = struct.unpack_from(order + "II", data, 0x1C)
        ph_size, ph_count, sh_size, sh_count = struct.unpack_from(order + "HHHH", data, 0x2A)
        segment = order + "IIIII"  # p_type, p_offset, p_vaddr, p_paddr, p_filesz
        fields = (0, 1, 4)
    if ph_count and ph_size < struct.calcsize(segment):
        return "its program headers are malformed"
    if ph_table + ph_count * ph_size > len(data):
        return f"its program headers end past its end ({len(data)} bytes): cut short"
    # e_shnum 0 with a table: the count is in the first entry (more than 0xff00 sections); that entry at least
    if sh_table and sh_table + max(sh_count, 1) * sh_size > len(data):
        return f"its section headers end past its end ({len(data)} bytes): cut short"
    for index in range(ph_count):
        values = struct.unpack_from(segment, data, ph_table + index * ph_size)
        kind, offset, file_size = (values[i] for i in fields)
        if kind == 1 and offset + file_size > len(data):  # PT_LOAD
            return f"a loadable segment ends at byte {offset + file_size}, past its end ({len(data)} bytes): cut short"
    return None
