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

from dataclasses import dataclass, field
from typing import Literal

from torchao.quantization import quantize_
from torchtitan.components.quantization import QuantizationConverter
from torchtitan.config.override import derive
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module
from torchtitan.tools.logging import logger

from bitnet_ao.config import BitNetTrainingConfig

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
        # Tensor parallelism shards the weight into DTensors whose F.linear runs as plain aten matmuls on the
        # local master weight: training would silently fall back to high precision. Also, one abs-mean scale
        # per whole weight needs an all-reduce per layer under TP
        # (docs/numerics.md#group-scales-for-tensor-parallelism).
        if parallel_dims.tp_enabled:
            raise ValueError(
                "BitNetLinear does not support tensor parallelism (parallelism.tensor_parallel_degree="
                f"{parallel_dims.tp}): its weight scale is the abs-mean of the whole weight. Use FSDP "
                "(data_parallel_shard_degree) instead."
            )
        super().parallelize(parallel_dims)


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

    def __init__(self, config: Config):
        self.config = config
        # Validates the options here, at config time, not when the first linear is built.
        self.bitnet = BitNetTrainingConfig(
            int8_grad_input=config.int8_grad_input,
            int8_grad_weight=config.int8_grad_weight,
            weights=config.weights,
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
            new_config = derive(linear_config, BitNetLinear.Config, bitnet=self.bitnet)
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
