"""A GPT language model in one file: the architecture of OpenAI's GPT-2 and of nanoGPT.

A stack of pre-norm transformer blocks (LayerNorm -> causal self-attention -> residual, LayerNorm
-> MLP -> residual) between a token+position embedding and a final LayerNorm. The output head
shares its weight with the token embedding. Attention runs through PyTorch's
scaled_dot_product_attention, which picks a flash or memory-efficient kernel where it can.

Switches in the model config turn on what later work found better (the NanoGPT speedrun uses all
of them); each default is GPT-2's: `position` rotary, `norm` rmsnorm, `qk_norm`, `activation`
relu2, `tie_embeddings` off, `zero_init_proj`, `logit_softcap`, `attn_scale`, `split_qkv`.

Generation keeps each layer's keys and values (a KV cache), so each new token costs one position's
compute instead of the whole context's.

The config is a `nanogpt.config.ModelConfig` (or anything with the same fields); loading weights
from GPT-2, nanoGPT or our checkpoints lives in `nanogpt/runs/weights.py`, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


def make_norm(config, dim: int) -> nn.Module:
    return nn.RMSNorm(dim) if config.norm == "rmsnorm" else nn.LayerNorm(dim, bias=config.bias)


def rotary_tables(head_size: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_size / 2) of rotary embeddings: channel pair i of position t turns
    by the angle t * base^(-2i / head_size)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of channels (i, i + head_size / 2) of x (B, n_head, T, head_size) by its angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def attend(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, in float32 under a CPU's bfloat16 autocast: there PyTorch's
    flash-attention backward is ~3x slower in bfloat16 than in float32 (torch 2.13, measured)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.split_qkv = config.split_qkv
        if self.split_qkv:  # three square matrices, which Muon orthogonalises one by one
            self.c_q, self.c_k, self.c_v = (nn.Linear(config.n_embd, config.n_embd, bias=config.bias) for _ in range(3))
        else:  # query, key and value for all heads in one matmul
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        # None: SDPA's 1/sqrt(head_size). With qk_norm a query-key product is at most head_size, so the
        # scale caps the attention logits: a larger one lets a head attend more sharply.
        self.scale = config.attn_scale

    def forward(self, x, rotary=None, cache=None):
        """rotary: the (cos, sin) rows of x's positions, or None. cache: this layer's keys and values
        of the positions before x (a dict, filled here), or None."""
        B, T, C = x.size()
        q, k, v = (self.c_q(x), self.c_k(x), self.c_v(x)) if self.split_qkv else self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # bounds the attention logits: stabler at high learning rates
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:  # generation: attend to the kept keys and values too, then keep these
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = attend(  # one new query sees every kept key: no mask needed
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T == k.size(2), scale=self.scale
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU; nanoGPT uses the exact one.
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.relu2 = config.activation == "relu2"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else self.gelu(x)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, cache=None):
        x = x + self.attn(self.ln_1(x), rotary, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None, "resolve model.vocab_size (from the data) before building"
        self.config = config
        self.rotary = config.position == "rotary"
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not self.rotary:  # (in this order: the init draws from the RNG module by module)
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)
        if self.rotary:  # the angles are fixed: buffers, not saved in checkpoints
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf, 2017): the head reads out in the embedding's own space.
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two projections to the residual stream, so their
        # std shrinks with depth to keep the stream's variance from growing with the layer count.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init_proj:  # each block starts as the identity on the residual stream
                    torch.nn.init.zeros_(p)
        if config.zero_init_proj and not config.tie_embeddings:
            torch.nn.init.zeros_(self.lm_head.weight)  # start from uniform predictions

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. With non_embedding, the position table is left out (as in nanoGPT's
        printout); the token table stays, since it is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.rotary:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:  # an untied token table is a lookup, not a matmul
            n -= self.transformer.wte.weight.numel()
        return n

    def forward(self, idx, targets=None, caches=None):
        """caches: one dict per layer, for generation (see generate); idx then continues the
        positions they hold."""
        B, T = idx.size()
        start = caches[0]["k"].size(2) if caches and caches[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than the model's block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rotary = None
        if self.rotary:
            rotary = self.rotary_cos[start : start + T], self.rotary_sin[start : start + T]
        else:
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rotary, None if caches is None else caches[i])
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self._softcap(self.lm_head(x))
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # Generation needs only the next token: skip the head on every other position.
            logits = self._softcap(self.lm_head(x[:, [-1], :]))
            loss = None
        return logits, loss

    def _softcap(self, logits):
        """tanh soft-capping (Gemma 2; the speedrun): logits stay within (-cap, cap), smoothly."""
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. GPT-2's 1024) to a smaller one by cutting the position table."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.rotary:
            self.rotary_cos, self.rotary_sin = self.rotary_cos[:block_size], self.rotary_sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len: int) -> float:
        """FLOPs of one forward+backward per token (PaLM paper, appendix B): 6 per parameter for the
        matmuls, plus attention's scores and weighted sum, which grow with the context."""
        c = self.config
        n_params = self.get_num_params()
        return 6 * n_params + 12 * c.n_layer * c.n_embd * seq_len

    def estimate_mfu(self, tokens_per_sec: float, seq_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation: the fraction of the device's peak FLOP/s that training uses."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, generator=None,
                 use_cache: bool = True, stop=None):
        """Extend each row of idx (B, T) by max_new_tokens sampled tokens. temperature 0 is greedy;
        top_k keeps only the k likeliest tokens at each step. stop(idx) is asked after each new
        token: True ends the generation there (an evaluation's stop string was written).

        With use_cache, each layer keeps the keys and values of the tokens so far, and a new token
        runs through the model alone. Once the text is longer than block_size, the context window
        slides and every position in it moves, so each step then runs the whole window, as
        use_cache=False does at every step (kept as the reference)."""
        caches = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.config.block_size:
                if caches is None:  # the prompt, all at once
                    caches = [{} for _ in self.transformer.h]
                    logits, _ = self(idx, caches=caches)
                else:
                    logits, _ = self(idx[:, -1:], caches=caches)
            else:
                # the model sees at most block_size tokens of context
                context = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
                logits, _ = self(context)
            logits = logits[:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
            if stop is not None and stop(idx):
                break
        return idx
