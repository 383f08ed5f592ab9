"""The fine-tuning recipe in the Hugging Face ``Trainer`` (docs/finetuning.md): a callback that drives quantization
warmup and a ``Trainer`` that distils from the full-precision teacher.

    student = AutoModelForCausalLM.from_pretrained(name)
    teacher = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).eval()
    apply_bitnet_norms(student, placement="subln")
    quantize_(student, bitnet_training(), filter_fn=quantize_filter)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                  callbacks=[QuantizationWarmupCallback(warmup_steps=200)])
    trainer.train()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..distill import ProjectionCapture, attention_projections, attention_relation_loss, logits_distillation_loss
from ..warmup import QuantizationWarmup


class QuantizationWarmupCallback(TrainerCallback):
    """:class:`~bitnet_ao.warmup.QuantizationWarmup` in the ``Trainer``: ``lambda = min(global_step /
    warmup_steps, 1)`` is set before every step from the Trainer's own step counter, so a run resumed from a
    checkpoint continues the warmup where it was, with nothing extra saved. It drives the model the Trainer
    passes at each step: a new one (``model_init``, a second ``Trainer`` given the same callback) gets its own
    warmup instead of running at ``lambda = 1`` while the old model is driven."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.warmup: QuantizationWarmup | None = None

    def on_step_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.warmup is None or self.warmup.models != (model,):
            self.warmup = QuantizationWarmup(model, self.warmup_steps, last_step=state.global_step)
        else:
            self.warmup.load_state_dict({"warmup_steps": self.warmup_steps, "last_step": state.global_step})


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss adds distillation from a frozen ``teacher`` (the full-precision model the student
    was converted from) to the student's own language-modelling loss:

    ``loss = lm_loss + logits_weight * T^2 KL(teacher || student) + attention_weight * relation_loss``

    Args:
        teacher: the full-precision model, same tokenizer; any dtype (bf16 halves its memory). Put in eval mode
            and never updated.
        temperature: ``T`` of the logits distillation.
        logits_weight: weight of the logits term (BitDistill uses 10).
        attention_weight: weight of the attention-relation term on one layer (0 turns it off).
        attention_layer: the transformer block whose q/k/v projections are distilled (BitDistill: a late one).
        relation_heads: heads the relations are split into; default: the model config's ``num_key_value_heads``.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        temperature: float = 1.0,
        logits_weight: float = 1.0,
        attention_weight: float = 0.0,
        attention_layer: int = -1,
        relation_heads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.logits_weight = logits_weight
        self.attention_weight = attention_weight
        self.attention_layer = attention_layer
        config = getattr(teacher, "config", None)
        self.relation_heads = relation_heads or getattr(config, "num_key_value_heads", None) or 1
        # The distillation terms are means over the batch: let the Trainer divide the total by the gradient
        # accumulation steps, as it does for losses that are not normalized by a token count.
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ):
        relations = self.attention_weight > 0
        student_capture = ProjectionCapture(attention_projections(model, self.attention_layer) if relations else [])
        teacher_capture = ProjectionCapture(
            attention_projections(self.teacher, self.attention_layer) if relations else []
        )
        with student_capture:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), teacher_capture:
            teacher_logits = self.teacher(**teacher_inputs).logits
        mask = inputs.get("attention_mask")
        loss = loss + self.logits_weight * logits_distillation_loss(
            outputs.logits, teacher_logits, self.temperature, mask
        )
        if relations:
            loss = loss + self.attention_weight * attention_relation_loss(
                student_capture.states, teacher_capture.states, self.relation_heads, mask=mask
            )
        return (loss, outputs) if return_outputs else loss
