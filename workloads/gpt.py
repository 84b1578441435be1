"""gpt-tiny: a small causal transformer LM on a byte-level corpus (a generated toy
language, or real text shipped with polytrain: ``corpus=python-stdlib``).

The default shape (vocab 256, d_model 256, 4 layers, 4 heads, sequence 128,
micro-batch 8) is the one benchmarks compare on; keep it.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from workloads.base import Workload
from workloads.classify import generated_url
from workloads.corpora import CORPORA, load_corpus
from workloads.data import Batch, ensure_shards, read_column
from workloads.registry import register_workload

# (q, k, v) of shape (batch, heads, seq, head_dim) -> same shape. Sequence
# parallelism swaps this for a distributed attention.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Embedding(nn.Module):
    def __init__(self, vocab: int, d_model: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        # Global positions of the tokens this module sees; None: 0..t-1. Sequence
        # parallelism sets its shard's positions. A plain attribute, not a buffer: it is
        # not model state, and each rank's differ (DDP must not broadcast it).
        self.positions: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = self.positions if self.positions is not None else torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(pos)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attention: AttentionFn = causal_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = self.attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class TokenWindows:
    """Every token of the shards as one stream, cut into windows of seq_len+1
    (inputs and next-token targets)."""

    def __init__(self, url: str, seq_len: int, vocab: int):
        stream = read_column(url, "tokens").astype(np.int64)
        if stream.size and (stream.min() < 0 or stream.max() >= vocab):
            raise ValueError(
                f"data={url!r}: token ids must lie in [0, {vocab}) for vocab_size={vocab}, "
                f"found [{stream.min()}, {stream.max()}]"
            )
        n = stream.size // (seq_len + 1)
        if n == 0:
            raise ValueError(f"data={url!r}: {stream.size} tokens, fewer than one window of {seq_len + 1}")
        self.windows = torch.from_numpy(stream[: n * (seq_len + 1)].reshape(n, seq_len + 1))

    def __len__(self) -> int:
        return self.windows.shape[0]

    def gather(self, indices: np.ndarray) -> Batch:
        w = self.windows[torch.from_numpy(np.asarray(indices))]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def generate_corpus(*, seed: int, n_docs: int, n_words: int = 128, successors: int = 4) -> list[bytes]:
    """A toy language with real structure: a fixed vocabulary of pronounceable
    words, a sparse Zipf-weighted Markov chain between them, and sentences.
    A byte-level model can learn spelling and word order, so the loss falls far
    below ln(256); it cannot fall to zero, since each word has several successors."""
    rng = np.random.default_rng(seed)
    consonants, vowels = b"bcdfghjklmnprstvwz", b"aeiou"
    words = []
    for _ in range(n_words):
        n = int(rng.integers(2, 9))
        words.append(bytes(
            (consonants if i % 2 == 0 else vowels)[int(rng.integers(0, 18 if i % 2 == 0 else 5))] for i in range(n)
        ))
    succ = rng.integers(0, n_words, size=(n_words, successors))
    weights = 1.0 / np.arange(1, successors + 1)
    cum = np.cumsum(weights / weights.sum())
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(40, 160))
        picks = np.minimum(np.searchsorted(cum, rng.random(n)), successors - 1)
        ends = rng.random(n) < 0.1
        w, out = int(rng.integers(0, n_words)), []
        for i in range(n):
            out.append(words[w] + (b". " if ends[i] else b" "))
            w = int(succ[w, picks[i]])
        docs.append(b"".join(out))
    return docs


@register_workload("gpt-tiny")
class GptTiny(Workload):
    """Small causal transformer LM (compute-bound) on a generated byte-level corpus."""

    vocab_size: int = Field(256, ge=2, description="token ids lie in [0, vocab_size)")
    d_model: int = Field(256, ge=8, description="width of the residual stream")
    n_layers: int = Field(4, ge=1, description="transformer blocks")
    n_heads: int = Field(4, ge=1, description="attention heads; must divide d_model")
    seq_len: int = Field(128, ge=2, description="tokens per sample")
    corpus: Literal["toy", "python-stdlib"] = Field(
        "toy", description="toy: a generated toy language; python-stdlib: real text shipped with polytrain "
                           "(source code, the same bytes on every machine)")
    n_docs: int = Field(2048, ge=16, description="documents in the generated corpus (corpus=toy)")
    data_seed: int = Field(1234, description="seed of the generated corpus (corpus=toy)")
    heldout_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="tail of the data kept out of training, for held-out evaluation")
    init: Literal["gpt2", "torch"] = Field(
        "gpt2", description="gpt2: N(0, 0.02), residual projections scaled by 1/sqrt(2 x layers); torch: each "
                            "module's default (a sign-step method's lr depends on the weights' scale)")

    corpus_version: ClassVar[int] = 2

    def model_post_init(self, _context) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model}: must be divisible by n_heads={self.n_heads}")
        if self.corpus != "toy" and self.vocab_size < 256:
            raise ValueError(f"vocab_size={self.vocab_size}: corpus={self.corpus!r} is bytes, needs vocab_size >= 256")
        if self.corpus != "toy" and self.data:
            raise ValueError(f"corpus={self.corpus!r}: a shipped corpus, so data={self.data!r} cannot be set too")

    def blocks(self) -> list[nn.Module]:
        blocks = [Embedding(self.vocab_size, self.d_model, self.seq_len)]
        blocks += [Block(self.d_model, self.n_heads) for _ in range(self.n_layers)]
        blocks.append(Head(self.d_model, self.vocab_size))
        if self.init == "torch":  # each module's own default (embeddings N(0, 1), linears Kaiming-uniform)
            return blocks
        for b in blocks:
            b.apply(_init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * layers)
        for b in blocks[1:-1]:
            for lin in (b.attn.proj, b.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.n_layers))
        return blocks

    def data_url(self) -> str:
        if self.data:
            return self.data
        if self.corpus != "toy":
            url = generated_url("gpt-tiny-corpus", self.corpus, CORPORA[self.corpus].sha256)
        else:
            url = generated_url("gpt-tiny", self.corpus_version, self.n_docs, self.data_seed)
        return ensure_shards(url, self._make_tables)

    def _make_tables(self, shards: int = 4) -> list[pa.Table]:
        if self.corpus != "toy":
            docs = load_corpus(self.corpus)
        else:
            docs = generate_corpus(seed=self.data_seed, n_docs=self.n_docs)
        tokens = [np.frombuffer(d, dtype=np.uint8).astype(np.int32) for d in docs]
        per = math.ceil(len(tokens) / shards)
        return [
            pa.table({"tokens": pa.array(tokens[i : i + per], type=pa.list_(pa.int32()))})
            for i in range(0, len(tokens), per)
        ]

    def source(self) -> TokenWindows:
        return TokenWindows(self.data_url(), self.seq_len, self.vocab_size)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, 1), batch[1].flatten())

    def tokens_per_sample(self) -> int:
        return self.seq_len

    def attention_layers(self, blocks: list[nn.Module]) -> list[nn.Module]:
        return [b.attn for b in blocks if isinstance(b, Block)]

    def position_layers(self, blocks: list[nn.Module]) -> list[nn.Module]:
        """Modules whose ``positions`` attribute gives the tokens' global positions
        (sequence parallelism: a rank holds a slice of each sequence)."""
        return [b for b in blocks if isinstance(b, Embedding)]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
