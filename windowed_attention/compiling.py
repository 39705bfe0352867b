"""What every `torch.compile` of the library hands to inductor besides its own options.

Inductor writes the C++ of a CPU graph for one vector width (the one `ATEN_CPU_CAPABILITY` names, else the
widest the CPU runs) and keeps it in its on-disk caches (`/tmp/torchinductor_$USER`) under a key that holds
inductor's config but not that width (torch 2.13). A cache filled at one width and read at another (the
variable changed, or a cache directory shared by machines of different CPUs) hands back code written for
the other width. Measured on an AVX-512 CPU: a decode graph written for AVX-512 and rebuilt for AVX2 loaded
16 floats into 8-float vectors (wrong tokens), and graphs written for AVX2 and rebuilt for AVX-512
corrupted the heap. Naming the width in the config (`cpp.simdlen`, the width inductor would pick itself)
puts it into the key. Only the width: x86 CPUs of one width with different extensions (AVX-512 with or
without VNNI or AMX) still share entries, and on other architectures (ARM, POWER, s390x) inductor's own
choice stands unnamed, so a cache directory shared by unlike machines is not made safe by this alone.
Torch versions whose `torch.compile` options cannot take an int for an option that defaults to None (those
before the type check `config.get_type`, torch 2.5) get no options: there the cache keeps its old key.
"""

from __future__ import annotations

import platform

import torch

# torch's CPU capability -> inductor's vector width in bits, on x86 (0: no vector code, as inductor does for
# DEFAULT there; on other architectures DEFAULT is not scalar to inductor: ARM without SVE gets NEON)
_WIDTHS = {"AVX512": 512, "AVX2": 256, "DEFAULT": 0}
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def inductor_options() -> dict[str, object]:
    """`{"cpp.simdlen": bits}` for the vector width torch runs at on this x86 CPU, or `{}` elsewhere (other
    architectures, other capabilities: inductor's own choice stands) and on a torch whose compile options
    cannot take it."""
    if platform.machine().lower() not in _X86:
        return {}
    bits = _WIDTHS.get(torch.backends.cpu.get_cpu_capability())
    if bits is None:
        return {}
    from torch._inductor import config  # only when compiling: eager code never imports inductor

    if not hasattr(config, "get_type"):  # torch 2.5 checks the option's type against None's
        return {}
    return {"cpp.simdlen": bits}
