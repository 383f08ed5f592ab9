"""Hugging Face BitNet checkpoints, both ways (docs/huggingface.md).

- :func:`save_pretrained_bitnet` writes a model trained with bitnet_ao (an HF ``LlamaForCausalLM`` after
  ``apply_bitnet_norms`` and ``quantize_``) as a directory that stock ``AutoModelForCausalLM.from_pretrained``
  loads as a BitNet model (``quant_method: "bitnet"``; transformers and accelerate needed to load it).
- :func:`from_pretrained_bitnet` loads such a checkpoint (ours or anyone's) into a plain ``LlamaForCausalLM`` with
  the BitNet norms and ``bitnet_training`` weights, to continue training with INT8 matmuls.

The formats (transformers 5.x, ``integrations/bitnet.py``):

- ``linear_class="autobitlinear"``, ``quantization_mode="offline"``: ``weight`` uint8 ``(N / 4, K)``, 2 bits per
  value holding ``value + 1``, packed along the output dimension in row blocks (bits ``2i..2i+1`` of byte row
  ``r`` hold row ``i N/4 + r``); ``weight_scale`` ``[1]`` is the abs-mean, multiplied into the output.
- ``"bitlinear"`` (offline only): the same bytes, kept packed at run time; ``weight_scale`` is ``1 / abs-mean``.
- ``"autobitlinear"`` + ``"online"``: the high-precision master weights; transformers quantizes them on the fly
  (its trainable mode; the format Microsoft's bitnet.cpp converter starts from).

Placements: the FAQ's per-linear RMSNorms become ``model_type: "llama"`` with ``use_rms_norm: true`` (a norm inside
every BitNet linear, ``<proj>.rms_norm.weight``); the block norms the FAQ removed are written as ones, which
changes nothing but eps-sized rounding (a norm of a normed row rescales it by ``1 + O(eps)``, and the int8
activation quantization that follows is scale-invariant). The subln placement is ``model_type: "bitnet"``
(``attn_sub_norm``/``ffn_sub_norm``, relu² MLP).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchao.quantization import quantize_
from transformers.quantizers.quantizers_utils import should_convert_module

from ..config import BitNetTrainingConfig, bitnet_training
from ..layouts import HF_BITNET, HF_LLAMA, Placement, Role
from ..linear import is_bitnet_weight
from ..surgery import AppliedPlacement, NormedLinear, apply_bitnet_norms, detect_placement
from ..weight_quant import master_weight_for
from .export_checks import check_per_tensor_ternary

LinearClass = Literal["autobitlinear", "bitlinear"]
QuantizationMode = Literal["offline", "online"]

#: Where transformers' BitNet model keeps the norms the subln placement puts before these linears: its sub-norms.
_SUBLN_NORMS = {HF_BITNET.path(r): HF_BITNET.path(r.norm) for r in HF_BITNET.normed_roles("subln")}
#: The state-dict keys of the output head and of the embedding it may be tied to.
_HEAD, _EMBEDDING = (f"{HF_LLAMA.path(role)}.weight" for role in (Role.OUTPUT, Role.TOKEN_EMBD))
#: LlamaConfig fields that BitNetConfig shares.
_BITNET_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias",
    "attention_dropout", "rope_parameters",
)  # fmt: skip


# --- the Hugging Face packing (along the output dimension, row blocks, value + 1) ----------------------------


def pack_hf_ternary(values: Tensor) -> Tensor:
    """transformers' offline BitNet weight: int8 ternary ``(N, K)`` -> uint8 ``(N / 4, K)``, ``N % 4 == 0``."""
    n = values.shape[0]
    rows = n // 4
    codes = (values.to(torch.int32) + 1).reshape(4, rows, -1)  # block i holds rows i*N/4 .. (i+1)*N/4 - 1
    return (codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6).to(torch.uint8)


def unpack_hf_ternary(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_hf_ternary`: uint8 ``(N / 4, K)`` -> int8 ``(N, K)`` in {-1, 0, 1}."""
    codes = packed.to(torch.int32)
    return torch.cat([((codes >> (2 * i)) & 3) - 1 for i in range(4)]).to(torch.int8)


# --- export ----------------------------------------------------------------------------------------------------


def save_pretrained_bitnet(
    model: nn.Module,
    save_directory: str | Path,
    *,
    linear_class: LinearClass = "autobitlinear",
    quantization_mode: QuantizationMode = "offline",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (an HF ``LlamaForCausalLM`` with BitNet weights, trained or packed) as a Hugging Face BitNet
    checkpoint in ``save_directory``: ``config.json`` and ``model.safetensors``.

    ``dtype``: the dtype of the high-precision tensors (embeddings, norms, head, online master weights, the
    scales); default the model's. Load the result with the same ``dtype`` (transformers' offline
    ``autobitlinear`` layers break under another one). Raises ``ValueError`` for what transformers cannot load:
    binary weights, biases on BitNet linears, out_features not a multiple of 4 (offline), ``"bitlinear"`` online,
    and models whose norms match neither placement.
    """
    if linear_class not in ("autobitlinear", "bitlinear") or quantization_mode not in ("offline", "online"):
        raise ValueError(
            f"save_pretrained_bitnet: linear_class must be 'autobitlinear' or 'bitlinear' and quantization_mode "
            f"'offline' or 'online', got {linear_class!r} and {quantization_mode!r}"
        )
    if linear_class == "bitlinear" and quantization_mode == "online":
        raise ValueError(
            "save_pretrained_bitnet: transformers' 'bitlinear' layers only load packed ('offline') weights"
        )
    if not isinstance(model, transformers.LlamaForCausalLM):
        raise TypeError(
            f"save_pretrained_bitnet: expected a transformers LlamaForCausalLM, got {type(model).__name__} "
            "(docs/huggingface.md says which architectures map)"
        )
    dtype = dtype or model.dtype
    linears = _bitnet_linears(model)
    applied = detect_placement(model, "save_pretrained_bitnet")
    placement = applied.placement if applied is not None else None
    _check_exportable(model, linears, applied, quantization_mode)
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)

    tensors = _export_tensors(model, linears, placement, linear_class, quantization_mode, dtype)
    save_file(tensors, save_directory / "model.safetensors", metadata={"format": "pt"})
    plain_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in linears]
    quantization_config = transformers.BitNetQuantConfig(
        # Listed explicitly: given any list, transformers no longer skips lm_head by itself.
        modules_to_not_convert=[re.escape(name) for name in plain_linears],
        linear_class=linear_class,
        quantization_mode=quantization_mode,
        use_rms_norm=placement == "faq",
        rms_norm_eps=applied.eps if placement == "faq" else 1e-6,
    )
    config = _hf_config(model, placement)
    config.quantization_config = quantization_config.to_dict()
    config.dtype = dtype
    config.save_pretrained(save_directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(save_directory)
    return save_directory


def _bitnet_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The BitNet linears by name."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_bitnet_weight(m.weight)}
    if not linears:
        raise ValueError(
            f"save_pretrained_bitnet: {type(model).__name__} has no BitNet linear; quantize_ it with "
            "bitnet_training() (or bitnet_inference()) first"
        )
    return linears


def _hf_norm_name(linear: str, placement: Placement | None) -> str:
    """transformers' name of the RMSNorm that bitnet_ao keeps in the ``NormedLinear`` at ``linear``: the linear's
    own ``rms_norm`` (FAQ, ``use_rms_norm``), or the BitNet model's sub-norm before it (subln)."""
    if placement != "subln":
        return f"{linear}.rms_norm"
    tail = next(p for p in _SUBLN_NORMS if linear.endswith(p))
    return linear[: -len(tail)] + _SUBLN_NORMS[tail]


def _check_exportable(
    model: nn.Module, linears: dict[str, nn.Linear], applied: AppliedPlacement | None, mode: QuantizationMode
) -> None:
    placement = applied.placement if applied is not None else None
    for name, linear in linears.items():
        check_per_tensor_ternary(linear, name, caller="save_pretrained_bitnet", target="transformers' BitNet layers")
        n, k = linear.weight.shape
        where = f"save_pretrained_bitnet: {name} (in_features={k}, out_features={n})"
        if mode == "offline" and n % 4:
            raise ValueError(
                f"{where}: transformers packs offline weights 4 output rows per byte, so out_features must be a "
                "multiple of 4; export with quantization_mode='online'"
            )
        if placement == "faq" and not isinstance(model.get_submodule(name), NormedLinear):
            raise ValueError(f"{where} has no RMSNorm in front, but use_rms_norm puts one in every BitNet linear")
    if placement != "subln":
        return
    config = model.config
    expected = {
        "hidden_act": "relu2",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": applied.eps,
        "head_dim": config.hidden_size // config.num_attention_heads,
    }
    wrong = {key: getattr(config, key, None) for key, value in expected.items() if getattr(config, key, None) != value}
    missing = [
        f"{HF_LLAMA.blocks}.*.{HF_LLAMA.path(r)}"
        for r in HF_LLAMA.block_linears
        if not any(n.endswith(HF_LLAMA.path(r)) for n in linears)
    ]
    if wrong or missing:
        raise ValueError(
            "save_pretrained_bitnet: the subln placement exports as transformers' BitNet model (model_type "
            f"'bitnet'), which needs {expected} and every block linear quantized; this model has "
            f"{wrong or 'matching settings'}{f' and plain {missing}' if missing else ''}. Build the Llama with "
            "hidden_act='relu2' and apply_bitnet_norms(model, 'subln', eps=model.config.rms_norm_eps), or use the "
            "FAQ placement (model_type 'llama')"
        )


def _export_tensors(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    placement: Placement | None,
    linear_class: LinearClass,
    mode: QuantizationMode,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        hf_module = module_name
        if hf_module in linears or leaf == "weight_scale":
            continue  # written below from the weight itself
        if module_name.endswith(".norm") and isinstance(
            model.get_submodule(module_name[: -len(".norm")]), NormedLinear
        ):
            owner = module_name[: -len(".norm")]
            hf_module = _hf_norm_name(owner, placement)
        tensors[f"{hf_module}.{leaf}"] = value.detach().to(dtype) if value.is_floating_point() else value.detach()
    ones = torch.ones(model.config.hidden_size, dtype=dtype)
    for i, layer in enumerate(model.model.layers):
        for norm in HF_LLAMA.pre_norms:
            if isinstance(layer.get_submodule(norm), nn.Identity):  # removed by the FAQ placement
                tensors[f"{HF_LLAMA.blocks}.{i}.{norm}.weight"] = ones.clone()
    if model.config.tie_word_embeddings:
        tensors.pop(_HEAD, None)
    for name, linear in linears.items():
        weight = linear.weight
        q = weight.bitnet_quantization()
        if mode == "online":
            master = getattr(weight, "_data", None)
            if master is None:  # a packed inference weight: rebuild a master weight that quantizes the same
                master = master_weight_for(weight.bitnet_int8(q), q.scale, dtype)
            tensors[f"{name}.weight"] = master.detach().to(dtype).contiguous()
            continue
        tensors[f"{name}.weight"] = pack_hf_ternary(weight.bitnet_int8(q))
        scale = q.scale.double()
        scale = 1 / scale if linear_class == "bitlinear" else scale
        tensors[f"{name}.weight_scale"] = scale.reshape(1).to(dtype)
    return {k: v.contiguous() for k, v in tensors.items()}


def _hf_config(model: nn.Module, placement: Placement | None) -> transformers.PretrainedConfig:
    config = model.config
    if placement != "subln":
        return config.__class__.from_dict(config.to_dict())
    return transformers.BitNetConfig(**{key: getattr(config, key) for key in _BITNET_CONFIG_FIELDS})


# --- import ----------------------------------------------------------------------------------------------------


def from_pretrained_bitnet(
    pretrained: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    config: BitNetTrainingConfig | None = None,
) -> transformers.LlamaForCausalLM:
    """Load a Hugging Face BitNet checkpoint (a local directory or a Hub repo id) into a plain
    ``LlamaForCausalLM`` with the matching BitNet norms (``apply_bitnet_norms``) and ``quantize_(..., config)``
    (default ``bitnet_training()``) on the linears transformers would have converted, master weights in
    ``dtype``: ready to train with INT8 matmuls.

    Online checkpoints give their master weights as they are. Offline (packed) ones give, for each weight, a
    master weight whose quantization is exactly the packed values and scale (:func:`master_weight_for`): a
    ternary start, which exports back to the same bytes.
    """
    directory = _local_directory(pretrained)
    hf_config = json.loads((directory / "config.json").read_text())
    qc = hf_config.pop("quantization_config", None) or {}
    if qc.get("quant_method") != "bitnet":
        raise ValueError(f"from_pretrained_bitnet: {pretrained} is not a BitNet checkpoint (no quant_method 'bitnet')")
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "bitnet"):
        raise ValueError(f"from_pretrained_bitnet: model_type {model_type!r} is not supported (llama or bitnet)")
    tensors: dict[str, Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))

    llama_config = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type", "dtype")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config)).to(dtype)
    placement: Placement | None = "subln" if model_type == "bitnet" else "faq" if qc.get("use_rms_norm") else None
    if placement is not None:
        eps = hf_config["rms_norm_eps"] if placement == "subln" else qc.get("rms_norm_eps", 1e-6)
        # Block norms that are all ones are what the FAQ placement removed (our own exports); trained ones stay.
        block_norms = [v for k, v in tensors.items() if k.endswith(tuple(f"{n}.weight" for n in HF_LLAMA.pre_norms))]
        keep = placement == "faq" and not all(torch.equal(v, torch.ones_like(v)) for v in block_norms)
        apply_bitnet_norms(model, placement, eps=eps, keep_block_norms=keep)
        model.to(dtype)
    skip = qc.get("modules_to_not_convert")
    skip = skip if skip is not None else [HF_LLAMA.path(Role.OUTPUT)]
    converted = {
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and should_convert_module(name, skip)
    }
    offline = qc.get("linear_class", "bitlinear") == "bitlinear" or qc.get("quantization_mode") == "offline"
    state = _import_tensors(model, tensors, placement, converted, qc.get("linear_class", "bitlinear"), offline, dtype)
    model.load_state_dict(state, strict=True)
    quantize_(
        model,
        config or bitnet_training(),
        filter_fn=lambda m, name: isinstance(m, nn.Linear) and name in converted,
    )
    return model


def _local_directory(pretrained: str | Path) -> Path:
    path = Path(pretrained)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(pretrained), allow_patterns=["*.json", "*.safetensors"]))


def _import_tensors(
    model: nn.Module,
    tensors: dict[str, Tensor],
    placement: Placement | None,
    converted: set[str],
    linear_class: str,
    offline: bool,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    own_keys = set(model.state_dict())
    renames = {}  # HF name -> this model's name
    for name, module in model.named_modules():
        if isinstance(module, NormedLinear):
            renames[f"{_hf_norm_name(name, placement)}.weight"] = f"{name}.norm.weight"
    for key, value in tensors.items():
        module_name, _, leaf = key.rpartition(".")
        if leaf == "weight_scale":
            continue
        if module_name.endswith(HF_LLAMA.pre_norms) and key not in own_keys:
            continue  # removed by the FAQ placement: all ones, as checked above
        if offline and module_name in converted and leaf == "weight":
            scale = tensors.get(f"{module_name}.weight_scale")
            if scale is None:
                raise ValueError(f"from_pretrained_bitnet: {module_name}.weight is packed but has no weight_scale")
            scale = scale.double().reshape(())
            scale = (1 / scale if linear_class == "bitlinear" else scale).float()
            value = master_weight_for(unpack_hf_ternary(value), scale, dtype)
        state[renames.get(key, key)] = value.to(dtype) if value.is_floating_point() else value
    if model.config.tie_word_embeddings:
        state.setdefault(_HEAD, state[_EMBEDDING])
    return state
