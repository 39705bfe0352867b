"""A small language model written for local-attention 1.11.2, the way third-party projects write one.

It imports `local_attention` and nothing of windowed-attention: `tests/test_compat.py` trains it and
samples from it after `windowed_attention.compat.install()`, to show such code runs on windowed-attention
unchanged. Its calls follow the projects built on local-attention: `LocalAttention` with
`rel_pos_emb_config`, `autopad`, `look_forward=int(not causal)`, `shared_qk` and `input_mask`
(performer-pytorch, routing-transformer, sinkhorn-transformer, linear-attention-transformer);
`LocalMHA`, `FeedForward` and `DynamicPositionBias` from `local_attention.transformer` (audiolm-pytorch's
codec); the rotary helpers in a layer of its own; `LocalTransformer` and its `generate`; and the helper
names (`exists`, `default`, `pad_to_multiple`, `look_around`, `max_neg_value`, `top_k`, `eval_decorator`).
"""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from local_attention import LocalAttention, LocalTransformer
from local_attention.local_attention import default, exists, look_around, max_neg_value, pad_to_multiple
from local_attention.rotary import SinusoidalEmbeddings, apply_rotary_pos_emb
from local_attention.transformer import DynamicPositionBias, FeedForward, LocalMHA, eval_decorator, top_k


class LocalSelfAttention(nn.Module):
    """Heads of local attention around local-attention's module (performer-pytorch's local heads)."""

    def __init__(self, dim, heads=4, dim_head=16, window_size=8, causal=True, shared_qk=False):
        super().__init__()
        self.heads, self.shared_qk = heads, shared_qk
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, dim_head * heads * (2 if shared_qk else 3), bias=False)
        self.attn = LocalAttention(window_size=window_size, causal=causal, look_forward=int(not causal), autopad=True,
                                   shared_qk=shared_qk, rel_pos_emb_config=(dim_head, heads))
        self.to_out = nn.Linear(dim_head * heads, dim)

    def forward(self, x, mask=None):
        qkv = self.to_qkv(self.norm(x)).chunk(2 if self.shared_qk else 3, dim=-1)
        q, *kv = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in qkv)
        k, v = (q, kv[0]) if self.shared_qk else kv
        out = self.attn(q, k, v, input_mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class RotaryCausalAttention(nn.Module):
    """Full causal attention with local-attention's rotary helpers (a "global" layer)."""

    def __init__(self, dim, dim_head=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, dim_head * 3, bias=False)
        self.rotary = SinusoidalEmbeddings(dim_head)
        self.to_out = nn.Linear(dim_head, dim)

    def forward(self, x):
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        freqs, scale = self.rotary(k)
        q, k = apply_rotary_pos_emb(q, k, freqs, scale)
        sim = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        n = x.shape[1]
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        sim = sim.masked_fill(future, max_neg_value(sim))
        return self.to_out(sim.softmax(dim=-1) @ v)


class PreviousWindowSummary(nn.Module):
    """Adds to each position the mean of the window before its own (causal: nothing of its own window)."""

    def __init__(self, dim, window_size=8):
        super().__init__()
        self.window_size = window_size
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, w = x.shape[1], self.window_size
        _, padded = pad_to_multiple(x, w, dim=-2)
        windows = rearrange(padded, "b (k w) d -> b k w d", w=w)
        around = look_around(windows, backward=1, forward=0, pad_value=0.0)  # (b, k, 2w, d)
        previous = around[:, :, :w].mean(dim=-2)  # (b, k, d)
        return x + self.proj(repeat(previous, "b k d -> b (k w) d", w=w)[:, :n])


class TinyLM(nn.Module):
    def __init__(self, *, num_tokens, dim=32, depth=2, window_size=8, max_seq_len=64, heads=4, dim_head=16):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.summary = PreviousWindowSummary(dim, window_size)
        self.bias = DynamicPositionBias(dim=dim_head, heads=heads)
        self.window_size = window_size
        self.layers = nn.ModuleList([
            nn.ModuleList([
                LocalSelfAttention(dim, heads, dim_head, window_size, shared_qk=layer % 2 == 1),
                LocalMHA(dim=dim, heads=heads, dim_head=dim_head, window_size=window_size, causal=True,
                         prenorm=True, use_rotary_pos_emb=False),
                FeedForward(dim, mult=2),
            ])
            for layer in range(depth)
        ])
        self.global_attn = RotaryCausalAttention(dim, dim_head)
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens))

    def forward(self, x, mask=None, return_loss=False, ignore_index=-1):
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]
            mask = mask[:, :-1] if exists(mask) else None
        h = self.summary(self.token_emb(x))
        w = self.window_size
        attn_bias = self.bias(w, 2 * w)
        for local_attn, mha, ff in self.layers:
            h = h + local_attn(h, mask=mask)
            h = h + mha(h, mask=mask, attn_bias=attn_bias)
            h = h + ff(h)
        h = h + self.global_attn(h)
        logits = self.to_logits(h)
        if not return_loss:
            return logits
        return F.cross_entropy(rearrange(logits, "b n c -> b c n"), labels, ignore_index=ignore_index)

    @torch.no_grad()
    @eval_decorator
    def generate(self, prime, seq_len, temperature=1.0, filter_thres=0.9):
        out = prime
        for _ in range(seq_len):
            logits = self.forward(out[:, -self.max_seq_len:])[:, -1]
            filtered = top_k(logits, thres=filter_thres)
            if temperature == 0:
                sampled = filtered.argmax(dim=-1, keepdim=True)
            else:
                sampled = torch.multinomial(F.softmax(filtered / default(temperature, 1.0), dim=-1), 1)
            out = torch.cat((out, sampled), dim=-1)
        return out[:, prime.shape[1]:]


def local_transformer(num_tokens, **kwargs):
    """local-attention's own transformer, as `train.py` of its repository builds it (smaller)."""
    return LocalTransformer(num_tokens=num_tokens, max_seq_len=64, dim=32, depth=2, causal=True,
                            local_attn_window_size=8, dim_head=16, heads=2, **kwargs)
