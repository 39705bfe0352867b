"""What every `torch.compile` of the library hands to inductor besides its own options.

Inductor writes the C++ of a CPU graph for one vector width (the one `ATEN_CPU_CAPABILITY` names, else the
widest the CPU runs) and keeps it in its on-disk caches (`/tmp/torchinductor_$USER`) under a key that holds
inductor's config but not that width (torch 2.13). A cache filled at one width and read at another (the
variable changed, or a cache directory shared by machines of different CPUs) hands back code written for
the other width. Measured on an AVX-512 CPU: a decode graph written for AVX-512 and rebuilt for AVX2 loaded
16 floats into 8-float vectors (wrong tokens), and graphs written for AVX2 and rebuilt for AVX-512
corrupted the heap. Naming the width in the config (`cpp.simdlen`, the width inductor would pick itself)
puts it into the key.
"""

from __future__ import annotations

import torch

# torch's CPU capability -> inductor's vector width in bits (0: no vector code, as inductor does for DEFAULT)
_WIDTHS = {"AVX512": 512, "AVX2": 256, "DEFAULT": 0}


def inductor_options() -> dict[str, object]:
    """`{"cpp.simdlen": bits}` for the vector width torch runs at on this CPU, or `{}` where the capability
    has no fixed x86 width (ARM, POWER, s390x: inductor's own choice stands)."""
    bits = _WIDTHS.get(torch.backends.cpu.get_cpu_capability())
    return {} if bits is None else {"cpp.simdlen": bits}
