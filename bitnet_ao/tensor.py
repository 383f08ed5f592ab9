"""``BitNetTrainingLinearWeight``: the high-precision master weight that makes ``F.linear`` a BitNet linear, and
the ``quantize_`` handler that builds it.

The optimizer, ``.to()``, ``deepcopy`` and in-place updates see the master weight: every aten op is run on it,
and in-place ops write into it. Only ``F.linear`` is different: it runs the BitNet autograd function of
``linear.py``, which reaches the weight through the :class:`~bitnet_ao.linear.BitNetWeight` methods below.
State dicts hold the master weight as a plain tensor (see "checkpoints" below). FSDP2 finds its all-gather
extension as the methods ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` of the sharded local tensor; their
math is ``bitnet_ao/fsdp_gather.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torchao.quantization.transform_module import register_quantize_module_handler

from . import fsdp_gather, kernels
from .config import BitNetInferenceConfig, BitNetTrainingConfig
from .fsdp_gather import ScaleState
from .linear import InputNorm, scaled_mm_groups
from .packed import BitNetPackedLinearWeight, pack_linear_weight
from .private_api import (
    dtensor_local,
    is_compiling_with_fake_tensors,
    is_mutable_op,
    make_wrapper_subclass,
    module_hook_wrapper,
    observe_quantize_,
    tree_map_only,
)
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
    """A master weight's quantization and its ``(N, K)`` int8 values."""

    q: WeightQuantization
    values: Tensor


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

    def _cache_key_layout(self) -> tuple[tuple[int, ...], bool]:
        # The master weight's strides: the matmul layouts are chosen from them. Warming up or not: the blend or
        # the INT8 path.
        return (self._data.stride(), self.quantization_strength is not None)

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
        tensor serves both matmuls: a backend that takes either layout of the right operand (``torch._int_mm``).
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
            return _StepValues(q, quantize_weight(w, q, weights=self.config.weights, transpose=False))

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
        if func in (_DATA_GET, _DATA_SET) or func in _IN_PLACE_SUMS or func is Tensor.clone:
            return _merge_watch(cls, func, types, args, kwargs or {})
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


# --- merging into a master weight (peft's LoRA merge) -----------------------------------------------------
# peft merges an adapter with ``base.weight.data += delta`` (unmerge: ``-=``; safe_merge: ``w = base.weight.data
# .clone(); w += delta; base.weight.data = w``). Into a BitNet master weight the sum is re-ternarized at every
# forward: the layer computes ternary(W + dW), not ternary(W) + dW, and the merged model is not the adapted one.
# That is worth a warning with the measured change, but only there: an optimizer step (``param.add_``,
# ``addcdiv_``, ``_foreach_*``, torchao's ``copy_``) and ``load_state_dict`` (``copy_``) never assign ``.data``,
# and old-style optimizers that do ``p.data.add_`` never assign it back. So: a sum into a ``.data`` alias (or a
# clone of one) is measured, and the warning is given when such a tensor is assigned to ``.data``.

_DATA_GET, _DATA_SET = Tensor.data.__get__, Tensor.data.__set__
_IN_PLACE_SUMS = {Tensor.add_: 1.0, Tensor.sub_: -1.0}


def _effective_weight(data: Tensor, config: BitNetTrainingConfig) -> tuple[Tensor, Tensor]:
    """The weight a BitNet linear computes with, as float32 ``W_q * s_w``, and its int8 values ``W_q``."""
    q = weight_quantization(data, config)
    values = quantize_weight(data, q, weights=config.weights, transpose=False)
    return values.float() * q.scale, values


def _merge_note(weight: BitNetTrainingLinearWeight, delta: Tensor) -> str:
    """What adding ``delta`` to the master weight does to the weight the layer computes with, in words."""
    data = weight._data.detach()
    delta = delta.detach().float()
    before, values_before = _effective_weight(data, weight.config)
    after, values_after = _effective_weight((data.float() + delta).to(data.dtype), weight.config)
    error = (after - (before + delta)).abs().max().item() if delta.numel() else 0.0
    changed = int((values_before != values_after).sum())
    return (
        f"bitnet_ao: a sum into the master weight of a BitNet linear (shape {tuple(data.shape)}), as peft's LoRA "
        "merge/unmerge does: the sum is re-ternarized at every forward, so the layer computes ternary(W + dW), not "
        f"ternary(W) + dW. Merging into a ternary weight is lossy: here the effective weight ends up to {error:.3g} "
        f"away from the exact sum (|dW| up to {delta.abs().max().item():.3g}) and {changed} of {data.numel()} "
        "ternary values changed. On a linear with a BitNet norm (apply_bitnet_norms) the change is larger: the "
        "adapter read the input before the norm, the merged weight reads it after. Keep the adapter unmerged to "
        "keep its exact function, or fine-tune after merging"
    )


def _merge_watch(cls: type, func: Callable, types: tuple, args: tuple, kwargs: dict) -> object:
    """``__torch_function__`` for ``.data`` (get and set), ``add_``/``sub_`` and ``clone``: see above."""
    target = args[0]
    if func in _IN_PLACE_SUMS and target.__dict__.get("_bitnet_data_alias") and isinstance(args[1], Tensor):
        delta = args[1] * (_IN_PLACE_SUMS[func] * kwargs.get("alpha", 1))
        target._bitnet_merge_note = _merge_note(target, delta)
    if func == _DATA_SET and isinstance(target, cls) and isinstance(args[1], cls):
        note = args[1].__dict__.pop("_bitnet_merge_note", None)
        if note is not None:
            warnings.warn(note, stacklevel=3)
    out = super(cls, cls).__torch_function__(func, types, args, kwargs)
    if func == _DATA_SET and isinstance(target, cls) and isinstance(args[1], cls):
        # The wrapper's own (empty) tensor was replaced; the master weight is ours to replace (safe_merge).
        target._data = args[1]._data
    if isinstance(out, cls) and out is not target and (func == _DATA_GET or target.__dict__.get("_bitnet_data_alias")):
        out._bitnet_data_alias = True  # .data, or a clone of it (safe_merge)
    return out


# --- checkpoints: plain master weights in, plain master weights out ----------------------------------------
# A checkpoint carries weights, not the recipe: every state dict of a quantized module holds the master weight
# as a plain tensor (same key, dtype and shape as the unquantized model), so safetensors, save_pretrained, the
# HF Trainer and any other tool that serializes plain tensors work unchanged, and a plain model loads it. The
# recipe stays on the model: loading writes into the master weight, and a load that assigns the tensor
# (load_state_dict(assign=True), the meta-device loaders) gets it re-wrapped with the module's config first.


def _checkpoint_value(value: Tensor) -> Tensor:
    """What a checkpoint holds for a state-dict value: the master weight of a BitNet weight, also as the local
    tensor of an FSDP2-sharded DTensor (whose placements and global shape stay). Other values pass through."""
    if isinstance(value, BitNetTrainingLinearWeight):
        return value._data
    if isinstance(value, DTensor) and isinstance(dtensor_local(value), BitNetTrainingLinearWeight):
        return DTensor.from_local(
            dtensor_local(value)._data,
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    return value


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, param in module._parameters.items():
        value = state_dict.get(prefix + name)
        # state_dict(keep_vars=True) hands out the parameter itself, for code that wants the live object.
        if value is not None and value is not param:
            state_dict[prefix + name] = _checkpoint_value(value)
    # A weight tied to a module that is not quantized (an output head tied to the input embedding) appears under
    # that module's key too, and that module has no hook: its entries already written are fixed here.
    for key, value in state_dict.items():
        if isinstance(value, BitNetTrainingLinearWeight) and not isinstance(value, nn.Parameter):
            state_dict[key] = value._data


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    # load_state_dict works on its own copy of the dict, so replacing entries does not touch the caller's.
    for name, param in module._parameters.items():
        value = state_dict.get(prefix + name)
        if isinstance(param, BitNetTrainingLinearWeight) and type(value) in (Tensor, nn.Parameter):
            state_dict[prefix + name] = param._rewrap(value.detach())


def register_checkpoint_hooks(
    module: nn.Module,
    state_dict_post_hook: Callable = _state_dict_post_hook,
    load_pre_hook: Callable = _load_state_dict_pre_hook,
) -> None:
    """Register a state-dict post-hook and a load pre-hook on ``module``, once per pair of hooks. The defaults make
    its state dicts hold plain master weights and its loads keep the recipe; ``inference.py`` passes its own."""
    registered = module.__dict__.setdefault("_bitnet_checkpoint_hooks", set())
    if (state_dict_post_hook, load_pre_hook) in registered:
        return
    module.register_state_dict_post_hook(state_dict_post_hook)
    module.register_load_state_dict_pre_hook(load_pre_hook)
    registered.add((state_dict_post_hook, load_pre_hook))


# A pickled model holds its modules' hooks (torch keeps a load pre-hook in its own wrapper class), so that
# torch.load(weights_only=True) of a whole model needs them allowlisted: the user allowlists their own module
# classes, bitnet_ao everything of its own (docs/usage.md#saving-and-loading).
torch.serialization.add_safe_globals([module_hook_wrapper, _state_dict_post_hook, _load_state_dict_pre_hook])


# --- quantize_ and its inverse ----------------------------------------------------------------------------


def describe_module(module: nn.Module) -> str:
    """A module in a few words for an error message: a linear's own repr, else its class and weight shape (the
    repr of a model or block is the whole model)."""
    if isinstance(module, nn.Linear) and not module._modules:
        return repr(module)
    weight = getattr(module, "weight", None)
    shape = f" with a weight of shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else ""
    return f"{type(module).__name__}{shape}"


def checked_linear_weight(module: nn.Module, recipe: str) -> Tensor:
    """The weight of the ``nn.Linear`` ``module`` that ``recipe`` (a config's name, for the message) quantizes;
    a clear error for anything else, before anything changes."""
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"{recipe}: {describe_module(module)} is not an nn.Linear. BitNet quantizes linear layers (it replaces "
            "F.linear; an embedding lookup or a convolution would keep using the high-precision weight). Select "
            "linears only, e.g. quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) "
            "and 'lm_head' not in fqn), or bitnet_ao.surgery.quantize_filter"
        )
    return module.weight


def replace_parameter(module: nn.Module, name: str, new: nn.Parameter) -> None:
    """Make the parameter ``module.<name>`` become ``new`` in place (``torch.utils.swap_tensors``) rather than
    registering a new object on one module: every module sharing it (an output head tied to the input embedding)
    keeps sharing one parameter, optimized once, and an optimizer built before ``quantize_`` steps it. A parameter
    still referenced by a live autograd graph cannot be swapped: it is replaced on ``module`` alone, with a warning,
    since a module tied to it would keep the old object."""
    old = getattr(module, name)
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError as e:
        warnings.warn(
            f"bitnet_ao: {describe_module(module)}.{name} could not be replaced in place ({e}); a new parameter is "
            "registered on this module only, so a module sharing the old one (tied weights) no longer shares it. "
            "Quantize before running the model, or drop the tensors computed from it first",
            stacklevel=3,
        )
        setattr(module, name, new)


@register_quantize_module_handler(BitNetTrainingConfig)
def _bitnet_training_transform(module: nn.Module, config: BitNetTrainingConfig) -> nn.Module:
    weight = checked_linear_weight(module, "bitnet_training")
    if isinstance(weight, BitNetPackedLinearWeight):
        raise TypeError(
            f"bitnet_training: {describe_module(module)} holds a packed inference weight (bitnet_inference): its "
            "high-precision values are gone and cannot be trained. Quantize for training before packing, or load "
            "a training checkpoint (plain master weights) into a fresh model"
        )
    if isinstance(weight, BitNetTrainingLinearWeight):
        if weight.config != config:
            raise ValueError(
                f"bitnet_training: {describe_module(module)} already trains as BitNet with {weight.config}; "
                f"quantize_ with {config} would silently replace its recipe. To change it, call "
                "bitnet_ao.unquantize_(model) first, then quantize_ with the new config"
            )
        return module  # the same recipe again: nothing to do, the parameter (and its optimizer state) stays
    data = weight.detach()
    if not data.dtype.is_floating_point:
        raise TypeError(
            f"bitnet_training: {describe_module(module)} has a {data.dtype} weight; BitNet training needs a "
            "floating-point master weight (float32, bfloat16 or float16)"
        )
    config.check_shape(tuple(data.shape), f"bitnet_training: {describe_module(module)}")
    if not weight.requires_grad:
        # transformers' TorchAoConfig loads every weight it quantizes with requires_grad=False: kept, that would
        # train only the embeddings, norms and head, without a word.
        warnings.warn(
            "bitnet_training: weights loaded with requires_grad=False (as transformers' TorchAoConfig loads them) "
            "become trainable BitNet master weights; to freeze some, call requires_grad_(False) after quantize_",
            stacklevel=2,
        )
    new = nn.Parameter(BitNetTrainingLinearWeight(data, config), requires_grad=True)
    if isinstance(weight, nn.Parameter):
        replace_parameter(module, "weight", new)
    else:
        module.weight = new
    register_checkpoint_hooks(module)
    return module


def _warn_if_nothing_converted(model: nn.Module, config: BitNetTrainingConfig | BitNetInferenceConfig, n: int) -> None:
    """A ``filter_fn`` that selects nothing (a typo in a module name) would leave a plain model to train without
    a word: say so, with how many linears the model has."""
    if n:
        return
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    recipe = "bitnet_training" if isinstance(config, BitNetTrainingConfig) else "bitnet_inference"
    warnings.warn(
        f"quantize_(model, {recipe}(...)) converted no module of {type(model).__name__}: its filter_fn selected "
        f"none of its {linears} nn.Linear modules, so nothing runs as BitNet. Check the names the filter looks for "
        "(bitnet_ao.surgery.quantize_filter selects every linear but the output head)",
        stacklevel=4,  # the caller of quantize_
    )


observe_quantize_((BitNetTrainingConfig, BitNetInferenceConfig), _warn_if_nothing_converted)


def unquantize_(model: nn.Module) -> nn.Module:
    """Replace every ``BitNetTrainingLinearWeight`` in ``model`` by a plain ``nn.Parameter`` holding its master
    weight (in place, the same parameter objects; returns ``model``). The inverse of ``quantize_(model,
    bitnet_training())``. Packed inference weights have no master weight left: a clear error."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, BitNetTrainingLinearWeight):
                replace_parameter(module, name, nn.Parameter(param._data, requires_grad=param.requires_grad))
            elif isinstance(param, BitNetPackedLinearWeight):
                raise TypeError(
                    f"unquantize_: {describe_module(module)} holds a packed inference weight (bitnet_inference); "
                    "its high-precision values were freed when it was packed. Load the training checkpoint "
                    "(master weights) into a fresh model instead"
                )
    return model
