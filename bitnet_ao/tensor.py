"""``BitNetTrainingLinearWeight``: the high-precision master weight that makes ``F.linear`` a BitNet linear.

The optimizer, ``.to()``, ``deepcopy`` and in-place updates see the master weight: every aten op is run on it,
and in-place ops write into it. Only ``F.linear`` is different: it runs the BitNet autograd function of
``linear.py``, which reaches the weight through the :class:`~bitnet_ao.linear.BitNetWeight` methods below (their
per-version caches: :meth:`BitNetTrainingLinearWeight._per_version`). FSDP2 finds its all-gather extension as the
methods ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` of the sharded local tensor; their math is
``bitnet_ao/fsdp_gather.py``. A merge into the weight (peft's LoRA merge) warns: ``merge_watch.py``.

Built by ``quantize_(model, bitnet_training())`` (``training.py``); state dicts hold it as a plain tensor
(``checkpoint_hooks.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import fsdp_gather, kernels, merge_watch
from .config import BitNetTrainingConfig
from .fsdp_gather import ScaleState
from .group_scales import scaled_mm_groups
from .linear import InputNorm
from .packed import BitNetPackedLinearWeight, pack_linear_weight
from .private_api import is_compiling_with_fake_tensors, is_mutable_op, make_wrapper_subclass, tree_map_only
from .weight_base import BitNetWeightTensor
from .weight_quant import WeightQuantization, quantize_weight, weight_quantization

aten = torch.ops.aten

# Ops whose result is the weight itself in another form (a copy, a view, another device or dtype): the result
# stays a BitNet weight so that module.to(), deepcopy, detach and FSDP's views keep the recipe.
_KEEP_SUBCLASS = {
    aten.detach.default,
    aten.alias.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.empty_like.default,
    aten.view.default,
    aten.t.default,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.as_strided.default,
    aten._pin_memory.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}


# Matmuls: F.linear never reaches them (__torch_function__ takes it first), so one arriving here is a decomposed
# F.linear, e.g. on a DTensor from a stock tensor-parallel style; running it would train in full precision.
_MATMULS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.matmul.default,
    aten.linear.default,
    aten.mv.default,
}


T = TypeVar("T")


class _StepValues(NamedTuple):
    """A master weight's quantization and its ``(N, K)`` int8 values, or, where the matmul takes its right operand
    packed (``kernels.prepacks_operand``), both its operands packed: ``W_q`` for ``grad_input`` and ``W_q.T`` for
    the forward (indexed by ``transpose``), one pass each while the values are in cache."""

    q: WeightQuantization
    values: Tensor | None
    packed: tuple[Tensor, Tensor] | None


class _OptimizerSteps:
    """How many optimizer steps this process has taken (a global post-step hook of ``torch.optim.Optimizer``,
    which every torch optimizer, fused and foreach ones included, and torchao's low-bit optimizers run)."""

    taken = 0

    @classmethod
    def count(cls, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        cls.taken += 1


_OPTIMIZER_STEPS = _OptimizerSteps
register_optimizer_step_post_hook(_OPTIMIZER_STEPS.count)


def _rebuild_bitnet_weight(
    data: Tensor, config: BitNetTrainingConfig, requires_grad: bool
) -> BitNetTrainingLinearWeight:
    """Unpickle a weight (its ``__reduce_ex__``): the constructor takes ``requires_grad`` from ``data``."""
    return BitNetTrainingLinearWeight(data, config).requires_grad_(requires_grad)


class BitNetTrainingLinearWeight(BitNetWeightTensor, rebuild=_rebuild_bitnet_weight):
    """A linear weight trained the BitNet way. Holds the master weight in ``_data`` and the recipe in ``config``.

    Build it with ``quantize_(model, bitnet_training())`` rather than directly.
    """

    _data: Tensor
    #: FSDP2, on the sharded local tensor: the all-reduced statistics of the whole weight this shard's all-gathers
    #: quantize with, read and written by ``bitnet_ao/fsdp_gather.py`` only (which says when they are reused).
    #: ``None`` until the first all-gather or precompute; views and copies start without one.
    _fsdp_scale_state: ScaleState | None = None

    @staticmethod
    def __new__(cls, data: Tensor, config: BitNetTrainingConfig) -> BitNetTrainingLinearWeight:
        return make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=data.device,
            layout=data.layout,
            requires_grad=data.requires_grad,
        )

    def __init__(self, data: Tensor, config: BitNetTrainingConfig) -> None:
        self._data = data
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r}, config={self.config})"

    def __tensor_flatten__(self) -> tuple[list[str], tuple[BitNetTrainingConfig]]:
        # lambda of quantization warmup is an inner tensor while it is set: torch.compile then sees it as a graph
        # input (a new value needs no recompile), and its presence, which picks the blend or the INT8 path, as
        # part of the weight's structure (a change recompiles once).
        inner = ["_data"] if self.quantization_strength is None else ["_data", "quantization_strength"]
        return inner, (self.config,)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, Tensor], meta: tuple, outer_size, outer_stride):
        weight = cls(inner["_data"], *meta)
        if "quantization_strength" in inner:
            weight.quantization_strength = inner["quantization_strength"]
        return weight

    def _cache_key_layout(self) -> tuple:
        # The master weight's strides: the matmul layouts are chosen from them. Warming up or not: the blend or
        # the INT8 path. The backend's operand choices for this device (on CPU: the int8 routes, measured or
        # forced): constants of the traced graph, which packs or transposes for one route what another cannot read.
        data = self._data
        return (
            data.stride(),
            self.quantization_strength is not None,
            kernels.prepacks_operand(data, True),
            kernels.prepacks_operand(data, False),
            kernels.right_operand_k_contiguous(data),
            kernels.right_operand_either_layout(data),
        )

    def _rewrap(self, data: Tensor) -> BitNetTrainingLinearWeight:
        """``data`` (this weight copied, viewed or moved) as a weight with this recipe and, during quantization
        warmup, this ``lambda``: ``module.to(dtype)``, ``.half()``, ``load_state_dict(assign=True)`` and FSDP2's
        shards keep blending at the warmup's strength instead of silently falling back to ``lambda = 1``."""
        weight = type(self)(data, self.config)
        strength = self.quantization_strength
        if strength is not None:
            # Another device gets a copy (QuantizationWarmup attaches its own there at its next update); a meta
            # lambda has no value to copy and stays meta, so a forward fails until then.
            moved = strength.device != data.device and not strength.is_meta
            weight.quantization_strength = strength.to(data.device) if moved else strength
        return weight

    def _rebuild_args(self) -> tuple[Tensor, BitNetTrainingConfig, bool]:
        # Pickled as (master weight, config, requires_grad), rebuilt by _rebuild_bitnet_weight.
        return (self._data, self.config, self.requires_grad)

    # --- the BitNetWeight interface of the autograd function (bitnet_ao/linear.py) ---------------------------

    def bitnet_quantization(self) -> WeightQuantization:
        step = self._step_values()
        return step.q if step is not None else weight_quantization(self._data, self.config)

    def bitnet_int8(self, q: WeightQuantization) -> Tensor:
        return quantize_weight(self._data, q, weights=self.config.weights, transpose=False)

    def bitnet_mm(
        self,
        a: Tensor,
        q: WeightQuantization,
        *,
        transpose: bool,
        row_scale: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        # The right operand b is W_q.T (forward) or W_q (grad_input). Write it straight in the layout the backend's
        # matmul is fastest with (docs/numerics.md#matmul-layouts): a transposed view of a row-major tensor
        # (contiguous along the reduction dim) for oneDNN and Triton; for torch._int_mm on CPU, which takes either
        # at the same speed, whichever needs no transposition (a transposing write costs 4-7x a plain one).
        w = self._data
        step = self._step_values()
        if step is not None and step.q.scale is q.scale and step.packed is not None:  # the forward's, packed
            return kernels.scaled_int8_mm_prepacked(
                a, step.packed[transpose], self.shape[0] if transpose else self.shape[1], row_scale=row_scale,
                col_scale=None, scale=q.scale, bias=bias, out_dtype=out_dtype, b_ternary=True,
            )  # fmt: skip
        if step is not None and step.q.scale is q.scale:  # the forward's quantization: its values, no new pass
            b = step.values.t() if transpose else step.values
            return scaled_mm_groups(
                a, b, row_scale=row_scale, q=q, config=self.config, transpose=transpose, bias=bias, out_dtype=out_dtype
            )
        k_contiguous = transpose if kernels.right_operand_either_layout(w) else kernels.right_operand_k_contiguous(w)
        if k_contiguous:
            b = quantize_weight(w, q, weights=self.config.weights, transpose=not transpose).t()
        else:
            b = quantize_weight(w, q, weights=self.config.weights, transpose=transpose)
        return scaled_mm_groups(
            a,
            b,
            row_scale=row_scale,
            q=q,
            config=self.config,
            transpose=transpose,
            bias=bias,
            out_dtype=out_dtype,
        )

    def bitnet_forward(
        self, x2: Tensor, *, norm: InputNorm | None, bias: Tensor | None, out_dtype: torch.dtype
    ) -> Tensor | None:
        """Without a gradient (evaluation, generation during training) on CPU: the packed forward of
        :meth:`prepared`, the same numbers as the general path (the packed weight's contract) without quantizing
        the master weight again for every call: a decode step is one C call per linear. ``None`` (the general
        path) for group scales, on other devices, and while torch.compile traces (it fuses the quantization)."""
        if self.config.grouped or self.device.type != "cpu" or is_compiling_with_fake_tensors():
            return None
        return self.prepared().bitnet_forward(x2, norm=norm, bias=bias, out_dtype=out_dtype)

    def _step_values(self) -> _StepValues | None:
        """The quantization and ``(N, K)`` int8 values of this weight as it is now, made once and shared by the
        forward and ``grad_input`` of every micro-step until the weight changes (:meth:`_version_key`), where one
        tensor serves both matmuls: a backend that takes either layout of the right operand (``torch._int_mm``), or
        one that takes it packed (route ``vnni``: both layouts packed once, then no packing in either matmul).
        ``None`` elsewhere, for group scales, while torch.compile traces (it fuses the ternarization), and in
        inference mode (its tensors could not be saved for a later training step's backward)."""
        w = self._data
        if (
            self.config.grouped
            or is_compiling_with_fake_tensors()
            or torch.is_inference_mode_enabled()
            or not kernels.right_operand_either_layout(w)
        ):
            return None

        def build() -> _StepValues:
            q = weight_quantization(w, self.config)
            packs = kernels.prepacks_operand(w, b_ternary=True)
            if packs and self.config.weights == "ternary":
                return _StepValues(q, None, kernels.ternarize_packed(w, q.scale))  # one pass over the master weight
            values = quantize_weight(w, q, weights=self.config.weights, transpose=False)
            if packs:  # binary values
                return _StepValues(
                    q, None, (kernels.pack_operand(values, True), kernels.pack_operand(values.t(), True))
                )
            return _StepValues(q, values, None)

        return self._per_version("_step", build)

    def _version_key(self) -> tuple:
        """What changes whenever this weight's values may have: every optimizer step (any ``torch.optim.Optimizer``:
        torch 2.13's fused AdamW updates a weight without advancing its version counter), every in-place change of
        the weight or of its master tensor (``__torch_dispatch__`` advances the master's: ``load_state_dict``,
        ``copy_``, ``mul_``, ``.data`` edits), a new master tensor."""
        return (_OPTIMIZER_STEPS.taken, self._version, self._data._version, self._data.data_ptr(), self._data.dtype)

    def _per_version(self, name: str, build: Callable[[], T]) -> T:
        """``build()``, made once and kept in the attribute ``name`` until :meth:`_version_key` changes."""
        key = self._version_key()
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self.__dict__[name] = cached
        return cached[1]

    def prepared(self) -> BitNetPackedLinearWeight:
        """This weight quantized and packed, made once and reused until the weight changes (:meth:`_version_key`)."""
        return self._per_version("_prepared", lambda: pack_linear_weight(self._data.detach(), self.config))

    # --- FSDP2 all-gather extension (the math: bitnet_ao/fsdp_gather.py) ----------------------------------

    def fsdp_pre_all_gather(self, mesh: DeviceMesh) -> tuple[tuple[Tensor], tuple[Tensor, int]]:
        """This shard quantized with the whole weight's scale and packed: 1/8 of the BF16 bytes on the wire.
        FSDP2's mesh-only form on purpose: with the five-argument one, torch 2.13 requires every all-gather input
        of an unevenly sharded weight to have the padded shard's ``(rows, K)`` shape, which no packed input has."""
        return fsdp_gather.pre_all_gather(self, mesh)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[Tensor, ...],
        metadata: tuple[Tensor, int],
        param_dtype: torch.dtype,
        *,
        out: Tensor | None = None,
    ) -> tuple[BitNetPackedLinearWeight, tuple[Tensor, ...]] | None:
        """The gathered bytes as the unsharded weight, a :class:`BitNetPackedLinearWeight` (no copy)."""
        return fsdp_gather.post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    # --- torch function / dispatch ------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is Tensor.untyped_storage and not is_compiling_with_fake_tensors():
            # A wrapper has no storage of its own; eager checkpointers (torchtitan's) compare storages to find
            # shared tensors, and the storage that matters is the master weight's. torch.compile, which builds
            # fake tensors from the wrapper's own (empty) storage, keeps seeing that one.
            return args[0]._data.untyped_storage()
        if func in merge_watch.WATCHED:  # a merge into the master weight (peft's LoRA merge) warns
            return merge_watch.torch_function(cls, func, types, args, kwargs or {})
        return super().__torch_function__(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            weight = next(a for a in args if isinstance(a, cls))
            raise RuntimeError(
                f"BitNetTrainingLinearWeight (shape {tuple(weight.shape)}): {func} would multiply by the "
                "full-precision master weight. This is F.linear taken apart, typically on a DTensor from a stock "
                "tensor-parallel style: use bitnet_ao.tensor_parallel.BitNetColwiseParallel / BitNetRowwiseParallel "
                "(docs/tensor_parallel.md). For a deliberate full-precision product, use the plain master weight "
                "(unquantize_ or weight._data)."
            )
        out = func(*tree_map_only(cls, _unwrap, args), **tree_map_only(cls, _unwrap, kwargs))
        if is_mutable_op(func) and not is_compiling_with_fake_tensors():
            # Below autograd nothing advances the master tensor's version counter, and a weight changed through
            # ``.data`` (whose own counter is a fresh one) would leave a prepared weight stale: advance it here.
            tree_map_only(cls, lambda w: torch.autograd.graph.increment_version(w._data), (args, kwargs))
        if is_mutable_op(func) and isinstance(args[0], cls):
            # In-place update (optimizer step, copy_ from load_state_dict): the wrapper, with its own recipe,
            # is the result; a checkpoint carries weights, not the recipe.
            return args[0]
        if func in _KEEP_SUBCLASS:
            # All of these are unary in the weight: the result keeps its recipe (and lambda of warmup).
            return tree_map_only(Tensor, args[0]._rewrap, out)
        return out


def _unwrap(t: BitNetTrainingLinearWeight) -> Tensor:
    return t._data
