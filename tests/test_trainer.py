"""The fine-tuning recipe in the stock Hugging Face Trainer (bitnet_ao/integrations/trainer.py): the warmup callback
follows the Trainer's step (also when resuming), and the distillation loss is the LM loss plus torch's own KL."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchao.quantization import quantize_

transformers = pytest.importorskip("transformers")

from bitnet_ao import bitnet_training  # noqa: E402
from bitnet_ao.integrations.trainer import DistillationTrainer, QuantizationWarmupCallback  # noqa: E402
from bitnet_ao.layouts import quantize_filter  # noqa: E402
from tests.conftest import master_tensor  # noqa: E402

VOCAB = 64


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


class _Tokens(Dataset):
    def __init__(self, n: int = 16, length: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def _args(tmp_path, steps: int, **overrides) -> transformers.TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**options, **overrides})


def _strength(weight: torch.Tensor) -> float:
    """lambda of a BitNet weight as a number: 1 where it has none (the INT8 path)."""
    return 1.0 if weight.quantization_strength is None else float(weight.quantization_strength)


class _StrengthProbe(transformers.TrainerCallback):
    """Reads lambda of one BitNet weight at every step, after the warmup callback set it."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.seen.append(_strength(model.model.layers[0].self_attn.q_proj.weight))


def test_warmup_callback_follows_the_trainers_step_and_resumes(tmp_path):
    student = _llama()
    quantize_(student, bitnet_training(), filter_fn=quantize_filter)
    probe = _StrengthProbe()
    trainer = transformers.Trainer(
        model=student,
        args=_args(tmp_path, steps=5),
        train_dataset=_Tokens(),
        callbacks=[QuantizationWarmupCallback(warmup_steps=4), probe],
    )
    trainer.train()
    assert probe.seen == [0.0, 0.25, 0.5, 0.75, 1.0]

    # A resumed run restores global_step; the callback derives lambda from it, with no state of its own.
    resumed = QuantizationWarmupCallback(warmup_steps=4)
    state = transformers.TrainerState(global_step=2)
    resumed.on_step_begin(trainer.args, state, trainer.control, model=student)
    assert _strength(student.model.layers[1].mlp.down_proj.weight) == 0.5


def test_warmup_callback_drives_each_new_model_and_a_resumed_run_ends_on_the_uninterrupted_weights(tmp_path):
    """One callback, two ``train()`` calls of a ``model_init`` Trainer, each on a fresh model: the second model is
    warmed up too (not left at lambda = 1 while the callback keeps driving the first). It resumes from the first
    run's step-2 checkpoint, continues at lambda 0.5, 0.75 and ends on the uninterrupted run's weights, bit for
    bit."""

    def model_init() -> transformers.LlamaForCausalLM:
        model = _llama()
        quantize_(model, bitnet_training(), filter_fn=quantize_filter)
        return model

    probe = _StrengthProbe()
    trainer = transformers.Trainer(
        model_init=model_init,
        args=_args(tmp_path, steps=4, save_strategy="steps", save_steps=2),
        train_dataset=_Tokens(),
        callbacks=[QuantizationWarmupCallback(warmup_steps=4), probe],
    )
    trainer.train()
    first = trainer.model
    uninterrupted = {name: master_tensor(p).detach().clone() for name, p in first.named_parameters()}
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.model is not first
    assert probe.seen == [0.0, 0.25, 0.5, 0.75, 0.5, 0.75]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(master_tensor(p), uninterrupted[name]), name


def test_distillation_loss_is_lm_loss_plus_temperature_scaled_kl(tmp_path):
    teacher = _llama().to(torch.bfloat16)
    student = copy.deepcopy(teacher).float()
    quantize_(student, bitnet_training(), filter_fn=quantize_filter)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        temperature=2.0,
        logits_weight=3.0,
        args=_args(tmp_path, steps=1),
        train_dataset=_Tokens(),
    )
    batch = {k: torch.stack([_Tokens()[i][k] for i in range(2)]) for k in ("input_ids", "attention_mask", "labels")}
    batch["attention_mask"][1, -3:] = 0
    loss = trainer.compute_loss(student, batch)

    with torch.no_grad():
        out = student(**batch)
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        kl = F.kl_div(
            F.log_softmax(out.logits.float() / 2, -1),
            F.log_softmax(t_logits / 2, -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        mask = batch["attention_mask"].bool()
        expected = out.loss + 3.0 * 4.0 * kl[mask].mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)


def test_distillation_trainer_trains_with_attention_relations(tmp_path):
    teacher = _llama()
    student = copy.deepcopy(teacher)
    quantize_(student, bitnet_training(), filter_fn=quantize_filter)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        attention_weight=1.0,
        args=_args(tmp_path, steps=3),
        train_dataset=_Tokens(),
        callbacks=[QuantizationWarmupCallback(warmup_steps=2)],
    )
    before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, student.model.layers[0].self_attn.q_proj.weight.detach())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert trainer.relation_heads == 2  # the teacher's num_key_value_heads
