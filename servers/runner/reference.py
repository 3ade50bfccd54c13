"""A plain numpy Llama with contiguous KV: the benchmark's baseline and a test oracle.

Runs in benchmarks and tests only, never in a serving runner: numpy matmul sums in an order
that depends on the batch shape, so its logits move (~1e-5) with the batch size. It owns its
own KV cache (batch, layer, kv head, position) and decodes all sequences in lockstep.
"""

from __future__ import annotations

import numpy as np

from servers.runner.loaders import LoadedModel
from servers.runner.model import rope_tables


class NumpyLlama:
    """Lockstep batched decode: every sequence of the batch is at the same position."""

    def __init__(self, loaded: LoadedModel, *, batch: int, max_pos: int) -> None:
        c = self.config = loaded.config
        if max_pos > c.seq_len:
            raise ValueError(f"max_pos {max_pos} exceeds the context {c.seq_len}")
        self.w = loaded.weights
        self.batch = batch
        self.max_pos = max_pos
        cos, sin = rope_tables(c)
        self.cos, self.sin = cos[:max_pos], sin[:max_pos]
        shape = (c.n_layers, batch, c.n_kv_heads, max_pos, c.head_size)
        self.k_cache = np.zeros(shape, np.float32)
        self.v_cache = np.zeros(shape, np.float32)
        # Pre-transposed (in, out) copies so each projection is one x @ W.
        self.layers = [
            {
                name: np.ascontiguousarray(getattr(lw, name).T)
                for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
            }
            | {"rms_att": lw.rms_att, "rms_ffn": lw.rms_ffn}
            for lw in self.w.layers
        ]
        self.wcls_t = np.ascontiguousarray(self.w.wcls.T)

    def _rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        ss = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32) + np.float32(
            self.config.norm_eps
        )
        out: np.ndarray = weight * (x / np.sqrt(ss))
        return out

    def _rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        # x: (B, heads, head_size)
        c, s = self.cos[pos], self.sin[pos]
        if self.config.rope_layout == "adjacent":
            x0, x1 = x[..., 0::2], x[..., 1::2]
        else:
            half = self.config.head_size // 2
            x0, x1 = x[..., :half], x[..., half:]
        r0 = x0 * c - x1 * s
        r1 = x0 * s + x1 * c
        out = np.empty_like(x)
        if self.config.rope_layout == "adjacent":
            out[..., 0::2], out[..., 1::2] = r0, r1
        else:
            out[..., :half], out[..., half:] = r0, r1
        return out

    def forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Logits (batch, vocab) for one token per sequence at position ``pos``."""
        c = self.config
        B, H, KV, hs = len(tokens), c.n_heads, c.n_kv_heads, c.head_size
        group = H // KV
        x = self.w.tok_embeddings[tokens].astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(hs))
        for li, lw in enumerate(self.layers):
            xb = self._rmsnorm(x, lw["rms_att"])
            q = self._rope((xb @ lw["wq"]).reshape(B, H, hs), pos)
            k = self._rope((xb @ lw["wk"]).reshape(B, KV, hs), pos)
            self.k_cache[li, :B, :, pos] = k
            self.v_cache[li, :B, :, pos] = (xb @ lw["wv"]).reshape(B, KV, hs)
            keys = self.k_cache[li, :B, :, : pos + 1]  # (B, KV, T, hs)
            values = self.v_cache[li, :B, :, : pos + 1]
            qg = q.reshape(B, KV, group, hs)
            scores = (qg @ keys.transpose(0, 1, 3, 2)) * scale  # (B, KV, group, T)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            att = (scores @ values).reshape(B, H * hs)
            x = x + att @ lw["wo"]
            xb = self._rmsnorm(x, lw["rms_ffn"])
            h1 = xb @ lw["w1"]
            h = (h1 / (np.float32(1.0) + np.exp(-h1))) * (xb @ lw["w3"])
            x = x + h @ lw["w2"]
        logits: np.ndarray = self._rmsnorm(x, self.w.rms_final) @ self.wcls_t
        return logits
