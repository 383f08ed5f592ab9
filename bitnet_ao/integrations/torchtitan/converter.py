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
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard
from torchao.quantization import quantize_
from torchtitan.components.quantization import QuantizationConverter
from torchtitan.config.override import derive
from torchtitan.distributed.parallel_dims import MeshAxisName
from torchtitan.distributed.utils import get_spmd_backend
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module
from torchtitan.tools.logging import logger

from bitnet_ao.config import BitNetTrainingConfig
from bitnet_ao.tensor_parallel import (
    column_parallel_linear,
    row_parallel_partial,
    shard_bitnet_weight,
    tensor_parallel_group_dim,
)

#: Output heads stay in high precision (the BitNet recipe); torchtitan 0.3.0 names Llama's head ``lm_head``.
DEFAULT_FILTER_FQNS = ("lm_head",)


class BitNetLinear(Linear):
    """A torchtitan ``Linear`` whose weight is a ``BitNetTrainingLinearWeight``.

    Everything else (``forward``, ``reset_parameters``, ``param_init``, state-dict keys) is the stock
    ``Linear``: the weight subclass alone turns ``F.linear`` into the INT8 BitNet linear.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        """``Linear.Config`` plus the BitNet recipe of this linear."""

        bitnet: BitNetTrainingConfig = field(default_factory=BitNetTrainingConfig)

    def __init__(self, config: Config):
        super().__init__(config)
        # The same handler as a user's quantize_(model, bitnet_training()), so both paths make one weight.
        quantize_(self, config.bitnet, filter_fn=lambda module, fqn: module is self)

    def parallelize(self, parallel_dims) -> None:
        """Tensor parallelism: shard the weight along the dimension the model's sharding config gives it (rows for
        column-parallel, columns for row-parallel), with the local shard a BitNet weight holding its own scale
        groups (docs/tensor_parallel.md), then let torchtitan do the rest (input/output redistribution; it skips
        an already distributed weight). ``forward`` then runs the BitNet linear on the local shard."""
        cfg = self._sharding_config
        if parallel_dims.tp_enabled and cfg is not None:
            if get_spmd_backend() != "partial_dtensor":
                raise ValueError(
                    "BitNetLinear supports tensor parallelism with parallelism.spmd_backend='partial_dtensor' "
                    f"(got {get_spmd_backend()!r})"
                )
            weight, mesh = self.weight, parallel_dims.get_mesh("tp")
            shard_dim = cfg.state_shardings["weight"].per_axis_spmd_types()[MeshAxisName.TP].dim
            config = weight.config
            if config.group_dim != shard_dim or config.scale_groups % mesh.size():
                raise ValueError(
                    f"BitNetLinear (nn.Linear(in_features={self.in_features}, out_features={self.out_features})) "
                    f"is sharded along dim {shard_dim} by tensor parallelism of degree {mesh.size()}, so its BitNet "
                    f"weight needs group_dim={shard_dim} and scale_groups a multiple of {mesh.size()}; it has "
                    f"{config}. Set BitNetConverter.Config(scale_groups=...)."
                )
            if self.bias is not None:
                raise ValueError("BitNetLinear: tensor parallelism of a BitNet linear with a bias is not supported")
            self.weight = nn.Parameter(shard_bitnet_weight(weight, mesh, shard_dim), requires_grad=weight.requires_grad)
            self._tp_shard_dim = shard_dim
        super().parallelize(parallel_dims)

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        if not isinstance(weight, DTensor) or getattr(self, "_tp_shard_dim", None) is None:
            return F.linear(input, weight, self.bias)
        # Tensor parallel: F.linear on the DTensor would be taken apart into a plain matmul of the master weight,
        # so compute on the local shard and hand torchtitan the DTensor layout it expects.
        if self._tp_shard_dim == 0:
            y = column_parallel_linear(input, weight, None)
            return DTensor.from_local(y, weight.device_mesh, [Shard(y.dim() - 1)], run_check=False)
        return row_parallel_partial(input, weight)


class BitNetConverter(QuantizationConverter):
    """Swap the selected ``Linear.Config`` entries of a torchtitan model config for ``BitNetLinear.Config``.

    Used like torchtitan's own quantization converters::

        model_registry("8B", converters=[BitNetConverter.Config()])
    """

    @dataclass(kw_only=True, slots=True)
    class Config(QuantizationConverter.Config):
        fqns: list[str] = field(default_factory=list)
        """Convert only linears whose FQN contains one of these strings; empty converts every linear."""

        filter_fqns: list[str] = field(default_factory=lambda: list(DEFAULT_FILTER_FQNS))
        """Never convert linears whose FQN contains one of these strings (wins over ``fqns``). The default
        keeps the output head in high precision, as the BitNet recipe does."""

        int8_grad_input: bool = True
        """``bitnet_training(int8_grad_input=...)``: INT8 matmul for the input gradient."""

        int8_grad_weight: bool = True
        """``bitnet_training(int8_grad_weight=...)``: INT8 matmul for the weight gradient."""

        weights: Literal["ternary", "binary"] = "ternary"
        """``bitnet_training(weights=...)``: BitNet b1.58 ternary weights or the original binary ones."""

        scale_groups: int = 1
        """``bitnet_training(scale_groups=...)``, each linear grouped along its tensor-parallel dimension (rows
        for wq/wk/wv/w1/w3, columns for wo/w2): needed for tensor parallelism (a multiple of its degree), and
        gives the same numbers for any TP degree dividing it (docs/tensor_parallel.md)."""

    def __init__(self, config: Config):
        self.config = config
        # Validates the options here, at config time, not when the first linear is built.
        self.bitnet = BitNetTrainingConfig(
            int8_grad_input=config.int8_grad_input,
            int8_grad_weight=config.int8_grad_weight,
            weights=config.weights,
            scale_groups=config.scale_groups,
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
            new_config = derive(linear_config, BitNetLinear.Config, bitnet=recipe)
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
