"""Hugging Face transformers models on windowed-attention: exact, and long context on a CPU.

1. Exactness: tiny random models of Mistral, Qwen2 (sliding layers), Gemma 2 (softcap), Gemma 3 (local and
   global layers), gpt-oss (sinks, alternating layers) and Cohere2, float32, a left-padded batch longer than the
   window: our logits against `attn_implementation="eager"` (non-padded positions) and greedy `generate` tokens.
2. Long context: a Mistral-architecture model (random weights, no download; dim 256, 2 layers, 4 heads of 64,
   2 kv heads, sliding window 256) reads `--tokens` (16,384) tokens in one forward, with transformers' "sdpa"
   and with ours. Each run is a fresh subprocess: it builds the model, warms up on a short input, then times
   `--repeats` forwards (no_grad). The first of them is also measured for memory as the benchmark measures it
   (`windowed_attention.bench.measure.peak_rise`: heap trimmed, peak counter reset, then the peak resident
   memory `VmHWM` minus the resident memory `VmRSS` before the call): the memory the forward itself adds.

Run: python examples/hf_long_context.py [--tokens 16384] [--repeats 2] [--skip-exactness] [--json PATH]
Needs transformers (pip install "windowed-attention[transformers]"). Figures: docs/transformers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from windowed_attention.bench.cli import environment
from windowed_attention.bench.measure import peak_rise


# --- 1. exactness ---------------------------------------------------------------------------------------------

def family_configs(window: int):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=window)
    hybrid = dict(layer_types=["sliding_attention", "full_attention"])
    return {
        "Mistral": tf.MistralConfig(**common),
        "Qwen2 (sliding layers)": tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1),
        "Gemma 2 (softcap 2.0)": tf.Gemma2Config(**common, **hybrid, attn_logit_softcapping=2.0,
                                                 final_logit_softcapping=30.0, query_pre_attn_scalar=16),
        "Gemma 3 (local + global)": tf.Gemma3TextConfig(**common, **hybrid, query_pre_attn_scalar=16),
        "gpt-oss (sinks, alternating)": tf.GptOssConfig(**common, **hybrid, num_local_experts=4, num_experts_per_tok=2,
                                                        rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        "Cohere2": tf.Cohere2Config(**common, **hybrid),
    }


def exactness(name: str, window: int = 16, length: int = 48, pad: int = 9, new_tokens: int = 24) -> list[dict]:
    import transformers as tf

    ids = torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    rows = []
    for family, config in family_configs(window).items():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        for module in model.modules():  # gpt-oss sinks: random, so that they matter
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                torch.nn.init.normal_(module.sinks)
        result = {}
        for attn in ("eager", name):
            model.set_attn_implementation(attn)
            with torch.no_grad():
                result[attn] = (model(ids, attention_mask=mask).logits,
                                model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False))
        real = mask.bool()
        diff = (result[name][0][real] - result["eager"][0][real]).abs().max().item()
        rows.append(dict(family=family, max_abs_logit_diff=diff,
                         same_greedy_tokens=bool(torch.equal(result[name][1], result["eager"][1]))))
        print(f"  {family:<30} max |logits - eager| {diff:.2e}   greedy tokens identical: {rows[-1]['same_greedy_tokens']}")
    return rows


# --- 2. long context ------------------------------------------------------------------------------------------

def long_config():
    import transformers as tf

    return tf.MistralConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=256,
                            max_position_embeddings=65536)


def child(attn: str, tokens: int, repeats: int, out_path: str) -> None:
    """One measured run (in a fresh process): times, peak memory rise, the last positions' logits."""
    import transformers as tf

    if attn != "sdpa":
        from windowed_attention.integrations.transformers import register

        attn = register(attn)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(long_config(), attn_implementation=attn).eval()
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(1))
    times, last = [], {}

    def forward():
        start = time.perf_counter()
        last["logits"] = model(ids, use_cache=False, logits_to_keep=16).logits
        times.append(time.perf_counter() - start)

    with torch.no_grad():
        model(ids[:, :512], use_cache=False)  # warm-up: kernels, dispatch
        rise = peak_rise(forward)
        for _ in range(repeats - 1):
            forward()
    torch.save(last["logits"], out_path + ".pt")
    with open(out_path, "w") as f:
        json.dump(dict(attn=attn, times_s=times, peak_rise_mib=rise / 2**20), f)


def measure(attn: str, tokens: int, repeats: int) -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        subprocess.run([sys.executable, __file__, "--child", attn, "--tokens", str(tokens), "--repeats", str(repeats),
                        "--out", out], check=True)
        with open(out) as f:
            return json.load(f), torch.load(out + ".pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures here as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be at least 1")
    if args.child:
        return child(args.child, args.tokens, args.repeats, args.out)

    from windowed_attention.integrations.transformers import register

    name = register()
    import transformers

    report = dict(environment(), transformers=transformers.__version__)
    print(f"CPU {report['cpu'].get('model')}, {report['threads']} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    if not args.skip_exactness:
        print("exactness (float32, batch 2 of 48 tokens, row 1 left-padded by 9, window 16, 24 new tokens):")
        report["exactness"] = exactness(name)

    print(f"long context: Mistral-style (dim 256, 2 layers, 4 heads of 64, 2 kv heads, window 256), one forward "
          f"of {args.tokens:,} tokens, best of {args.repeats}, each implementation in a fresh process")
    runs = {}
    for attn in ("sdpa", name):
        runs[attn], logits = measure(attn, args.tokens, args.repeats)
        runs[attn]["logits"] = logits
        print(f"  {attn:<20} {min(runs[attn]['times_s']):8.2f} s   peak RSS rise {runs[attn]['peak_rise_mib']:8.1f} MiB")
    ours, sdpa = runs[name], runs["sdpa"]
    diff = (ours.pop("logits") - sdpa.pop("logits")).abs().max().item()
    ratios = dict(time=min(ours["times_s"]) / min(sdpa["times_s"]), memory=ours["peak_rise_mib"] / sdpa["peak_rise_mib"])
    print(f"  ours / sdpa: time {ratios['time']:.3f}x, peak memory rise {ratios['memory']:.3f}x; "
          f"last 16 positions' logits within {diff:.1e} of sdpa")
    report["long_context"] = dict(tokens=args.tokens, repeats=args.repeats, runs=runs, ratios=ratios,
                                  max_abs_logit_diff_vs_sdpa=diff)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
