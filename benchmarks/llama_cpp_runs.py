"""llama.cpp through its Python binding (``llama-cpp-python``), for the benchmarks that run our GGUF files in it:
loading a file, prefill and greedy generation, llama.cpp's own timer, and how closely llama.cpp follows a bitnet_ao
model (``pretrain.py --save-gguf`` and ``bench_gguf.py``). ``llama_cpp`` is imported inside the functions: the
benchmarks run without it, saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.model import generate


def load_llama(path: Path, threads: int, n_ctx: int):  # -> llama_cpp.Llama
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512, verbose=False
    )


def llama_logits(llm) -> np.ndarray:
    """The logits of the last evaluated position (a view into llama.cpp's buffer; reading them synchronizes)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_prefill(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return llama_logits(llm)


def llama_generate(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding from an empty cache, as ``model.generate``: the prompt in one forward, then
    ``new_tokens - 1`` forwards of one token."""
    out = [int(np.argmax(llama_prefill(llm, prompt)))]
    for _ in range(new_tokens - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(llama_logits(llm))))
    return out


@torch.inference_mode()
def llama_cpp_agreement(model: nn.Module, path: Path, prompt: list[int], new_tokens: int = 64) -> dict:
    """How closely stock llama.cpp running the GGUF file at ``path`` follows ``model`` (a benchmark ``Transformer``
    with BitNet weights, packed or not), after ``prompt``: both generate ``new_tokens`` greedily on their own
    (``free_agreement``: the fraction of positions with the same token), and llama.cpp is fed bitnet_ao's tokens
    (``forced_agreement``: the fraction of steps where its argmax is bitnet_ao's; ``logits_rel_error``: relative
    L2 error of its logits, worst step). llama.cpp quantizes activations per block of 256 to Q8_K where bitnet_ao
    quantizes per token, so the logits are close, not equal."""
    config = model.config
    ours = generate(model, torch.tensor([prompt]), new_tokens, next(model.parameters()).dtype)[0].tolist()
    reference = model(torch.tensor([prompt + ours[:-1]]))[0, len(prompt) - 1 :].float()
    llm = load_llama(path, torch.get_num_threads(), config.max_seq_len)
    theirs = llama_generate(llm, prompt, new_tokens)
    llm.reset()
    llm.eval(prompt)
    forced, errors = 0, []
    for step, token in enumerate(ours):
        logits = llama_logits(llm)
        error, agrees = logits_error(reference[step], logits)
        forced, errors = forced + agrees, [*errors, error]
        if step + 1 < new_tokens:
            llm.eval([token])
    return {
        "free_agreement": sum(a == b for a, b in zip(ours, theirs, strict=True)) / new_tokens,
        "forced_agreement": forced / new_tokens,
        "logits_rel_error": max(errors),
        "new_tokens": new_tokens,
    }


def llama_timer(llm, fn: Callable[[], object], kind: str, record: list[float]) -> Callable[[], object]:
    """``fn`` with llama.cpp's own timer around it: appends the tokens/s ``llama_perf_context`` counted for the
    call (``kind``: ``"prefill"`` or ``"decode"``)."""
    import llama_cpp

    def timed() -> object:
        llama_cpp.llama_perf_context_reset(llm.ctx)
        result = fn()
        perf = llama_cpp.llama_perf_context(llm.ctx)
        ms, n = (perf.t_p_eval_ms, perf.n_p_eval) if kind == "prefill" else (perf.t_eval_ms, perf.n_eval)
        record.append(1e3 * n / ms if ms > 0 else float("nan"))
        return result

    return timed


def logits_error(reference: Tensor, other: np.ndarray) -> tuple[float, bool]:
    """Relative L2 error of ``other`` against ``reference``, and whether their argmax agrees."""
    ref = reference.float().numpy()
    return float(np.linalg.norm(other - ref) / np.linalg.norm(ref)), int(np.argmax(other)) == int(np.argmax(ref))
