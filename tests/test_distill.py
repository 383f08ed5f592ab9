"""Distillation losses (bitnet_ao/distill.py) against torch's own KL divergence, written out head by head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.model import ModelConfig, Transformer
from bitnet_ao.distill import (
    ProjectionCapture,
    attention_projections,
    attention_relation_loss,
    logits_distillation_loss,
)
from bitnet_ao.surgery import apply_bitnet_norms


def _kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s) per row by torch's kl_div (independent of the code under test)."""
    t = F.log_softmax(teacher_logits.double(), -1)
    s = F.log_softmax(student_logits.double(), -1)
    return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_loss_is_temperature_scaled_kl(temperature):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11).bfloat16()
    loss = logits_distillation_loss(student, teacher, temperature)
    expected = _kl_div(teacher.float() / temperature, student / temperature).mean() * temperature**2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0


def test_logits_loss_skips_padding_and_is_zero_at_the_teacher():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = logits_distillation_loss(student, teacher, mask=mask)
    per_token = _kl_div(teacher, student)
    torch.testing.assert_close(loss.double(), per_token[mask.bool()].mean(), rtol=1e-5, atol=1e-6)
    assert logits_distillation_loss(teacher, teacher).abs() < 1e-6
    with pytest.raises(ValueError, match=r"\(2, 4, 7\).*\(2, 4, 6\)"):
        logits_distillation_loss(student, teacher[..., :6])


def _relation_loss_by_hand(student, teacher, heads, causal):
    total = 0.0
    for s_states, t_states in zip(student, teacher, strict=True):
        b, t, d = s_states.shape
        dr = d // heads
        for bi in range(b):
            for h in range(heads):
                sa = s_states[bi, :, h * dr : (h + 1) * dr].double()
                ta = t_states[bi, :, h * dr : (h + 1) * dr].double()
                for row in range(t):
                    cols = slice(0, row + 1) if causal else slice(0, t)
                    rs = sa[row] @ sa[cols].T / dr**0.5
                    rt = ta[row] @ ta[cols].T / dr**0.5
                    total += _kl_div(rt, rs) / (b * heads * t)
    return total


@pytest.mark.parametrize("causal", [True, False])
def test_attention_relation_loss_matches_minilm_relations_written_out(causal):
    torch.manual_seed(2)
    widths = (8, 4, 4)  # q, and grouped-query k / v
    student = [torch.randn(2, 5, w, requires_grad=True) for w in widths]
    teacher = [torch.randn(2, 5, w) for w in widths]
    loss = attention_relation_loss(student, teacher, relation_heads=2, causal=causal)
    torch.testing.assert_close(loss.double(), _relation_loss_by_hand(student, teacher, 2, causal), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(s.grad.abs().sum() > 0 for s in student)
    assert attention_relation_loss(teacher, teacher, relation_heads=2, causal=causal).abs() < 1e-6


def test_attention_relation_loss_rejects_mismatched_states():
    with pytest.raises(ValueError, match="relation_heads=3 must divide the width 8"):
        attention_relation_loss([torch.randn(1, 2, 8)], [torch.randn(1, 2, 8)], relation_heads=3)
    with pytest.raises(ValueError, match=r"\(1, 2, 8\).*\(1, 2, 4\)"):
        attention_relation_loss([torch.randn(1, 2, 8)], [torch.randn(1, 2, 4)], relation_heads=2)


def test_projection_capture_records_outputs_and_removes_its_hooks():
    q, k = nn.Linear(4, 4), nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with ProjectionCapture([q, k]) as capture:
        q(x), k(x)
    torch.testing.assert_close(capture.states[0], F.linear(x, q.weight, q.bias))
    torch.testing.assert_close(capture.states[1], F.linear(x, k.weight, k.bias))
    assert not q._forward_hooks and not k._forward_hooks
    with pytest.raises(RuntimeError, match=r"modules \[1\] did not run"), ProjectionCapture([q, k]):
        q(x)


def test_attention_projections_are_the_layers_q_k_v_and_errors_name_it():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_seq_len=16))
    apply_bitnet_norms(model)  # NormedLinears are still the projections
    attention = model.layers[2].attention
    assert attention_projections(model, -1) == [attention.wq, attention.wk, attention.wv]
    with pytest.raises(IndexError, match="layer 3 of a model with 3 blocks"):
        attention_projections(model, 3)
    with pytest.raises(ValueError, match="^attention_projections: no transformer block of Sequential"):
        attention_projections(nn.Sequential(nn.Linear(4, 4)), 0)
