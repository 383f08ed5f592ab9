"""torchtitan job configs that train Llama 3 the BitNet way.

    torchrun --nproc_per_node=8 -m torchtitan.train \
        --module bitnet_ao.integrations.torchtitan --config llama3_8b_bitnet

Each config is torchtitan's own Llama 3 config with two changes: the model is built through
:class:`BitNetConverter` (every linear but ``lm_head`` gets a BitNet weight) and the model spec's
``post_optimizer_build_fn`` recomputes the BitNet weight scales after each optimizer step.
"""

from __future__ import annotations

from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import llama3_8b, llama3_debugmodel
from torchtitan.trainer import Trainer

from .converter import BitNetConverter
from .hooks import register_bitnet_scale_hook


def _to_bitnet(config: Trainer.Config, flavor: str, **converter: object) -> Trainer.Config:
    """Rebuild ``config``'s Llama 3 model spec of ``flavor`` with BitNet linears and the scale hook."""
    model_spec = model_registry(flavor, converters=[BitNetConverter.Config(**converter)])
    model_spec.post_optimizer_build_fn = register_bitnet_scale_hook
    config.model_spec = model_spec
    return config


def llama3_debugmodel_bitnet() -> Trainer.Config:
    """torchtitan's ``llama3_debugmodel`` (6 layers, dim 256) with BitNet linears."""
    return _to_bitnet(llama3_debugmodel(), "debugmodel")


def llama3_debugmodel_bitnet_tp() -> Trainer.Config:
    """``llama3_debugmodel_bitnet`` with tensor parallelism of degree 2 (sequence parallel, torchtitan's default)
    and 2 scale groups per linear along its TP dimension (docs/tensor_parallel.md). torchrun with 2 processes per
    TP group; raise ``tensor_parallel_degree`` only together with a ``scale_groups`` it divides."""
    config = _to_bitnet(llama3_debugmodel(), "debugmodel", scale_groups=2)
    config.parallelism.tensor_parallel_degree = 2
    config.parallelism.spmd_backend = "partial_dtensor"
    return config


def llama3_8b_bitnet() -> Trainer.Config:
    """torchtitan's ``llama3_8b`` with BitNet linears."""
    return _to_bitnet(llama3_8b(), "8B")
