"""Distillation from the full-precision model a BitNet model was converted from (docs/finetuning.md).

Converting a pretrained model to ternary weights loses much of what it knew; the frozen full-precision original
is the best teacher there is (BitDistill, arXiv 2510.13998). Two losses:

- :func:`logits_distillation_loss`: ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` per token, the
  classic knowledge-distillation term (Hinton et al.), averaged over the tokens that count.
- :func:`attention_relation_loss`: MiniLMv2's multi-head self-attention relation distillation, which BitDistill
  applies to one layer: for each of the query, key and value projections ``A`` (``(B, T, D)``), split into
  ``relation_heads`` heads of width ``d_r``, the relation ``softmax(A A^T / sqrt(d_r))`` of the student is pulled
  towards the teacher's with a KL divergence per row. It needs no attention weights from the model, only the
  projections' outputs, which :class:`ProjectionCapture` records with forward hooks (so SDPA / flash attention
  stay on).

Both take the teacher in any dtype (bf16 is typical) and compute in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layouts import Role, find_blocks


def _kl_per_row(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``KL(softmax(teacher) || softmax(student))`` over the last dimension, one value per row, in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (``(B, T)``) over the positions where ``mask`` (``(B, T)``, nonzero = counts) is set."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"distillation: mask of shape {tuple(mask.shape)} for tokens of shape {tuple(values.shape)}")
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1)


def logits_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``T^2 KL(p_teacher || p_student)`` with both distributions softened by ``temperature``, averaged over tokens.

    Args:
        student_logits, teacher_logits: ``(B, T, V)`` (or ``(N, V)``) logits of the same tokens; the teacher's
            are detached. Their vocabularies must match.
        temperature: ``T > 0``; the ``T^2`` factor keeps the gradient's size independent of ``T``.
        mask: optional ``(B, T)`` attention mask (1 = a real token): padding does not count.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits_distillation_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the models must share a tokenizer and see the same batch"
        )
    if temperature <= 0:
        raise ValueError(f"logits_distillation_loss: temperature must be positive, got {temperature}")
    kl = _kl_per_row(teacher_logits.detach() / temperature, student_logits / temperature)
    return _masked_mean(kl, mask) * temperature**2


def _relations(states: Tensor, relation_heads: int, causal: bool) -> Tensor:
    """``A A^T / sqrt(d_r)`` per relation head, ``(B, H_r, T, T)`` float32; future positions at ``-inf`` when
    ``causal`` (a causal model's token never sees them, so their relations carry nothing it learned)."""
    b, t, d = states.shape
    if d % relation_heads:
        raise ValueError(f"attention_relation_loss: relation_heads={relation_heads} must divide the width {d}")
    a = states.float().view(b, t, relation_heads, d // relation_heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / (d // relation_heads) ** 0.5
    if causal:
        future = torch.ones(t, t, dtype=torch.bool, device=states.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def attention_relation_loss(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    relation_heads: int,
    causal: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """MiniLMv2 / BitDistill attention-relation distillation, summed over the given projections (q, k, v).

    Args:
        student_states, teacher_states: the outputs of the same projections of one layer, each ``(B, T, D)``
            (widths may differ between projections, e.g. grouped-query attention's k and v).
        relation_heads: ``H_r``, how many heads each projection is split into for its relations (it must divide
            every width; the model's KV-head count always does).
        causal: relations only to earlier tokens (causal language models).
        mask: optional ``(B, T)`` attention mask; padded query rows do not count.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(
            f"attention_relation_loss: {len(student_states)} student and {len(teacher_states)} teacher states; "
            "give the same projections (q, k, v) of both models"
        )
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(student_states, teacher_states, strict=True):
        if student.shape != teacher.shape or student.dim() != 3:
            raise ValueError(
                f"attention_relation_loss: student state {tuple(student.shape)} and teacher state "
                f"{tuple(teacher.shape)} must be equal (B, T, D) tensors"
            )
        s = _relations(student, relation_heads, causal)
        t = _relations(teacher.detach(), relation_heads, causal)
        # Masked (-inf) entries are 0 in both distributions and contribute nothing: zero them before t - s.
        t_log, s_log = F.log_softmax(t, -1), F.log_softmax(s, -1)
        visible = torch.isfinite(t)
        kl = (t_log.exp() * (t_log - s_log).where(visible, 0.0)).sum(-1).mean(1)  # (B, T), mean over heads
        total = total + _masked_mean(kl, mask)
    return total


class ProjectionCapture:
    """Records the outputs of some modules (a layer's q, k and v projections) on every forward, with hooks.

    Use as a context manager around the model call; ``.states`` then holds one tensor per module, in order::

        with ProjectionCapture([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]) as cap:
            logits = model(input_ids).logits
        student_qkv = cap.states
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.states: list[Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ProjectionCapture:
        self.states = [None] * len(self.modules)

        def record(index: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                self.states[index] = output

            return hook

        self._handles = [m.register_forward_hook(record(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc_type is None and any(s is None for s in self.states):
            missing = [i for i, s in enumerate(self.states) if s is None]
            raise RuntimeError(f"ProjectionCapture: modules {missing} did not run in the forward")


def attention_projections(model: nn.Module, layer: int) -> list[nn.Module]:
    """The query, key and value projections of transformer block ``layer`` (negative counts from the end) of any
    model whose layout :mod:`bitnet_ao.layouts` knows, normed by the surgery or wrapped by peft; one fused
    projection for torchtitan's fused QKV layout. What :class:`ProjectionCapture` records for
    :func:`attention_relation_loss`."""
    layout, blocks = find_blocks(model, "attention_projections")
    if not -len(blocks) <= layer < len(blocks):
        raise IndexError(f"attention_projections: layer {layer} of a model with {len(blocks)} blocks")
    block = blocks[layer][1]
    roles = [r for r in (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_QKV) if r in layout.modules]
    return [block.get_submodule(layout.path(r)) for r in roles]
