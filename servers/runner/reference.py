"""A plain numpy forward pass with contiguous KV: the benchmark's baseline and a test oracle.

Computes every family architectures.py describes (norms, activations, biases, q/k norms,
sliding windows) from the same ModelConfig switches, written the obvious way.

Runs in benchmarks and tests only, never in a serving runner: numpy matmul sums in an order
that depends on the batch shape, so its logits move (~1e-5) with the batch size. It owns its
own KV cache (batch, layer, kv head, position) and decodes all sequences in lockstep.
"""

from __future__ import annotations

import numpy as np

from llmos.servers.runner.loaders import LoadedModel
from llmos.servers.runner.model import rope_tables
from llmos.servers.runner.q8 import as_float


class NumpyLlama:
    """Lockstep batched decode: every sequence of the batch is at the same position."""

    def __init__(self, loaded: LoadedModel, *, batch: int, max_pos: int) -> None:
        c = self.config = loaded.config
        if max_pos > c.seq_len:
            raise ValueError(f"max_pos {max_pos} exceeds the context {c.seq_len}")
        self.w = loaded.weights
        self.batch = batch
        self.max_pos = max_pos
        cos, sin = rope_tables(c, loaded.weights.rope_freqs)
        self.cos, self.sin = cos[:, :max_pos], sin[:, :max_pos]
        shape = (c.n_layers, batch, c.n_kv_heads, max_pos, c.head_size)
        self.k_cache = np.zeros(shape, np.float32)
        self.v_cache = np.zeros(shape, np.float32)
        # Pre-transposed (in, out) copies so each projection is one x @ W.
        self.layers = [
            {
                name: np.ascontiguousarray(as_float(getattr(lw, name)).T)
                for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
            }
            | {
                name: getattr(lw, name)
                for name in ("rms_att", "rms_ffn", "q_norm", "k_norm", "post_att_norm",
                             "post_ffn_norm", "bq", "bk", "bv")
            }
            for lw in self.w.layers
        ]
        self.wcls_t = np.ascontiguousarray(as_float(self.w.wcls).T)
        self.embeddings = as_float(self.w.tok_embeddings)

    def _rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        ss = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32) + np.float32(
            self.config.norm_eps
        )
        out: np.ndarray = weight * (x / np.sqrt(ss))
        return out

    def _rope(self, x: np.ndarray, pos: int, table: int) -> np.ndarray:
        # x: (B, heads, head_size)
        c, s = self.cos[table, pos], self.sin[table, pos]
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
        x = self.embeddings[tokens].astype(np.float32) * np.float32(c.embed_scale)
        scale = np.float32(c.scale_of_queries)
        for li, lw in enumerate(self.layers):
            local = c.is_local(li)
            table = 1 if local else 0
            xb = self._rmsnorm(x, lw["rms_att"])
            q, k, v = xb @ lw["wq"], xb @ lw["wk"], xb @ lw["wv"]
            if lw["bq"] is not None:
                q, k, v = q + lw["bq"], k + lw["bk"], v + lw["bv"]
            q, k = q.reshape(B, H, hs), k.reshape(B, KV, hs)
            if lw["q_norm"] is not None:
                q, k = self._rmsnorm(q, lw["q_norm"]), self._rmsnorm(k, lw["k_norm"])
            q, k = self._rope(q, pos, table), self._rope(k, pos, table)
            self.k_cache[li, :B, :, pos] = k
            self.v_cache[li, :B, :, pos] = v.reshape(B, KV, hs)
            first = max(0, pos + 1 - c.sliding_window) if local else 0
            keys = self.k_cache[li, :B, :, first : pos + 1]  # (B, KV, T, hs)
            values = self.v_cache[li, :B, :, first : pos + 1]
            qg = q.reshape(B, KV, group, hs)
            scores = (qg @ keys.transpose(0, 1, 3, 2)) * scale  # (B, KV, group, T)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            att = (scores @ values).reshape(B, H * hs) @ lw["wo"]
            if lw["post_att_norm"] is not None:
                att = self._rmsnorm(att, lw["post_att_norm"])
            x = x + att
            xb = self._rmsnorm(x, lw["rms_ffn"])
            h1 = xb @ lw["w1"]
            if c.activation == "gelu_tanh":
                u = np.float32(np.sqrt(2.0 / np.pi)) * (h1 + np.float32(0.044715) * h1**3)
                gate = np.float32(0.5) * h1 * (np.float32(1.0) + np.tanh(u))
            else:
                gate = h1 / (np.float32(1.0) + np.exp(-h1))
            ffn = (gate * (xb @ lw["w3"])) @ lw["w2"]
            if lw["post_ffn_norm"] is not None:
                ffn = self._rmsnorm(ffn, lw["post_ffn_norm"])
            x = x + ffn
        logits: np.ndarray = self._rmsnorm(x, self.w.rms_final) @ self.wcls_t
        return logits
