"""The speed baseline of issue 5: the same transformer and train step written in PyTorch eager, timed the same way.

    pip install '.[bench]'   # torch (CPU)
    python scripts/torch_reference.py --config=configs/tiny_es.py [--steps=10]

Mirrors llm/model for a Llama-style config (tied embeddings, RoPE, RMSNorm, grouped-query attention,
SwiGLU) and llm/train for the step (AdamW with decoupled weight decay, global-norm clipping, float32
cross-entropy), on the same synthetic batches as `scripts/benchmark.py train`. It prints tokens/s, so the
two can be compared on one machine. Attention uses PyTorch's fused `scaled_dot_product_attention`.
"""

import os
import time

import torch
import torch.nn.functional as F
from absl import app, flags
from ml_collections import config_flags
from torch import nn

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_es.py", "Model/training config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.", lower_bound=1)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:  # x: (batch, heads, length, head_dim)
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv_freq
    sin, cos = angles.sin(), angles.cos()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        head_dim = cfg.head_dim or cfg.embed_dim // cfg.num_heads
        self.head_dim = head_dim
        self.attention_norm = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.query = nn.Linear(cfg.embed_dim, cfg.num_heads * head_dim, bias=False)
        self.key = nn.Linear(cfg.embed_dim, cfg.num_kv_heads * head_dim, bias=False)
        self.value = nn.Linear(cfg.embed_dim, cfg.num_kv_heads * head_dim, bias=False)
        self.out = nn.Linear(cfg.num_heads * head_dim, cfg.embed_dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.gate = nn.Linear(cfg.embed_dim, cfg.mlp_dim, bias=False)
        self.up = nn.Linear(cfg.embed_dim, cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        h = self.attention_norm(x)
        split = lambda t, heads: t.view(batch, length, heads, self.head_dim).transpose(1, 2)
        q = rope(split(self.query(h), self.cfg.num_heads), self.cfg.rope_theta)
        k = rope(split(self.key(h), self.cfg.num_kv_heads), self.cfg.rope_theta)
        v = split(self.value(h), self.cfg.num_kv_heads)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        for parameter in self.parameters():  # GPT-2 initialization, as in llm/model/layers.py.
            if parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.embed.weight.T  # Tied output projection.


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    cfg = config.model
    if (
        cfg.mlp_activation != "swiglu"
        or cfg.norm != "rmsnorm"
        or cfg.position_encoding != "rope"
        or not cfg.tie_embeddings
    ):
        raise app.UsageError("The PyTorch reference mirrors Llama-style configs (swiglu, rmsnorm, rope, tied).")
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count())
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.optimizer.learning_rate,
        betas=(config.optimizer.b1, config.optimizer.b2),
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
    )
    shape = (config.train.batch_size, config.data.seq_len)
    batches = [torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def step(tokens: torch.Tensor) -> float:
        logits = model(tokens)[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        optimizer.step()
        return loss.item()

    for i in range(_WARMUP.value):
        step(batches[i % 2])
    start = time.perf_counter()
    for i in range(_STEPS.value):
        loss = step(batches[i % 2])
    elapsed = time.perf_counter() - start
    tokens_per_sec = shape[0] * shape[1] * _STEPS.value / elapsed
    print(
        f"torch {torch.__version__} eager, {torch.get_num_threads()} threads: "
        f"tokens_per_sec {tokens_per_sec:,.0f}  step_time_s {elapsed / _STEPS.value:.3f}  loss {loss:.3f}"
    )


if __name__ == "__main__":
    app.run(main)
