"""FSDP2 for BitNet weights: a 2-bit packed all-gather with exact global scales (spec §3).

``fully_shard`` shards each ``BitNetTrainingLinearWeight`` (the high-precision master weight) along dim 0. Before
each all-gather, every rank ternarizes (or binarizes) its shard with the scale of the WHOLE weight and packs it
four values per byte (:mod:`bitnet_ao.packing` layout), so the wire carries ``ceil(K / 4)`` bytes per row instead
of ``2 K`` (BF16): 1/8 of the bytes. The scale itself is not gathered: every rank derives it from the same
all-reduced sums. After the all-gather, a :class:`BitNetPackedLinearWeight` stands in for the weight; ``F.linear``
on it runs the BitNet autograd function of ``linear.py`` on the packed values directly (no BF16 weight is ever
rebuilt), and its ``grad_weight`` is a plain tensor in the parameter dtype that FSDP2 reduce-scatters as usual.

Scales: ``s_w = sum|W| / numel(W)`` (and ``mean(W)`` for binary weights) from float64 sums all-reduced with the
element counts over the FSDP shard group only (HSDP replicas hold identical shards and are left out), so a sharded
run gets the single-device scale for any shape, uneven shards included.

When the scale is computed: the all-reduced sums are kept on the shard (``_fsdp_scale_state``). An all-gather in
the forward pass uses the state left by :func:`precompute_bitnet_scale_for_fsdp` (one all-reduce for every
BitNet weight of the model, called after ``optimizer.step()``) while it is fresh, i.e. while the version counter
of the sharded parameter is unchanged since (an update after the precompute, such as a misplaced call, a second
optimizer step or loading a checkpoint, is never quantized with the stale scale); otherwise it all-reduces this
weight's three float64 values itself. An all-gather inside the backward pass (the re-gather of
``reshard_after_forward=True``, activation-checkpointing recomputes) always reuses the state of the forward, so
the backward quantizes with exactly the forward's scale and runs no collective.

Every rank must take the same decision, or the all-reduces no longer match. FSDP2 replaces the local shard
object of an unevenly sharded weight on the short ranks only (re-padding in its lazy init, after
``load_state_dict``, in ``module._apply``), which drops the state kept on it there; so precomputed states are
also registered by sharded parameter, the object FSDP2 keeps, and a new shard adopts its parameter's state.

Import note: ``linear.py`` and ``tensor.py`` import this module and it imports them, always as modules, with the
attributes used only at call time, so any import order works.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from . import kernels, linear, tensor
from .config import BitNetTrainingConfig
from .kernels import reference

aten = torch.ops.aten


class ScaleState(NamedTuple):
    """The all-reduced statistics of a whole weight, kept on its FSDP shard (``_fsdp_scale_state``)."""

    #: float64 ``(sum |W|, sum W)`` over the whole weight.
    sums: Tensor
    #: ``out_features`` of the whole weight (the FSDP-sharded dimension).
    rows: int
    #: Precomputed states only: the sharded parameter (its in-place updates bump the DTensor's version counter,
    #: not the local shard's) and its version when the sums were taken.
    precomputed_for: tuple[weakref.ref[DTensor], int] | None = None

    def fresh(self) -> bool:
        """Precomputed, and the parameter unchanged since: valid for any forward."""
        if self.precomputed_for is None:
            return False
        param_ref, version = self.precomputed_for
        param = param_ref()
        return param is not None and param._version == version


#: Precomputed states by sharded parameter (see the module docstring), for shards FSDP2 replaced since.
_PRECOMPUTED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _adopt_precomputed(weight: tensor.BitNetTrainingLinearWeight) -> ScaleState | None:
    for param, state in list(_PRECOMPUTED.items()):
        if param._local_tensor is weight:
            weight._fsdp_scale_state = state
            return state
    return None


def _local_stats(weight: tensor.BitNetTrainingLinearWeight) -> Tensor:
    """float64 ``(sum |w|, sum w, rows)`` of a shard: the all-reducible form of the scale and element count."""
    w = weight._data
    rows = torch.full((1,), w.shape[0], dtype=torch.float64, device=w.device)
    return torch.cat([kernels.weight_stats(w), rows])


def _scale_state(weight: tensor.BitNetTrainingLinearWeight, group: dist.ProcessGroup) -> ScaleState:
    """The state this all-gather quantizes with (see the module docstring); all-reduces only when needed."""
    state: ScaleState | None = weight._fsdp_scale_state or _adopt_precomputed(weight)
    in_backward = torch._C._current_graph_task_id() != -1
    if state is not None and (in_backward or state.fresh()):
        return state
    stats = _local_stats(weight)
    dist.all_reduce(stats, group=group)
    # The global row count never changes: read it (a device sync) only the first time.
    rows = state.rows if state is not None else int(stats[2].item())
    weight._fsdp_scale_state = ScaleState(stats[:2], rows)
    return weight._fsdp_scale_state


def pre_all_gather(
    weight: tensor.BitNetTrainingLinearWeight, mesh: DeviceMesh
) -> tuple[tuple[Tensor], tuple[Tensor, int]]:
    """All-gather input: the shard quantized with the global scale, 2-bit packed, ``(P, ceil(K / 4))`` int8.

    ``P = ceil(N / world)`` is FSDP2's padded shard height: every rank must contribute the same number of bytes,
    so a short (or empty) last shard is padded with zero bytes. FSDP2 keeps real rows first (rank ``r`` holds rows
    ``r P ..``), so the gathered ``(world P, ceil(K / 4))`` tensor is the packed weight followed by padding.
    Metadata: the float32 scale and ``N``.
    """
    state = _scale_state(weight, mesh.get_group())
    n, k = state.rows, weight.shape[1]
    s_w, alpha = reference.weight_scales_from_stats(state.sums, n * k)
    center = alpha if weight.config.weights == "binary" else None
    packed = reference.pack_i2_in_i8(linear.quantize_weight(weight._data, s_w, center, transpose=False))
    padded_rows = -(-n // mesh.size())
    if packed.shape[0] != padded_rows:
        packed = F.pad(packed, (0, 0, 0, padded_rows - packed.shape[0]))
    return (packed,), (s_w, n)


def post_all_gather(
    weight: tensor.BitNetTrainingLinearWeight,
    all_gather_outputs: tuple[Tensor, ...],
    metadata: tuple[Tensor, int],
    param_dtype: torch.dtype,
    *,
    out: Tensor | None = None,
) -> tuple[BitNetPackedLinearWeight, tuple[Tensor, ...]] | None:
    """Wrap the gathered bytes (a view, no copy) as a :class:`BitNetPackedLinearWeight` of dtype ``param_dtype``.

    With ``out`` (FSDP2 reuses the unsharded parameter after the first all-gather) the packed bytes land in the
    same storage again; only the scale is new, and it is set as a new tensor rather than written in place
    because the autograd graph of a previous forward may have saved the old one.
    """
    (gathered,) = all_gather_outputs
    scale, rows = metadata
    packed = gathered[:rows]
    if out is not None:
        if not isinstance(out, BitNetPackedLinearWeight):
            raise TypeError(f"BitNet FSDP2 all-gather: expected to refill a BitNetPackedLinearWeight, got {type(out)}")
        out.packed, out.scale = packed, scale
        return None
    return BitNetPackedLinearWeight(packed, scale, weight.shape[1], param_dtype, weight.config), all_gather_outputs


class BitNetPackedLinearWeight(Tensor):
    """An ``(N, K)`` BitNet weight already quantized: values 2-bit packed in ``packed`` ``(N, ceil(K / 4))`` int8
    and the float32 weight scale ``scale``. The FSDP2 all-gather produces it; ``F.linear`` is its only use.

    Its ``dtype`` is the parameter dtype FSDP2 asked for: the dtype of ``grad_weight``, which is a plain tensor.
    """

    packed: Tensor
    scale: Tensor
    config: BitNetTrainingConfig

    @staticmethod
    def __new__(
        cls,
        packed: Tensor,
        scale: Tensor,
        in_features: int,
        dtype: torch.dtype,
        config: BitNetTrainingConfig,
        requires_grad: bool = False,
    ) -> BitNetPackedLinearWeight:
        return Tensor._make_wrapper_subclass(
            cls, (packed.shape[0], in_features), dtype=dtype, device=packed.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        packed: Tensor,
        scale: Tensor,
        in_features: int,
        dtype: torch.dtype,
        config: BitNetTrainingConfig,
        requires_grad: bool = False,
    ) -> None:
        if packed.dtype != torch.int8 or packed.dim() != 2 or packed.shape[1] != (in_features + 3) // 4:
            raise ValueError(
                f"BitNetPackedLinearWeight: packed must be int8 of shape (N, ceil({in_features} / 4)), got "
                f"{packed.dtype} {tuple(packed.shape)}"
            )
        self.packed = packed
        self.scale = scale
        self.config = config

    def __repr__(self) -> str:
        shape = tuple(self.shape)
        return f"{type(self).__name__}(shape={shape}, dtype={self.dtype}, scale={self.scale}, config={self.config})"

    def __tensor_flatten__(self) -> tuple[list[str], tuple[torch.dtype, BitNetTrainingConfig]]:
        return ["packed", "scale"], (self.dtype, self.config)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, Tensor], meta: tuple, outer_size, outer_stride):
        dtype, config = meta
        return cls(inner["packed"], inner["scale"], outer_size[1], dtype, config)

    def unpack(self) -> Tensor:
        """The ``(N, K)`` int8 weight, for the matmuls that want it whole (high-precision ``grad_input``)."""
        return reference.unpack_i2_in_i8(self.packed, self.shape[1])

    def _same(self, requires_grad: bool = False) -> BitNetPackedLinearWeight:
        return type(self)(self.packed, self.scale, self.shape[1], self.dtype, self.config, requires_grad)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear.bitnet_linear(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        weight = args[0]
        # detach/alias: nn.Parameter and autograd bookkeeping. as_strided: FSDP2 views the all-gather output as
        # the unsharded parameter with the original (contiguous) size and stride, i.e. the tensor itself.
        if func in (aten.detach.default, aten.alias.default):
            return weight._same()
        if func is aten.as_strided.default and _is_identity_view(weight, *args[1:], **(kwargs or {})):
            return weight._same()
        raise NotImplementedError(
            f"BitNetPackedLinearWeight (the FSDP2-gathered BitNet weight, shape {tuple(weight.shape)}) only "
            f"supports F.linear, not {func}; use the sharded master weight for anything else"
        )


def _is_identity_view(weight: Tensor, size, stride, storage_offset: int | None = 0) -> bool:
    n, k = weight.shape
    return list(size) == [n, k] and list(stride) == [k, 1] and not storage_offset


# --- precomputing every scale with one collective -------------------------------------------------------


def _shard_group(param: DTensor, name: str) -> dist.ProcessGroup:
    """The process group of the FSDP shard dimension: the only mesh dimension the weight is split along."""
    shard_dims = [i for i, placement in enumerate(param.placements) if placement.is_shard()]
    if len(shard_dims) != 1:
        raise NotImplementedError(
            f"precompute_bitnet_scale_for_fsdp: {name} is placed as {param.placements} on {param.device_mesh}; "
            "only FSDP2/HSDP sharding (one sharded mesh dimension) is supported. Tensor parallelism needs "
            "per-group weight scales (spec §4)."
        )
    return param.device_mesh.get_group(shard_dims[0])


@torch.no_grad()
def precompute_bitnet_scale_for_fsdp(model: nn.Module | Iterable[nn.Module]) -> None:
    """Compute the global scale of every FSDP2-sharded BitNet weight of ``model`` with ONE all-reduce.

    Call it after ``optimizer.step()``: the next forward all-gathers (and the backward re-gathers of
    ``reshard_after_forward=True``) then run no collective of their own, also over several forwards (gradient
    accumulation). The result is tied to the current weight values: any in-place update of a weight since the
    call makes its all-gather fall back to its own all-reduce, so a stale scale is never used.
    Weights on different shard groups get one all-reduce per group.
    ``model`` may be a module or several (e.g. pipeline stages); BitNet weights that are not FSDP2-sharded are
    skipped.
    """
    modules = [model] if isinstance(model, nn.Module) else list(model)
    groups: dict[dist.ProcessGroup, list[DTensor]] = {}
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) in seen or not isinstance(param, DTensor):
                continue
            seen.add(id(param))
            if isinstance(param._local_tensor, tensor.BitNetTrainingLinearWeight):
                groups.setdefault(_shard_group(param, name), []).append(param)
    for group, params in groups.items():
        stats = torch.stack([_local_stats(param._local_tensor) for param in params])
        dist.all_reduce(stats, group=group)
        for param, sums in zip(params, stats, strict=True):
            state = ScaleState(sums[:2], param.shape[0], (weakref.ref(param), param._version))
            param._local_tensor._fsdp_scale_state = _PRECOMPUTED[param] = state
