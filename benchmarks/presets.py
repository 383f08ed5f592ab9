"""The benchmarks' named sizes, each written once: the training runs of the main job and the llama.cpp comparison's
models. The scripts read them from here (``pretrain.py --preset``, ``bench_inference.py --preset``,
``bench_gguf.py``), so no script imports another just for a size.
"""

from __future__ import annotations

#: The main job's runs (``pretrain.py``, also the models ``bench_inference.py`` and ``finetune.py`` build): model shape
#: and training length. A dict named after a dtype (``hardware.short_name``) replaces some training settings for runs
#: in that dtype. Command-line flags override the training settings.
TRAINING_PRESETS: dict[str, dict] = {
    # Matmul-dominated so that the INT8 speed shows on CPU: M = batch * seq = 2048 tokens per step and 1024-wide
    # layers (attention and norms cost ~T and ~1 per token and channel, the matmuls ~dim). Sized so that the
    # BF16 + BitNet comparison takes about 3 minutes on a 2-core machine with native BF16. FP32 (AVX2 CPUs)
    # trains 0.24x the tokens: 2.5 minutes on Zen 3, about 4.5 on Zen 1 (30 steps took 5 min 50 s there).
    "cpu-default": dict(
        model=dict(dim=1024, n_layers=3, n_heads=8, hidden_dim=2816),
        steps=50, batch_size=16, seq_len=128, lr=1.5e-3, eval_every=25, eval_batches=4, compile=False,
        fp32=dict(steps=24, batch_size=8, eval_every=12),
    ),
    # For tests: seconds on a CPU.
    "tiny": dict(
        model=dict(dim=64, n_layers=2, n_heads=4, hidden_dim=192),
        steps=40, batch_size=4, seq_len=64, lr=3e-3, eval_every=20, eval_batches=2, compile=False,
    ),
    # Llama-2-1B-sized (TinyLlama's 1.1B shapes, byte vocabulary, full multi-head attention), one GPU.
    "llama2-1b": dict(
        model=dict(dim=2048, n_layers=22, n_heads=32, hidden_dim=5632),
        steps=1000, batch_size=4, seq_len=2048, lr=3e-4, eval_every=250, eval_batches=8, compile=True,
    ),
}  # fmt: skip

#: Model shapes. Every in_features is a multiple of 256: llama.cpp's TQ2_0 / TQ1_0 blocks hold 256 values of a row.
GGUF_PRESETS: dict[str, dict[str, int]] = {
    # 103M parameters: big enough that the weights do not sit in the caches of a small CPU.
    "default": dict(dim=1024, n_layers=8, n_heads=8, hidden_dim=2816),
    # For tests: seconds.
    "quick": dict(dim=256, n_layers=2, n_heads=4, hidden_dim=512),
}
