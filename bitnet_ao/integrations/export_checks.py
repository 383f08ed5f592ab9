"""What both exporters (``gguf.save_gguf``, ``transformers.save_pretrained_bitnet``) require of a BitNet linear.

llama.cpp's TQ1_0 / TQ2_0 tensors and transformers' BitNet layers both hold one ternary weight with one scale and
no bias per linear: binary weights, group scales and biases have no place in either file, so both refuse them
here, with one message each.
"""

from __future__ import annotations

from torch import nn

from ..linear import is_bitnet_weight


def check_per_tensor_ternary(linear: nn.Linear, name: str, *, caller: str, target: str) -> None:
    """``ValueError`` naming ``caller``, the linear at ``name``, its shape and the reason, unless ``linear`` is a
    BitNet linear with ternary weights, one scale for the whole weight and no bias: what a per-tensor ternary
    file holds exactly. ``target``: what reads the file, for the message (``"transformers' BitNet layers"``)."""
    weight = linear.weight
    where = f"{caller}: {name} (in_features={linear.in_features}, out_features={linear.out_features})"
    if not is_bitnet_weight(weight):
        raise ValueError(
            f"{where} is a plain high-precision linear, and {target} take BitNet weights: quantize_ it with "
            "bitnet_training() or bitnet_inference() first (filter_fn=quantize_filter)"
        )
    if weight.config.weights != "ternary":
        raise ValueError(f"{where} has binary weights; {target} take ternary ones")
    if weight.config.grouped:
        raise ValueError(f"{where} has {weight.config.scale_groups} group scales; {target} take one scale per weight")
    if linear.bias is not None:
        raise ValueError(f"{where} has a bias; {target} add none to it")


__all__ = ["check_per_tensor_ternary"]
