"""BitNet linears for torchtitan 0.3.0: a ``Linear.Config`` subclass and the converter that swaps it in.

torchtitan 0.3.0 quantizes by rewriting the model *config* before the model is built (its float8, MXFP8 and
NVFP4 converters swap ``Linear.Config`` for their own linear's config), so BitNet does the same: the
converter replaces each selected ``Linear.Config`` with a :class:`BitNetLinear.Config`, and
``BitNetLinear.__init__`` gives the freshly built linear a :class:`~bitnet_ao.BitNetTrainingLinearWeight`.

The weight is created inside the trainer's ``torch.device("meta")`` build and survives the rest of the
pipeline unchanged: ``to_empty`` goes through the subclass's ``empty_like`` (the result stays a BitNet
weight), and the in-place init ops (``trunc_normal_``) and checkpoint loads (``copy_``) write into the
master weight through ``__torch_dispatch__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import get_type_hints

import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torchao.quantization import quantize_
from torchtitan.components.quantization import QuantizationConverter
from torchtitan.config.override import derive
from torchtitan.distributed.parallel_dims import MeshAxisName
from torchtitan.distributed.utils import get_spmd_backend
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module
from torchtitan.tools.logging import logger

from bitnet_ao.config import BitNetTrainingConfig
from bitnet_ao.layouts import TORCHTITAN, Role
from bitnet_ao.private_api import torchtitan_sharding_config
from bitnet_ao.tensor_parallel import local_shard_linear, shard_bitnet_linear, tensor_parallel_group_dim

#: Output heads stay in high precision (the BitNet recipe): torchtitan's Llama 3 head.
DEFAULT_FILTER_FQNS = (TORCHTITAN.path(Role.OUTPUT),)
#: The recipe fields the converter does not offer: each linear's group dimension is its tensor-parallel one.
_PER_LINEAR_FIELDS = ("group_dim",)


class BitNetLinear(Linear):
    """A torchtitan ``Linear`` whose weight is a ``BitNetTrainingLinearWeight``.

    Everything else (``forward``, ``reset_parameters``, ``param_init``, state-dict keys) is the stock
    ``Linear``: the weight subclass alone turns ``F.linear`` into the INT8 BitNet linear.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        """``Linear.Config`` plus the BitNet recipe of this linear."""

        bitnet: BitNetTrainingConfig = field(default_factory=BitNetTrainingConfig)
        quantization_warmup_steps: int = 0
        """Optimizer steps of quantization warmup (``bitnet_ao.warmup``), driven by the post-optimizer hook."""

    #: The weight dimension tensor parallelism shards (``parallelize``), ``None`` without tensor parallelism.
    _tp_shard_dim: int | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        self.quantization_warmup_steps = config.quantization_warmup_steps
        # The same handler as a user's quantize_(model, bitnet_training()), so both paths make one weight.
        quantize_(self, config.bitnet, filter_fn=lambda module, fqn: module is self)

    def parallelize(self, parallel_dims) -> None:
        """Tensor parallelism: shard the weight along the dimension the model's sharding config gives it (rows for
        column-parallel, columns for row-parallel), with the local shard a BitNet weight holding its own scale
        groups (docs/tensor_parallel.md), then let torchtitan do the rest (input/output redistribution; it skips
        an already distributed weight). ``forward`` then runs the BitNet linear on the local shard."""
        sharding = torchtitan_sharding_config(self)
        if parallel_dims.tp_enabled and sharding is not None:
            if get_spmd_backend() != "partial_dtensor":
                raise ValueError(
                    "BitNetLinear supports tensor parallelism with parallelism.spmd_backend='partial_dtensor' "
                    f"(got {get_spmd_backend()!r})"
                )
            if self.bias is not None:
                raise ValueError("BitNetLinear: tensor parallelism of a BitNet linear with a bias is not supported")
            shard_dim = sharding.state_shardings["weight"].per_axis_spmd_types()[MeshAxisName.TP].dim
            remedy = "set BitNetConverter.Config(scale_groups=...) to a multiple of tensor_parallel_degree"
            shard_bitnet_linear(self, parallel_dims.get_mesh("tp"), shard_dim, who="BitNetLinear", remedy=remedy)
            self._tp_shard_dim = shard_dim
        super().parallelize(parallel_dims)

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        if not isinstance(weight, DTensor) or self._tp_shard_dim is None:
            return F.linear(input, weight, self.bias)
        return local_shard_linear(input, weight, self._tp_shard_dim)


def _recipe_options(base: type) -> type:
    """``base`` plus the ``bitnet_training`` options as fields: one per ``BitNetTrainingConfig`` field (its name,
    type, default and ``help``), but those set per linear."""
    hints = get_type_hints(BitNetTrainingConfig)
    options = [
        (f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(BitNetTrainingConfig)
        if f.name not in _PER_LINEAR_FIELDS
    ]
    namespace = {"__module__": __name__}
    return dataclasses.make_dataclass(
        "RecipeOptions", options, bases=(base,), namespace=namespace, kw_only=True, slots=True
    )


class BitNetConverter(QuantizationConverter):
    """Swap the selected ``Linear.Config`` entries of a torchtitan model config for ``BitNetLinear.Config``.

    Used like torchtitan's own quantization converters::

        model_registry("8B", converters=[BitNetConverter.Config()])
    """

    @dataclass(kw_only=True, slots=True)
    class Config(_recipe_options(QuantizationConverter.Config)):
        """The linears to convert, and the ``bitnet_training`` options ``int8_grad_input``, ``int8_grad_weight``,
        ``weights`` and ``scale_groups`` (``BitNetTrainingConfig``'s fields, with their defaults). With
        ``scale_groups``, each linear is grouped along its tensor-parallel dimension (rows for the attention and
        MLP inputs, columns for the row-parallel roles of ``bitnet_ao.layouts``): needed for tensor parallelism (a
        multiple of its degree), and gives the same numbers for any TP degree dividing it
        (docs/tensor_parallel.md)."""

        fqns: list[str] = field(default_factory=list)
        """Convert only linears whose FQN contains one of these strings; empty converts every linear."""

        filter_fqns: list[str] = field(default_factory=lambda: list(DEFAULT_FILTER_FQNS))
        """Never convert linears whose FQN contains one of these strings (wins over ``fqns``). The default
        keeps the output head in high precision, as the BitNet recipe does."""

        quantization_warmup_steps: int = 0
        """Fine-tuning a pretrained checkpoint: blend full precision into BitNet over this many optimizer steps
        (``bitnet_ao.warmup.QuantizationWarmup``, run by ``register_bitnet_scale_hook``); 0 trains BitNet from
        the first step. Not under FSDP2, whose all-gather is already ternary (docs/finetuning.md)."""

    def __init__(self, config: Config):
        self.config = config
        # Validates the options here, at config time, not when the first linear is built.
        self.bitnet = BitNetTrainingConfig(
            **{
                f.name: getattr(config, f.name)
                for f in dataclasses.fields(BitNetTrainingConfig)
                if f.name not in _PER_LINEAR_FIELDS
            }
        )

    def _selected(self, fqn: str) -> bool:
        if any(skip in fqn for skip in self.config.filter_fqns):
            return False
        return not self.config.fqns or any(want in fqn for want in self.config.fqns)

    def convert(self, model_config: Module.Config) -> Module.Config:
        converted = []
        for fqn, linear_config, parent, attr in model_config.traverse(Linear.Config):
            if not self._selected(fqn):
                continue
            if type(linear_config) is not Linear.Config:
                # A subclass changes forward or sharding (torchtitan's TP bias scaling, async-TP GEMMs) or is
                # already another converter's linear: replacing it would drop that behaviour silently.
                raise ValueError(
                    f"BitNetConverter: {fqn or 'the model'} is a {type(linear_config).__qualname__}, not a plain "
                    "Linear.Config; only plain linears can become BitNet linears. Exclude it with "
                    "filter_fqns, or apply BitNetConverter once and before other linear converters."
                )
            recipe = self.bitnet
            if recipe.grouped:
                recipe = dataclasses.replace(recipe, group_dim=tensor_parallel_group_dim(fqn))
            new_config = derive(
                linear_config,
                BitNetLinear.Config,
                bitnet=recipe,
                quantization_warmup_steps=self.config.quantization_warmup_steps,
            )
            if parent is None:
                model_config = new_config
            elif isinstance(parent, list):
                parent[attr] = new_config
            else:
                setattr(parent, attr, new_config)
            converted.append(fqn)
        if not converted:
            raise ValueError(
                f"BitNetConverter: no Linear.Config matched fqns={self.config.fqns} with "
                f"filter_fqns={self.config.filter_fqns}; nothing would be trained the BitNet way."
            )
        logger.info(f"BitNet ({self.bitnet}): converted {len(converted)} linears to BitNetLinear")
        return model_config
