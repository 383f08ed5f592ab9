"""``BitNetTrainingLinearWeight`` behaves like the plain weight everywhere but ``F.linear``."""

from __future__ import annotations

import copy
import io
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_inference, bitnet_training, unquantize_
from tests.conftest import save_load_roundtrip


def _quantized(dtype: torch.dtype = torch.float32, **config) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False)).to(dtype)
    quantize_(model, bitnet_training(**config))
    return model


def test_optimizer_updates_master_weight_in_place():
    model = _quantized()
    weight = model[0].weight
    before = weight._data.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert model[0].weight is weight and isinstance(weight, BitNetTrainingLinearWeight)
    assert not torch.equal(weight._data, before)
    # Optimizer state is plain: no quantization recipe leaks into exp_avg / exp_avg_sq.
    assert all(type(v) is torch.Tensor for v in opt.state[weight].values())


def test_state_dict_roundtrip_weights_only_into_quantized_and_plain():
    model = _quantized(weights="binary")
    sd = save_load_roundtrip(model.state_dict())
    # A checkpoint carries the master weights as plain tensors, not the recipe (tests/test_checkpoint_hooks.py).
    assert all(type(v) is torch.Tensor for v in sd.values())

    fresh = _quantized()
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(sd)
    plain = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))
    plain.load_state_dict(sd)
    for name, p in model.named_parameters():
        loaded = dict(fresh.named_parameters())[name]
        data = p._data if isinstance(p, BitNetTrainingLinearWeight) else p
        assert isinstance(loaded, BitNetTrainingLinearWeight) == isinstance(p, BitNetTrainingLinearWeight), name
        assert torch.equal(loaded._data if isinstance(loaded, BitNetTrainingLinearWeight) else loaded, data)
        assert type(dict(plain.named_parameters())[name]) is nn.Parameter
        assert torch.equal(dict(plain.named_parameters())[name], data)


def test_weight_itself_pickles_with_its_recipe_weights_only():
    weight = _quantized(weights="binary")[0].weight
    loaded = save_load_roundtrip(weight)
    assert isinstance(loaded, BitNetTrainingLinearWeight) and loaded.config == weight.config
    assert torch.equal(loaded._data, weight._data) and loaded.requires_grad


def test_plain_state_dict_loads_into_quantized_model():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))
    model = _quantized()
    model.load_state_dict(save_load_roundtrip(plain.state_dict()))
    assert isinstance(model[0].weight, BitNetTrainingLinearWeight)
    assert torch.equal(model[0].weight._data, plain[0].weight)


def test_deepcopy_detach_clone_to():
    model = _quantized()
    w = model[0].weight
    for other, shares_storage in ((copy.deepcopy(model)[0].weight, False), (w.detach(), True), (w.clone(), False)):
        assert isinstance(other, BitNetTrainingLinearWeight) and torch.equal(other._data, w._data)
        assert (other._data.data_ptr() == w._data.data_ptr()) == shares_storage
    assert copy.deepcopy(model)[0].weight.requires_grad
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert isinstance(bf16[0].weight, BitNetTrainingLinearWeight) and bf16[0].weight.dtype == torch.bfloat16
    assert bf16[0].weight._data.dtype == torch.bfloat16
    assert bf16(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_plain_ops_return_plain_tensors():
    w = _quantized()[0].weight
    assert type(w * 2) is torch.Tensor and torch.equal(w * 2, w._data * 2)
    assert type(w.sum()) is torch.Tensor


def test_unquantize_restores_plain_linear():
    model = _quantized()
    expected = model[0].weight._data.clone()
    unquantize_(model)
    assert type(model[0].weight) is nn.Parameter and torch.equal(model[0].weight, expected)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model[0](x), x @ expected.t() + model[0].bias)


def test_requantize_with_another_recipe_is_refused_and_the_same_recipe_is_a_no_op():
    model = _quantized()
    weight, master = model[0].weight, model[0].weight._data.clone()
    with pytest.raises(
        ValueError, match=r"Linear\(in_features=16, out_features=24.*already trains as BitNet.*unquantize_"
    ):
        quantize_(model, bitnet_training(weights="binary"))
    assert model[0].weight is weight and weight.config == bitnet_training() and torch.equal(weight._data, master)
    quantize_(model, bitnet_training())
    assert model[0].weight is weight, "the same recipe again keeps the parameter (and its optimizer state)"
    unquantize_(model)  # the explicit way to change the recipe
    quantize_(model, bitnet_training(weights="binary"))
    assert model[0].weight.config.weights == "binary" and torch.equal(model[0].weight._data, master)


@pytest.mark.parametrize("config", [bitnet_training(), bitnet_inference()], ids=["training", "packed"])
def test_a_filter_that_selects_nothing_warns_with_the_number_of_linears(config):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="converted no module of Sequential.* none of its 2 nn.Linear") as seen:
        quantize_(model, config, filter_fn=lambda m, fqn: "q_prj" in fqn)  # a typo
    assert seen[0].filename == __file__, "the warning points at the quantize_ call"
    assert type(model[0].weight) is nn.Parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(model, config, filter_fn=lambda m, fqn: fqn == "2")  # one linear selected: no warning
        quantize_(nn.Sequential(nn.Linear(4, 4)), Int8WeightOnlyConfig())  # another recipe: not ours to judge


@pytest.mark.parametrize("inference", [False, True], ids=["training", "packed"])
def test_whole_model_loads_weights_only_with_only_the_users_classes_allowlisted(inference):
    """docs/usage.md: a pickled model loads with torch.load(weights_only=True) once the user allowlists their own
    module classes; bitnet_ao registers everything of its own (weights, recipes, checkpoint hooks)."""
    model = _quantized()
    if inference:
        quantize_(model, bitnet_inference())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([nn.Sequential, nn.Linear, nn.ReLU]):
        loaded = torch.load(buf, weights_only=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    loaded.load_state_dict(model.state_dict())  # the hooks came along and still work


def _with_global_renamed(saved: bytes, old: str, new: str) -> bytes:
    """A ``torch.save`` archive whose pickle names the global ``old`` (``module.name``) as ``new``."""
    src, out = zipfile.ZipFile(io.BytesIO(saved)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):  # protocol 2: GLOBAL "module\nname\n"
                old_line, new_line = ("\n".join(p.rsplit(".", 1)).encode() + b"\n" for p in (old, new))
                assert old_line in data, old
                data = data.replace(old_line, new_line)
            dst.writestr(info.filename, data)
    return out.getvalue()


@pytest.mark.parametrize("weights_only", [True, False])
def test_whole_models_pickled_with_the_hooks_former_paths_still_load(weights_only):
    """Models pickled before the checkpoint hooks moved to bitnet_ao/checkpoint_hooks.py name them by their former
    paths (in bitnet_ao/tensor.py and bitnet_ao/inference.py); they load, with or without weights_only, and their
    hooks work."""
    model = _quantized()
    quantize_(model, bitnet_inference())
    buf = io.BytesIO()
    torch.save(model, buf)
    saved = buf.getvalue()
    for new, old in (
        ("_master_weight_state_dict_hook", "bitnet_ao.tensor._state_dict_post_hook"),
        ("_master_weight_load_hook", "bitnet_ao.tensor._load_state_dict_pre_hook"),
        ("_packed_weight_state_dict_hook", "bitnet_ao.inference._state_dict_post_hook"),
        ("_packed_weight_load_hook", "bitnet_ao.inference._load_state_dict_pre_hook"),
    ):
        saved = _with_global_renamed(saved, f"bitnet_ao.checkpoint_hooks.{new}", old)
    with torch.serialization.safe_globals([nn.Sequential, nn.Linear, nn.ReLU]):
        loaded = torch.load(io.BytesIO(saved), weights_only=weights_only)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    sd = loaded.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values()) and "0.weight_scale" in sd
    loaded.load_state_dict(model.state_dict())


def test_quantize_rejects_integer_weight_naming_the_module():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"Linear\(in_features=4, out_features=4.*int8"):
        quantize_(layer, bitnet_training())


@pytest.mark.parametrize("shape", [(64, 0), (0, 64)])
def test_an_empty_linear_is_refused_naming_it(shape):
    with pytest.raises(
        ValueError, match=rf"nn.Linear\(in_features={shape[0]}, out_features={shape[1]}\) has no weights"
    ):
        quantize_(nn.Linear(*shape), bitnet_training())


def test_a_compiled_graph_traced_under_other_cpu_routes_is_not_loaded(force_routes, monkeypatch, tmp_path):
    """The weight's layout choices come from the CPU's int8 routes (measured per machine, or forced with
    ``BITNET_AO_CPU_INT8_ROUTE``) and are constants of a compiled graph: the on-disk AOT autograd cache hits for the
    same routes and misses under routes that lay the operands out otherwise (``int_mm`` takes the ternary operand
    either way, ``fp32`` contiguous along K), instead of running a graph traced for the other route."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = _quantized()
    weight, x = model[0].weight, torch.randn(4, 16)

    def compile_and_count() -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        out = torch.compile(lambda x: torch.nn.functional.linear(x, weight), fullgraph=True)(x)
        out.sum().backward()
        assert torch.equal(out, torch.nn.functional.linear(x, weight))
        return counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"]

    with torch._functorch.config.patch(enable_autograd_cache=True):
        force_routes("int_mm", "fp32")
        assert compile_and_count() == (0, 1)
        assert compile_and_count() == (1, 0)
        force_routes("fp32", "fp32")
        assert compile_and_count() == (0, 1)
    torch._dynamo.reset()
