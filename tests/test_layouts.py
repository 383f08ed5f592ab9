"""The table of model layouts (``bitnet_ao.layouts``) against sources that do not come from it: the modules and the
forward of real models (transformers' Llama, Qwen2 and BitNet, torchtitan's Llama 3, ``benchmarks/model.py``),
transformers' and torchtitan's own tensor-parallel plans, torchtitan's Hugging Face state-dict map and llama.cpp's
GGUF name map (the ``gguf`` package). A wrong entry, role or norm order fails one of them.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from benchmarks.model import ModelConfig, Transformer
from bitnet_ao import private_api
from bitnet_ao.layouts import (
    GGUF,
    HF_BITNET,
    HF_LLAMA,
    LAYOUTS,
    META,
    TORCHTITAN,
    TORCHTITAN_FUSED_QKV,
    BlockLayout,
    Role,
)
from bitnet_ao.tensor_parallel import ROW_PARALLEL_PATHS, tensor_parallel_group_dim


def _fqn(layout: BlockLayout, role: Role, block: int = 0) -> str:
    return f"{layout.blocks}.{block}.{layout.path(role)}" if role.in_block else layout.path(role)


def _meta_model() -> nn.Module:
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=16))


def _hf_model(architecture: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, architecture)(config)


def _torchtitan_config(fuse_qkv: bool):
    """torchtitan's Llama 3 debug model, one layer, SDPA attention (FlexAttention has no CPU path); with
    ``fuse_qkv=False`` its attention rebuilt with separate q, k and v projections."""
    llama3 = pytest.importorskip("torchtitan.models.llama3", reason="torchtitan is not importable")
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_gqa_config

    config = llama3.llama3_configs["debugmodel"](attn_backend="flex")
    config.layers = config.layers[:1]
    attention = config.layers[0].attention
    attention.inner_attention = ScaledDotProductAttention.Config()
    if not fuse_qkv:
        config.layers[0].attention = make_gqa_config(
            dim=config.dim,
            n_heads=attention.n_heads,
            n_kv_heads=attention.n_kv_heads,
            wqkv_param_init=attention.wo.param_init,
            wo_param_init=attention.wo.param_init,
            inner_attention=attention.inner_attention,
            rope=attention.rope,
            fuse_qkv=False,
        )
    return config


def _torchtitan_model(fuse_qkv: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _torchtitan_config(fuse_qkv).build()
    model.init_states()
    return model


#: Each layout with a one-block model that should follow it.
MODELS = {
    "meta": (_meta_model, META),
    "hf_llama": (lambda: _hf_model("LlamaForCausalLM"), HF_LLAMA),
    "hf_qwen2": (lambda: _hf_model("Qwen2ForCausalLM"), HF_LLAMA),
    "hf_bitnet": (lambda: _hf_model("BitNetForCausalLM"), HF_BITNET),
    "torchtitan_fused_qkv": (lambda: _torchtitan_model(fuse_qkv=True), TORCHTITAN_FUSED_QKV),
    "torchtitan": (lambda: _torchtitan_model(fuse_qkv=False), TORCHTITAN),
}


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


@pytest.mark.parametrize("name", MODELS)
def test_the_model_has_exactly_the_layouts_modules(name: str) -> None:
    """The block's linears and norms, found by type, are the layout's; so are the embedding, final norm and head."""
    factory, layout = MODELS[name]
    model = factory()
    block = model.get_submodule(f"{layout.blocks}.0")
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    norms = {n for n, m in block.named_modules() if _is_norm(m)}
    assert linears == {layout.path(r) for r in layout.block_linears}
    assert norms == {layout.path(r) for r in layout.block_roles if not r.is_block_linear}
    assert _is_norm(model.get_submodule(layout.path(Role.OUTPUT_NORM)))
    head = model.get_submodule(layout.path(Role.OUTPUT))
    assert (
        isinstance(head, nn.Linear)
        and head.out_features == model.get_submodule(layout.path(Role.TOKEN_EMBD)).weight.shape[0]
    )


@pytest.mark.parametrize("name", MODELS)
def test_roles_are_in_forward_order_and_each_linear_reads_its_norm(name: str) -> None:
    """A forward pass calls the modules in the order of the roles, and the last norm called before each linear is
    the one ``Role.norm`` names (where the layout has it)."""
    factory, layout = MODELS[name]
    model = factory()
    names = {_fqn(layout, r): r for r in Role if r in layout.modules}
    calls: list[str] = []
    for fqn in names:
        model.get_submodule(fqn).register_forward_pre_hook(lambda m, args, fqn=fqn: calls.append(fqn))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))
    assert calls == list(names)

    last_norm = None
    for fqn in calls:
        role = names[fqn]
        if _is_norm(model.get_submodule(fqn)):
            last_norm = role
        elif role.norm in layout.modules:
            assert last_norm is role.norm, f"{fqn} reads {last_norm}, the table says {role.norm}"


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_row_parallel_roles_are_transformers_rowwise_plan(architecture: str) -> None:
    model = _hf_model(architecture)
    plan = {f"model.{key}": style for key, style in model.config.base_model_tp_plan.items()}
    expected = {
        f"{HF_LLAMA.blocks}.*.{HF_LLAMA.path(r)}": "rowwise" if r.row_parallel else "colwise"
        for r in HF_LLAMA.block_linears
    }
    assert plan == expected
    for key, style in plan.items():
        assert tensor_parallel_group_dim(key.replace("*", "3")) == (1 if style == "rowwise" else 0), key


@pytest.mark.parametrize("fuse_qkv", [True, False])
def test_row_parallel_roles_are_torchtitans_sharding_plan(fuse_qkv: bool) -> None:
    """torchtitan's own Llama 3 plan shards the row-parallel roles by input column: what the converter's group
    dimensions (``tensor_parallel_group_dim``) must agree with, or its ``parallelize`` raises."""
    pytest.importorskip("torchtitan.models.llama3", reason="torchtitan is not importable")
    from torchtitan.distributed.parallel_dims import MeshAxisName
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    config = _torchtitan_config(fuse_qkv)
    set_llama3_sharding_config(config, enable_sp=False)
    with torch.device("meta"):
        model = config.build()
    layout = TORCHTITAN_FUSED_QKV if fuse_qkv else TORCHTITAN
    dims = {}
    for role in layout.block_linears:
        sharding = private_api.torchtitan_sharding_config(model.get_submodule(_fqn(layout, role)))
        dims[_fqn(layout, role)] = sharding.state_shardings["weight"].per_axis_spmd_types()[MeshAxisName.TP].dim
    assert dims == {_fqn(layout, r): int(r.row_parallel) for r in layout.block_linears}
    assert all(tensor_parallel_group_dim(fqn) == dim for fqn, dim in dims.items())


def test_row_parallel_paths_are_every_layouts_outputs() -> None:
    expected = {layout.path(r) for layout in LAYOUTS for r in (Role.ATTN_OUTPUT, Role.FFN_DOWN)}
    assert set(ROW_PARALLEL_PATHS) == expected


def test_torchtitan_names_are_its_hugging_face_adapters() -> None:
    """torchtitan's Hugging Face state-dict map, key by key; the fused model saves the separate names."""
    pytest.importorskip("torchtitan.models.llama3", reason="torchtitan is not importable")
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    adapter = Llama3StateDictAdapter(_torchtitan_config(fuse_qkv=False), None)
    mapped = {hf.format(3): tt.format(3) for hf, tt in adapter.from_hf_map.items() if tt is not None}
    assert {hf: HF_LLAMA.rename(hf, TORCHTITAN) for hf in mapped} == mapped
    assert {TORCHTITAN.rename(tt, HF_LLAMA) for tt in mapped.values()} == set(mapped)
    keys = set(_torchtitan_model(fuse_qkv=True).state_dict())
    assert keys == {re.sub(r"^layers\.3\.", "layers.0.", tt) for tt in mapped.values()}


def test_meta_names_rename_to_the_hugging_face_model() -> None:
    """Every state-dict key of the Meta-named model renames to one of a Hugging Face Llama of the same shape, and
    back."""
    meta_keys = set(_meta_model().state_dict())
    hf_keys = set(_hf_model("LlamaForCausalLM").state_dict())
    assert {META.rename(k, HF_LLAMA) for k in meta_keys} == hf_keys
    assert {HF_LLAMA.rename(k, META) for k in hf_keys} == meta_keys


#: Roles gguf-py's map of an architecture does not name: llama.cpp's BitNet ties its head to the embedding, and
#: gguf-py knows BitNet's sub-norms by another checkpoint's names (``inner_attn_ln``, ``ffn_layernorm``).
UNMAPPED = {"BITNET": {Role.ATTN_SUB_NORM, Role.FFN_SUB_NORM, Role.OUTPUT}}


@pytest.mark.parametrize(
    ("architecture", "layout"), [("LLAMA", META), ("LLAMA", HF_LLAMA), ("QWEN2", HF_LLAMA), ("BITNET", HF_BITNET)]
)
def test_gguf_names_are_llama_cpps(architecture: str, layout: BlockLayout) -> None:
    """llama.cpp's own map (gguf-py's ``TensorNameMap``) takes each module of the layout to the name
    ``rename(..., GGUF)`` gives; the sub-norms it does not map are still tensors of llama.cpp's BitNet."""
    gguf = pytest.importorskip("gguf")
    arch = getattr(gguf.MODEL_ARCH, architecture)
    tensor_map = gguf.get_tensor_name_map(arch, 4)
    tensors = {gguf.TENSOR_NAMES[t].format(bid=3) for t in gguf.MODEL_TENSORS[arch]}
    unmapped = {r for r in layout.modules if tensor_map.get_name(_fqn(layout, r, block=3)) is None}
    assert unmapped == UNMAPPED.get(architecture, set())
    for role in layout.modules:
        name = _fqn(layout, role, block=3)
        if role in unmapped:
            assert role.kind != "sub_norm" or layout.rename(name, GGUF) in tensors, name
        else:
            assert layout.rename(name, GGUF) == tensor_map.get_name(name), name


def test_every_role_is_a_gguf_tensor() -> None:
    gguf = pytest.importorskip("gguf")
    names = set(gguf.TENSOR_NAMES.values())
    missing = [r for r in Role if (f"blk.{{bid}}.{r.gguf}" if r.in_block else r.gguf) not in names]
    assert not missing


def test_rename_keeps_the_tail_and_refuses_unknown_names() -> None:
    assert META.rename("layers.12.attention.wq.norm.weight", HF_LLAMA) == "model.layers.12.self_attn.q_proj.norm.weight"
    assert HF_LLAMA.rename("model.norm.weight", GGUF) == "output_norm.weight"
    with pytest.raises(KeyError, match="no module of a Llama"):
        META.rename("layers.0.attention.rope.cos", HF_LLAMA)
    with pytest.raises(KeyError, match="Hugging Face Llama/Qwen2 has no module for ATTN_QKV"):
        TORCHTITAN_FUSED_QKV.rename("layers.0.attention.qkv_linear.wqkv.weight", HF_LLAMA)


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        META.modules[Role.ATTN_Q] = "attention.q"  # type: ignore[index]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_placements_normalize_every_linear_or_the_two_output_projections(layout: BlockLayout) -> None:
    """The FAQ's BitLinear normalizes the input of every linear; subln (BitNet b1.58 2B4T) only those of the
    attention output and the MLP's down projection."""
    assert layout.normed_roles("faq") == layout.block_linears
    assert layout.normed_roles("subln") == (Role.ATTN_OUTPUT, Role.FFN_DOWN)


def test_subln_normalizes_the_linears_that_read_transformers_bitnet_sub_norms() -> None:
    """In transformers' BitNet model, the linear called right after each sub-norm is one subln normalizes."""
    model = _hf_model("BitNetForCausalLM")
    block = model.get_submodule(f"{HF_BITNET.blocks}.0")
    calls: list[str] = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or _is_norm(module):
            module.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))
    after_sub_norms = [calls[i + 1] for i, name in enumerate(calls[:-1]) if name.endswith("sub_norm")]
    assert after_sub_norms == [HF_BITNET.path(r) for r in HF_BITNET.normed_roles("subln")]
