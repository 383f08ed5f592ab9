"""A small Llama-style language model for the training comparison (nanoGPT-sized and nanoGPT-readable).

RMSNorm pre-norms, rotary position embeddings, SwiGLU MLP and causal scaled-dot-product attention. The module
names follow Meta's Llama reference (``layers.N.attention.wq``, ``feed_forward.w1``, ``attention_norm``,
``output``...): ``bitnet_ao.layouts.META``.

The norms are ``bitnet_ao.norm.RMSNorm`` (``torch.nn.RMSNorm`` with a fused CPU backward), the same norm
the BitNet surgery inserts, so that a BF16 vs BitNet comparison does not measure two norm implementations.

The output head is not tied to the embedding: the head stays in high precision while the block linears are
quantized, and a tied head would make the embedding table a quantization target too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitnet_ao.kernels import cpu_ops
from bitnet_ao.layouts import HF_LLAMA, META, Role
from bitnet_ao.norm import RMSNorm


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    hidden_dim: int = 1536
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelConfig: dim={self.dim} must split into n_heads={self.n_heads} heads of even size")

    # The hyperparameters the weights do not show, by Hugging Face LlamaConfig's names: what exporters read from a
    # model's config (bitnet_ao.integrations.gguf) and what to_hf_llama writes.
    model_type: ClassVar[str] = "llama"
    hidden_act: ClassVar[str] = "silu"

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def max_position_embeddings(self) -> int:
        return self.max_seq_len

    @property
    def rope_parameters(self) -> dict[str, object]:
        return {"rope_type": "default", "rope_theta": self.rope_theta}


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, shape ``(max_seq_len, head_dim // 2)``, in float32."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head of ``x`` (B, H, T, D) by the position angles (the GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer for generation (:func:`generate`): one
    ``(B, n_heads, max_seq_len, head_dim)`` pair per layer, filled up to ``length`` positions."""

    def __init__(self, config: ModelConfig, batch: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, config.n_heads, config.max_seq_len, config.dim // config.n_heads)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
        """``cache``: this layer's key and value buffers and the position ``x`` starts at (generation)."""
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            keys, values, start = cache
            keys[:, :, start : start + T], values[:, :, start : start + T] = k, v
            k, v = keys[:, :, : start + T], values[:, :, : start + T]
        if T == 1 and cache is not None:
            y = decode_attention(q, k, v)
        else:  # causal within the new tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One query per head against every cached key. On CPU bitnet_ao's operator registered in C++
    (``torch.ops.bitnet_ao.decode_attention``, one fixed summation order that eager and compiled steps share): for a
    single query torch's flash-attention kernel spends ~70 us per call setting up its blocks, a third of a packed
    model's decode step. Elsewhere (or without a C++ compiler) ``scaled_dot_product_attention``."""
    if q.device.type == "cpu" and cpu_ops.available():
        return torch.ops.bitnet_ao.decode_attention(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * config.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits ``(B, T, vocab)``, or the mean cross-entropy against ``targets`` when given. With ``cache`` the
        tokens continue the cached sequence (a prompt into an empty cache, then one token at a time)."""
        start = cache.length if cache is not None else 0
        seq_len = tokens.shape[1]
        if start + seq_len > self.config.max_seq_len:
            raise ValueError(
                f"Transformer: sequence of {start + seq_len} tokens exceeds max_seq_len={self.config.max_seq_len}"
            )
        if start and seq_len > 1:
            raise ValueError("Transformer: after the prompt, a KVCache takes one token per forward")
        cos, sin = self.rope_cos[start : start + seq_len], self.rope_sin[start : start + seq_len]
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, (cache.keys[i], cache.values[i], start) if cache is not None else None)
        if cache is not None:
            cache.length += seq_len
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


#: inductor's options for :class:`CompiledDecodeStep`: its C++ wrapper calls every kernel and every operator
#: registered in C++ (bitnet_ao's packed decode linear) without Python, and it rounds each intermediate to its dtype
#: as eager does, so that the compiled step decodes the eager step's tokens.
DECODE_COMPILE_OPTIONS = {"cpp_wrapper": True, "emulate_precision_casts": True}


class CompiledDecodeStep:
    """``model(token, cache=cache)`` for one token per sequence through ``torch.compile``: gpt-fast's compiled decode
    step, one graph with the cache length symbolic (:data:`DECODE_COMPILE_OPTIONS`), for :func:`generate`.

    Once a step has run for a batch size and dtype, later steps of that signature skip dynamo's guard evaluation
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): a decode step's guards cost a tenth of a packed
    model's token, and the signature is what they check here (the model is this one, the cache shapes follow from
    it). Any other signature runs with its guards, and compiles its own graph."""

    def __init__(self, model: Transformer) -> None:
        self.compiled = torch.compile(model, fullgraph=True, dynamic=True, options=DECODE_COMPILE_OPTIONS)
        self.calls: Counter[tuple] = Counter()

    def __call__(self, token: Tensor, cache: KVCache) -> Tensor:
        signature = (token.shape, token.device, cache.keys[0].dtype)
        self.calls[signature] += 1
        if self.calls[signature] <= 2:  # compiling: a first step at length 1 gets a graph of its own (0/1 sizes)
            return self.compiled(token, cache=cache)
        # With several graphs dynamo still checks the guards that tell them apart.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.compiled(token, cache=cache)


class ExportableDecodeStep(nn.Module):
    """The decode step as ``torch.export`` takes it: tensors in, logits out, no Python object. ``position`` is a
    0-d int64 tensor (the cache length, at least 1: a prompt came first), ``keys`` / ``values`` the cache's
    per-layer buffers, written in place."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: Tensor, position: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
        start = position.item()
        torch._check(start >= 1)
        torch._check(start < self.model.config.max_seq_len)
        cache = KVCache.__new__(KVCache)  # the buffers given, not new ones
        cache.keys, cache.values, cache.length = keys, values, start
        return self.model(token, cache=cache)


class PackagedDecodeStep:
    """A decode step exported and compiled ahead of time into a ``.pt2`` package (AOTInductor): no dynamo, no
    guards, no tensor subclass at run time; the C++ runner calls every kernel and bitnet_ao's packed decode linear
    (registered in C++) itself. :func:`generate` takes it as ``step``; ``path`` is a file ``aoti_load_package``
    loads anywhere the same torch and bitnet_ao run, also in a process that never built the model."""

    def __init__(self, path: str | Path) -> None:
        cpu_ops.available()  # the package calls bitnet_ao's C++ operators: registered (built if need be) first
        self.path = Path(path)
        self.runner = torch._inductor.aoti_load_package(str(self.path))

    @classmethod
    def package(cls, model: Transformer, path: str | Path, batch: int = 1, dtype: torch.dtype | None = None) -> Self:
        """Export ``model``'s decode step for ``batch`` sequences and a cache in ``dtype`` (default the output
        head's), compile it with AOTInductor into ``path``, and load it."""
        dtype = dtype or model.output.weight.dtype
        device = model.output.weight.device
        cache = KVCache(model.config, batch, dtype, device)
        example = (torch.zeros(batch, 1, dtype=torch.long, device=device), torch.tensor(1), cache.keys, cache.values)
        with torch.no_grad():
            program = torch.export.export(ExportableDecodeStep(model), example, strict=False)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs={"emulate_precision_casts": True}
            )
        return cls(path)

    def __call__(self, token: Tensor, cache: KVCache) -> Tensor:
        logits = self.runner(token, torch.tensor(cache.length), cache.keys, cache.values)
        cache.length += 1
        return logits


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    new_tokens: int,
    dtype: torch.dtype,
    step: Callable[[Tensor, KVCache], Tensor] | None = None,
) -> torch.Tensor:
    """Greedy decoding through a :class:`KVCache`: the prompt in one forward, then one token per ``step`` (default
    ``model(token, cache=cache)``; a :class:`CompiledDecodeStep`, or a :class:`PackagedDecodeStep` run by
    AOTInductor). The benchmarks' generation, and the evaluation-time sample of ``pretrain.py``."""
    cache = KVCache(model.config, prompt.shape[0], dtype, prompt.device)
    token = model(prompt, cache=cache)[:, -1:].argmax(-1)
    out = [token]
    for _ in range(new_tokens - 1):
        token = (step(token, cache) if step is not None else model(token, cache=cache))[:, -1:].argmax(-1)
        out.append(token)
    return torch.cat(out, dim=1)


def to_hf_llama(model: Transformer) -> nn.Module:
    """The same network as a Hugging Face ``LlamaForCausalLM`` (same weights, BitNet norms and BitNet weights), for
    ``bitnet_ao.integrations.transformers.save_pretrained_bitnet``. The architectures match exactly: RMSNorm
    pre-norms, SwiGLU, rotary embeddings on the two halves of each head (transformers' ``rotate_half``), one
    key/value head per query head, an untied head."""
    import transformers
    from torchao.quantization import quantize_

    from bitnet_ao.surgery import apply_bitnet_norms, detect_placement, quantize_filter

    c = model.config
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.dim,
            intermediate_size=c.hidden_dim,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.n_heads,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.norm_eps,
            rope_parameters=c.rope_parameters,
            hidden_act=c.hidden_act,
            tie_word_embeddings=False,
        )
    )
    applied = detect_placement(model, "to_hf_llama")
    if applied is not None:  # the same surgery on the copy
        apply_bitnet_norms(hf, applied.placement, eps=applied.eps, keep_block_norms=applied.keep_block_norms)
    recipe = getattr(model.layers[0].get_submodule(META.path(Role.ATTN_Q)).weight, "config", None)
    if recipe is not None:
        quantize_(hf, recipe, filter_fn=quantize_filter)  # the master-weight recipe: state dicts hold master weights
    hf.load_state_dict({META.rename(k, HF_LLAMA): v for k, v in model.state_dict().items()})
    return hf.to(next(model.parameters()).dtype)
