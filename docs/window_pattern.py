"""Draw which keys each query sees, for the main window options: `python docs/window_pattern.py`.

Writes docs/window_pattern.png (shown in the README). The pattern comes from `WindowSpec.visible`,
the same rule every backend implements.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from windowed_attention.ops import WindowSpec  # noqa: E402

N, W = 16, 4
PANELS = [
    ("causal, look_backward=1", WindowSpec(W, True, 1, 0, False)),
    ("causal, look_backward=1,\nexact_windowsize", WindowSpec(W, True, 1, 0, True)),
    ("not causal, look_backward=1,\nlook_forward=1", WindowSpec(W, False, 1, 1, False)),
    ("not causal, look_backward=1,\nlook_forward=1, exact_windowsize", WindowSpec(W, False, 1, 1, True)),
]


def main(path: Path = Path(__file__).with_name("window_pattern.png")) -> None:
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 4.8))
    for ax, (title, spec) in zip(axes, PANELS):
        ax.imshow(spec.visible(i, j, N).numpy(), cmap="Blues", vmin=0, vmax=1.3)
        for edge in range(W, N, W):  # window boundaries
            ax.axhline(edge - 0.5, color="grey", lw=0.6)
            ax.axvline(edge - 0.5, color="grey", lw=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position j")
        ax.set_xticks(range(0, N, W))
        ax.set_yticks(range(0, N, W))
    axes[0].set_ylabel("query position i")
    fig.suptitle(f"Keys each query sees (blue), n={N}, window_size={W}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
