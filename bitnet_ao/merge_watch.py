"""Merging into a master weight (peft's LoRA merge): measured, and a warning with the change.

peft merges an adapter with ``base.weight.data += delta`` (unmerge: ``-=``; safe_merge: ``w = base.weight.data
.clone(); w += delta``, then ``base.weight.data = w`` up to peft 0.21, ``base.weight.data.copy_(w)`` from 0.22).
Into a BitNet master weight the sum is re-ternarized at every forward: the layer computes ternary(W + dW), not
ternary(W) + dW, and the merged model is not the adapted one.
That is worth a warning with the measured change, but only there: an optimizer step (``param.add_``,
``addcdiv_``, ``_foreach_*``, torchao's ``copy_``) and ``load_state_dict`` (``copy_``) never assign ``.data``,
and old-style optimizers that do ``p.data.add_`` never assign it back. So: a sum into a ``.data`` alias (or a
clone of one) is measured, and the warning is given when such a tensor is assigned to ``.data`` or copied into a
``.data`` alias.

The master-weight class (``tensor.py``) hands the torch functions of :data:`WATCHED` to :func:`torch_function`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from .config import BitNetTrainingConfig
from .weight_quant import quantize_weight, weight_quantization

_DATA_GET, _DATA_SET = Tensor.data.__get__, Tensor.data.__set__
#: The in-place sums a merge is made of, with the sign each gives ``delta``.
_IN_PLACE_SUMS = {Tensor.add_: 1.0, Tensor.sub_: -1.0}
#: The torch functions of a master weight that :func:`torch_function` handles: ``.data`` (get and set), the
#: in-place sums, ``clone`` and ``copy_``.
WATCHED = frozenset({_DATA_GET, _DATA_SET, Tensor.clone, Tensor.copy_, *_IN_PLACE_SUMS})


def _effective_weight(data: Tensor, config: BitNetTrainingConfig) -> tuple[Tensor, Tensor]:
    """The weight a BitNet linear computes with, as float32 ``W_q * s_w``, and its int8 values ``W_q``."""
    q = weight_quantization(data, config)
    values = quantize_weight(data, q, weights=config.weights, transpose=False)
    return values.float() * q.scale, values


def _merge_note(data: Tensor, config: BitNetTrainingConfig, delta: Tensor) -> str:
    """What adding ``delta`` to the master weight ``data`` does to the weight the layer computes with, in words."""
    data = data.detach()
    delta = delta.detach().float()
    before, values_before = _effective_weight(data, config)
    after, values_after = _effective_weight((data.float() + delta).to(data.dtype), config)
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


def torch_function(cls: type, func: Callable, types: tuple, args: tuple, kwargs: dict) -> object:
    """``cls.__torch_function__`` for a function of :data:`WATCHED` (``cls``: the master-weight class, whose
    instances hold the master weight in ``_data`` and the recipe in ``config``): runs ``func`` as the class's
    base would, measuring a sum into a ``.data`` alias and warning when the result is assigned to ``.data`` or
    copied into a ``.data`` alias."""
    target = args[0]
    if func in _IN_PLACE_SUMS and target.__dict__.get("_bitnet_data_alias") and isinstance(args[1], Tensor):
        delta = args[1] * (_IN_PLACE_SUMS[func] * kwargs.get("alpha", 1))
        target._bitnet_merge_note = _merge_note(target._data, target.config, delta)
    into_data = func == _DATA_SET or (func == Tensor.copy_ and target.__dict__.get("_bitnet_data_alias"))
    if into_data and isinstance(target, cls) and isinstance(args[1], cls):
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
