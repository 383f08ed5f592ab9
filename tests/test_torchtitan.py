"""torchtitan 0.3.0 integration: converter, config registry, scale hook, FSDP2 training and DCP checkpoints.

The distributed test runs the pieces of torchtitan's trainer that work without CUDA (docs/torchtitan.md says
what stops ``torchtitan.train`` itself on CPU): the registry's model spec, meta-device build,
torchtitan's ``parallelize_llama`` (FSDP2 per block), ``to_empty`` + ``init_weights``, torchtitan's
optimizer container with the spec's ``post_optimizer_build_fn``, and torchtitan's DCP ``CheckpointManager``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time

import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'bitnet_ao[torchtitan]')")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention  # noqa: E402
from torchtitan.models.common.linear import Linear  # noqa: E402

import bitnet_ao  # noqa: E402
from bitnet_ao import BitNetTrainingConfig, BitNetTrainingLinearWeight  # noqa: E402
from bitnet_ao.integrations.torchtitan import BitNetConverter, BitNetLinear, register_bitnet_scale_hook  # noqa: E402
from bitnet_ao.integrations.torchtitan.config_registry import (  # noqa: E402
    llama3_8b_bitnet,
    llama3_debugmodel_bitnet,
    llama3_debugmodel_bitnet_tp,
)
from tests.conftest import free_port  # noqa: E402

STEPS = 8
N_LAYERS = 2  # of the debug model's 6, to keep the 2-process test fast on 2 CPU cores
VOCAB = 2048  # torchtitan's Llama 3 debug model
BITNET_BACKWARD = "_BitNetLinearFunctionBackward"


def _linear_types(model_config) -> dict[str, type]:
    return {fqn: type(cfg) for fqn, cfg, _, _ in model_config.traverse(Linear.Config)}


def _use_sdpa(model_config) -> None:
    """Swap FlexAttention (no CPU backward) for SDPA, as torchtitan's own graph_trainer tests do.

    torchtitan 0.3.0's ``get_attention_config`` rejects ``"sdpa"`` for language models (SDPA ignores
    document boundaries), so the backend cannot be picked by name; the inner-attention config is replaced.
    """
    for _, _, parent, attr in list(model_config.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())


# --- single process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [llama3_debugmodel_bitnet, llama3_8b_bitnet])
def test_registry_converts_every_linear_but_lm_head(entry):
    config = entry()
    types_by_fqn = _linear_types(config.model_spec.model)
    assert types_by_fqn.pop("lm_head") is Linear.Config
    assert types_by_fqn and all(t is BitNetLinear.Config for t in types_by_fqn.values()), types_by_fqn
    assert config.model_spec.post_optimizer_build_fn is register_bitnet_scale_hook


def test_cli_module_and_config_select_the_bitnet_job():
    # What `-m torchtitan.train --module bitnet_ao.integrations.torchtitan --config ...` parses.
    args = ["--module", "bitnet_ao.integrations.torchtitan", "--config", "llama3_debugmodel_bitnet"]
    config = ConfigManager().parse_args([*args, "--training.steps", "3"])
    assert config.training.steps == 3
    assert config.model_spec.post_optimizer_build_fn is register_bitnet_scale_hook
    assert type(config.model_spec.model.layers[0].feed_forward.w1) is BitNetLinear.Config


def test_converter_options_and_filters():
    from torchtitan.models.llama3 import model_registry

    converter = BitNetConverter.Config(fqns=["feed_forward"], int8_grad_weight=False, weights="binary")
    model_config = model_registry("debugmodel", converters=[converter]).model
    for fqn, cfg, _, _ in model_config.traverse(Linear.Config):
        if "feed_forward" in fqn:
            assert cfg.bitnet == BitNetTrainingConfig(int8_grad_weight=False, weights="binary"), fqn
        else:
            assert type(cfg) is Linear.Config, fqn

    with pytest.raises(ValueError, match="no Linear.Config matched"):
        model_registry("debugmodel", converters=[BitNetConverter.Config(fqns=["no_such_linear"])])
    with pytest.raises(ValueError, match="not a plain Linear.Config"):
        model_registry("debugmodel", converters=[BitNetConverter.Config(), BitNetConverter.Config()])
    with pytest.raises(ValueError, match="'ternary' or 'binary'"):
        BitNetConverter.Config(weights="int4").build()


def test_converter_options_are_the_recipe_fields():
    """The ``bitnet_training`` options are ``BitNetTrainingConfig``'s fields (default and help), but the group
    dimension, which each linear takes from its tensor-parallel role."""
    options = {f.name: f for f in dataclasses.fields(BitNetConverter.Config)}
    for f in dataclasses.fields(BitNetTrainingConfig):
        if f.name == "group_dim":
            assert f.name not in options
        else:
            assert (options[f.name].default, options[f.name].metadata) == (f.default, f.metadata), f.name
    assert BitNetConverter.Config().to_dict() == {
        "model_compile_enabled": False,
        "int8_grad_input": True,
        "int8_grad_weight": True,
        "weights": "ternary",
        "scale_groups": 1,
        "fqns": [],
        "filter_fqns": ["lm_head"],
        "quantization_warmup_steps": 0,
    }


def test_meta_build_to_empty_and_init_keep_bitnet_weights():
    config = llama3_debugmodel_bitnet()
    model_config = config.model_spec.model
    model_config.layers = model_config.layers[:2]
    _use_sdpa(model_config)
    with torch.device("meta"):
        model = model_config.build()
    model.verify_module_protocol()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)

    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n}
    for name, w in weights.items():
        expect_bitnet = name not in ("lm_head.weight", "tok_embeddings.weight")
        assert isinstance(w, BitNetTrainingLinearWeight) == expect_bitnet, name
    # trunc_normal_(std=0.02) reached the master weight through the subclass.
    wqkv = model.layers["0"].attention.qkv_linear.wqkv.weight
    assert wqkv.device.type == "cpu" and 0.015 < wqkv._data.std().item() < 0.025

    seen = _record_linear_backward(model)
    tokens = torch.randint(0, VOCAB, (2, 17))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert seen and set(seen.values()) == {BITNET_BACKWARD}, seen
    assert wqkv.grad is not None and torch.isfinite(wqkv.grad).all()


def test_checkpoint_storage_check_sees_the_master_weight():
    # torchtitan's checkpoint ModelWrapper compares state-dict tensors by untyped_storage().data_ptr(); a
    # wrapper subclass has no storage of its own, so the weight must answer with its master weight's.
    from torchtitan.components.checkpointer.base import _shares_storage

    weight = BitNetLinear.Config(in_features=16, out_features=8).build().weight
    assert _shares_storage(weight.detach(), weight)
    assert not _shares_storage(weight.detach().clone(), weight)


def _record_linear_backward(model: torch.nn.Module) -> dict[str, str]:
    """Record, per BitNet linear, the autograd node its output came from: proof that its F.linear ran the
    BitNet function (a weight that lost its subclass, e.g. in an FSDP all-gather, gives a plain matmul)."""
    seen: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitNetLinear):
            module.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, _linear_node(out)))
    return seen


def _linear_node(out: torch.Tensor) -> str:
    """The autograd node that made a linear's output; under tensor parallelism the output is a DTensor made
    from the local result (and redistributed), so the node is the one behind that DTensor glue."""
    node = out.grad_fn
    while any(glue in type(node).__name__ for glue in ("FromTorchTensor", "Redistribute")):
        node = node.next_functions[0][0]
    return type(node).__name__


# --- 2 processes, gloo, FSDP2 --------------------------------------------------------------------------


def _build_parallel_model(config, parallel_dims, dump_folder: str) -> torch.nn.Module:
    """The trainer's model pipeline (trainer.py): meta build, parallelize_fn, to_empty, init_weights."""
    from torch.distributed.fsdp import FSDPModule

    model_spec = config.model_spec
    with torch.device("meta"):
        model = model_spec.model.build()
    model = model_spec.parallelize_fn(
        model,
        parallel_dims=parallel_dims,
        training=config.training,
        parallelism=config.parallelism,
        compile_config=config.compile,
        ac_config=config.activation_checkpoint,
        dump_folder=dump_folder,
    )
    # gloo has neither AVG nor PREMUL_SUM: reduce-scatter with SUM and divide afterwards (same mean).
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return model


def _worker(rank: int, port: int, tmp: str, tp: bool, world: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ["BITNET_AO_COMPILE_MIN_NUMEL"] = "1000000000"  # no inductor compile of the CPU helpers
    torch.manual_seed(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train_and_checkpoint(rank, tmp, tp, world)
    finally:
        dist.destroy_process_group()


def _train_and_checkpoint(rank: int, tmp: str, tp: bool, world: int) -> None:
    """The trainer's pipeline: FSDP2 over every rank, or tensor parallelism of degree 2
    (``llama3_debugmodel_bitnet_tp``: sequence parallel, 2 scale groups per linear) with FSDP2 over the rest;
    8 steps, then a DCP checkpoint saved and loaded into a fresh job."""
    # torchtitan names its device with `_get_available_device_type() or "cuda"` (tools/utils.py): on a
    # machine without CUDA, ParallelDims would build its mesh on "cuda". Point that module at the CPU.
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    parallel_dims_module.device_type = "cpu"

    def job_config():
        config = llama3_debugmodel_bitnet_tp() if tp else llama3_debugmodel_bitnet()
        config.model_spec.model.layers = config.model_spec.model.layers[:N_LAYERS]
        _use_sdpa(config.model_spec.model)
        config.training.seq_len = 32
        # spmd_types (the default) hands fully_shard annotated plain tensors where, with dp_shard > 1, it
        # wants DTensors: stock Llama 3 fails the same way outside the trainer. partial_dtensor is plain FSDP2.
        config.parallelism.spmd_backend = "partial_dtensor"
        config.model_spec.model.update_from_config(config=config)
        return config

    config = job_config()
    dist_utils.set_spmd_backend(config.parallelism.spmd_backend)
    parallel_dims = ParallelDims.from_config(config.parallelism, world)
    parallel_dims.build_mesh()
    model = _build_parallel_model(config, parallel_dims, tmp)

    w1 = model.layers["0"].feed_forward.w1.weight
    assert isinstance(w1, DTensor) and isinstance(w1.to_local(), BitNetTrainingLinearWeight), type(w1)
    assert not isinstance(model.lm_head.weight.to_local(), BitNetTrainingLinearWeight)

    precompute = bitnet_ao.precompute_bitnet_scale_for_fsdp
    calls = []

    def counting_precompute(model_parts):
        calls.append(len(model_parts))
        return precompute(model_parts)

    bitnet_ao.precompute_bitnet_scale_for_fsdp = counting_precompute

    optimizers = config.optimizer.build(model_parts=[model])
    config.model_spec.post_optimizer_build_fn(optimizers, [model], parallel_dims)
    lr_schedulers = config.lr_scheduler.build(optimizers=optimizers, training_steps=STEPS)

    # Data-parallel ranks see different batches, the ranks of a tensor-parallel group the same one.
    data_rank = rank // 2 if tp else rank  # torchtitan's mesh puts "tp" innermost
    tokens = torch.randint(
        0, VOCAB, (2, config.training.seq_len + 1), generator=torch.Generator().manual_seed(data_rank)
    )
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def loss_of(m):
        logits = m(inputs)
        if isinstance(logits, DTensor):  # tensor parallel: the head's output is sharded over the vocabulary
            logits = logits.full_tensor()
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    seen = _record_linear_backward(model)
    losses = []
    start = time.perf_counter()
    for _ in range(STEPS):
        optimizers.zero_grad()
        loss = loss_of(model)
        loss.backward()
        optimizers.step()
        lr_schedulers.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    assert len(seen) == 5 * N_LAYERS and set(seen.values()) == {BITNET_BACKWARD}, seen
    assert calls == [1] * STEPS, calls
    assert losses[-1] < losses[0] - 0.5, losses

    def checkpointer(m, opt, sched):
        return CheckpointManager.Config(enable=True, folder="checkpoint", interval=STEPS).build(
            dataloader=None,
            model_parts=[m],
            optimizers=opt,
            lr_schedulers=sched,
            states={},
            sd_adapter=None,
            base_folder=tmp,
        )

    checkpointer(model, optimizers, lr_schedulers).save(curr_step=STEPS)
    with torch.no_grad():
        trained_loss = loss_of(model).item()

    # A fresh job: new model (differently initialized), optimizer and schedulers; load the DCP checkpoint.
    torch.manual_seed(1)
    config2 = job_config()
    model2 = _build_parallel_model(config2, parallel_dims, tmp)
    optimizers2 = config2.optimizer.build(model_parts=[model2])
    lr_schedulers2 = config2.lr_scheduler.build(optimizers=optimizers2, training_steps=STEPS)
    assert checkpointer(model2, optimizers2, lr_schedulers2).load(step=STEPS)

    for module in (*model.modules(), *model2.modules()):  # the last FSDP group stays unsharded after forward
        if isinstance(module, FSDPModule):
            module.reshard()
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert isinstance(p, DTensor) and isinstance(p2, DTensor), name
        assert type(p.to_local()) is type(p2.to_local()), name
        torch.testing.assert_close(p2.full_tensor(), p.full_tensor(), rtol=0, atol=0, msg=name)
    with torch.no_grad():
        assert loss_of(model2).item() == trained_loss
    if rank == 0:
        print(f"losses {[round(x, 3) for x in losses]}, {STEPS} steps in {train_s:.1f}s")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("tp", "world"), [(False, 2), (True, 2), (True, 4)], ids=["fsdp2", "tp2", "fsdp2xtp2"])
def test_training_with_scale_hook_and_dcp_checkpoint(tp, world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(free_port(), tmp, tp, world), nprocs=world, join=True)


def _warmup_job(warmup_steps: int, mesh=None):
    """torchtitan's Llama 3 debug model (one block, SDPA) converted with ``quantization_warmup_steps``, sharded with
    FSDP2 over ``mesh`` when given, and its optimizers with the BitNet job's post-optimizer hook registered."""
    from torch.distributed.fsdp import fully_shard
    from torchtitan.models.llama3 import model_registry

    config = llama3_debugmodel_bitnet()
    spec = model_registry("debugmodel", converters=[BitNetConverter.Config(quantization_warmup_steps=warmup_steps)])
    model_config = spec.model
    model_config.layers = model_config.layers[:1]
    _use_sdpa(model_config)
    torch.manual_seed(0)
    model = model_config.build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    if mesh is not None:
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizers = config.optimizer.build(model_parts=[model])
    register_bitnet_scale_hook(optimizers, [model], parallel_dims=None)
    return model, optimizers


def _warmup_job_step(model, optimizers, tokens: torch.Tensor) -> float:
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizers.step()
    optimizers.zero_grad()
    return loss.item()


def _strength(weight: torch.Tensor) -> float:
    """lambda of a BitNet weight as a number: 1 where it has none (the INT8 path)."""
    return 1.0 if weight.quantization_strength is None else float(weight.quantization_strength)


def test_converter_quantization_warmup_follows_the_optimizer_step():
    """``BitNetConverter.Config(quantization_warmup_steps=N)``: the post-optimizer hook sets lambda from the optimizer
    state's step count before each forward (so a restored optimizer state resumes the warmup), up to 1."""
    model, optimizers = _warmup_job(warmup_steps=2)
    weight = model.layers["0"].feed_forward.w1.weight
    tokens = torch.randint(0, VOCAB, (2, 9))
    seen = []
    for _ in range(4):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        seen.append(_strength(weight))
        loss.backward()
        optimizers.step()
        optimizers.zero_grad()
    assert seen == [0.0, 0.5, 1.0, 1.0]
    assert model.lm_head.weight.__class__ is torch.nn.Parameter


def test_converter_quantization_warmup_under_fsdp2_resumes_past_its_end_and_refuses_lambda_below_one(tmp_path):
    """FSDP2 all-gathers packed ternary weights, so a warmup cannot run there; a job resumed past its warmup can.
    The hook builds its warmup at the first forward, after the checkpoint restored the optimizer's step count: the
    resumed job trains bit for bit like the same job without warmup, and a fresh one is refused at its first
    forward. One FSDP2 rank; the checkpoint is the model and optimizer state dicts."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        model, optimizers = _warmup_job(warmup_steps=0, mesh=mesh)
        for _ in range(2):
            _warmup_job_step(model, optimizers, tokens)
        checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizers.state_dict()})
        uninterrupted = [_warmup_job_step(model, optimizers, tokens) for _ in range(2)]

        resumed, resumed_optimizers = _warmup_job(warmup_steps=2, mesh=mesh)
        resumed.load_state_dict(checkpoint["model"])
        resumed_optimizers.load_state_dict(checkpoint["optimizer"])
        assert [_warmup_job_step(resumed, resumed_optimizers, tokens) for _ in range(2)] == uninterrupted

        fresh, fresh_optimizers = _warmup_job(warmup_steps=2, mesh=mesh)
        with pytest.raises(NotImplementedError, match="sharded with FSDP2.*Warm up on one device"):
            _warmup_job_step(fresh, fresh_optimizers, tokens)
    finally:
        dist.destroy_process_group()
