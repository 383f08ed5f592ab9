"""FSDP2 with BitNet weights (bitnet_ao/fsdp.py, bitnet_ao/fsdp_gather.py), on CPU with gloo.

One ``torch.multiprocessing`` launch of 2 processes runs every 2-rank scenario and one launch of 4 processes the
HSDP one; rank 0 writes each scenario's figures to a JSON file and the tests below assert on them. Reference
for every training scenario: the same model on one process, fed each rank's micro-batch in turn, with the
gradients summed in FSDP's reduction order and averaged (single-process training with all-reduced gradients).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training, precompute_bitnet_scale_for_fsdp
from tests.conftest import read_results, run_distributed, scenario_result

# One module fixture spawns 2 then 4 gloo processes and runs every scenario (about a minute on 2 CPU cores).
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, BATCH, SEQ, STEPS = 32, 2, 8, 5


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


class ShardableLossLM(nn.Module):
    """Embedding and head in high precision, BitNet linears (one with a bias) in the blocks.

    Not tests/test_linear.py's ``ReferenceComparableLM``: this one returns the loss (a scenario's step is
    ``model(tokens).backward()``, the same on every rank and in the single-process reference), keeps its blocks
    in ``layers`` (``_shard`` gives each its own ``fully_shard``; the quantize filter selects ``layers.*``; the
    collective scenarios address ``layers[0].up``) and uses RMSNorm/SiLU like the Llama blocks FSDP shards.
    """

    def __init__(self, dim: int, hidden: int, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(n_layers))
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return F.cross_entropy(self.head(h).float().flatten(0, 1), tokens.roll(-1, 1).flatten())


def _model(dim: int, hidden: int, weights: str = "ternary", seed: int = 0) -> ShardableLossLM:
    torch.manual_seed(seed)
    model = ShardableLossLM(dim, hidden)
    quantize_(
        model,
        bitnet_training(weights=weights),
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("layers."),
    )
    return model


def _batch(step: int, rank: int) -> Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 * step + rank))


def _shard(model: nn.Module, reshard: bool, mesh=None, param_dtype: torch.dtype | None = None) -> nn.Module:
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def _tree_sum(xs: list[Tensor]) -> Tensor:
    """Pairwise sum: the order of a 2-rank reduce-scatter, or a (2, 2) HSDP reduce-scatter then all-reduce."""
    while len(xs) > 1:
        xs = [xs[i] + xs[i + 1] for i in range(0, len(xs), 2)]
    return xs[0]


def _reference_losses(model: nn.Module, world: int, steps: int, first_step: int = 0) -> list[float]:
    """Single-process training: every rank's micro-batch in turn, gradients summed as FSDP sums them."""
    opt = _optimizer(model)
    losses = []
    for step in range(first_step, first_step + steps):
        grads, step_losses = [], []
        for rank in range(world):
            loss = model(_batch(step, rank))
            loss.backward()
            step_losses.append(loss.item())
            grads.append([p.grad for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        for p, gs in zip(model.parameters(), zip(*grads, strict=True), strict=True):
            p.grad = _tree_sum(list(gs)) / world
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sum(step_losses) / world)
    return losses


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, precompute: bool, first_step: int = 0
) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(first_step, first_step + steps):
        loss = model(_batch(step, rank))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if precompute:
            precompute_bitnet_scale_for_fsdp(model)
        gathered = [None] * world
        dist.all_gather_object(gathered, loss.item())
        losses.append(sum(gathered) / world)
    return losses


def _compare(fsdp: list[float], ref: list[float]) -> dict:
    return {"fsdp": fsdp, "ref": ref, "max_rel_err": max(abs(a - b) / abs(b) for a, b in zip(fsdp, ref, strict=True))}


# --- 2-rank scenarios ------------------------------------------------------------------------------------


def _training(dim: int, hidden: int, reshard: bool, precompute: bool, weights: str = "ternary", **shard) -> dict:
    def run() -> dict:
        model = _shard(_model(dim, hidden, weights), reshard, **shard)
        losses = _train(model, _optimizer(model), STEPS, precompute)
        ref = _reference_losses(_model(dim, hidden, weights), dist.get_world_size(), STEPS) if _rank0() else []
        return _compare(losses, ref) if _rank0() else {}

    return run


@contextlib.contextmanager
def _counting(name: str) -> Iterator[list[int]]:
    """Record calls of ``torch.distributed.<name>`` (fsdp.py and FSDP2 call it through the module): the bytes of
    the input (the second argument) of an all-gather, 1 for anything else."""
    original, calls = getattr(dist, name), []

    def counted(*args, **kwargs):
        if "gather" in name:
            sent = kwargs["input_tensor"] if "input_tensor" in kwargs else args[1]
            calls.append(sent.numel() * sent.element_size())
        else:
            calls.append(1)
        return original(*args, **kwargs)

    setattr(dist, name, counted)
    try:
        yield calls
    finally:
        setattr(dist, name, original)


def _collectives() -> dict:
    """All-reduces (per weight: its scale sums) in precompute and in forward + backward with
    reshard_after_forward=True, so that the backward re-gathers all-gather again."""
    model = _shard(_model(32, 64), reshard=True)
    opt = _optimizer(model)

    def step(batch: int, update: bool = True) -> int:
        with _counting("all_reduce") as calls:
            model(_batch(batch, dist.get_rank())).backward()
        if update:
            opt.step()
            opt.zero_grad()
        return len(calls)

    counts = {"first_step": step(0)}
    with _counting("all_reduce") as calls:
        precompute_bitnet_scale_for_fsdp(model)
    counts["in_precompute"] = len(calls)
    counts["after_precompute"] = step(1, update=False)
    counts["accumulation_precomputed"] = step(2)  # the weights are unchanged: still no collective
    counts["no_precompute"] = step(3, update=False)
    counts["accumulation"] = step(4)  # a forward's own scale is not reused by the next forward
    precompute_bitnet_scale_for_fsdp(model)
    with torch.no_grad():  # the weights change after the precompute: its scale is stale and must not be used
        model.layers[0].up.weight.mul_(1.5)
    counts["stale"] = step(5)
    counts["n_weights"] = sum(isinstance(p.to_local(), BitNetTrainingLinearWeight) for p in model.parameters())
    return counts


def _bytes(dim: int, hidden: int) -> dict:
    """All-gather input bytes of the BitNet weights vs the same model all-gathered in BF16 by FSDP2."""
    measured = {}
    for name, quantize in (("bitnet", True), ("bf16", False)):
        model = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False))
        if quantize:
            quantize_(model, bitnet_training())
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        with _counting("all_gather_single") as sent:
            model(torch.randn(4, dim)).sum().backward()
        measured[name] = sum(sent)
    return measured


def _dcp(tmp: str) -> dict:
    """Save after 2 steps with DCP, keep training 3 steps; a fresh model loaded from the checkpoint must repeat
    those 3 steps exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _shard(_model(33, 36), reshard=True)
    opt = _optimizer(model)
    _train(model, opt, 2, precompute=True)
    msd, osd = get_state_dict(model, opt)
    saved_types = sorted({type(v.to_local()).__name__ for v in msd.values()})
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    uninterrupted = _train(model, opt, 3, precompute=True, first_step=2)

    resumed_model = _shard(_model(33, 36, seed=1), reshard=True)
    resumed_opt = _optimizer(resumed_model)
    msd, osd = get_state_dict(resumed_model, resumed_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=tmp)
    set_state_dict(resumed_model, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    precompute_bitnet_scale_for_fsdp(resumed_model)
    resumed = _train(resumed_model, resumed_opt, 3, precompute=True, first_step=2)
    kinds = {type(p.to_local()).__name__ for p in resumed_model.parameters()}
    return {"uninterrupted": uninterrupted, "resumed": resumed, "local_types": sorted(kinds), "saved": saved_types}


def _compiled() -> dict:
    """Blocks compiled (aot_eager: dynamo and AOT autograd trace the packed weight and the custom ops; inductor's
    codegen is not what this tests) give the eager losses."""
    eager_model = _shard(_model(32, 64), reshard=True)
    eager = _train(eager_model, _optimizer(eager_model), 3, precompute=True)
    model = _model(32, 64)
    for layer in model.layers:
        layer.compile(backend="aot_eager")
    model = _shard(model, reshard=True)
    compiled = _train(model, _optimizer(model), 3, precompute=True)
    return _compare(compiled, eager)


def _warmup() -> dict:
    """Quantization warmup (``bitnet_ao/warmup.py``) and FSDP2: a run resumed past its warmup trains exactly like
    one that never warmed up, and a model whose warmup started before ``fully_shard`` is refused at its
    all-gather (on every rank, before any collective) instead of training at ``lambda = 1`` silently."""
    from bitnet_ao.warmup import QuantizationWarmup

    never_warmed = _shard(_model(32, 64), reshard=True)
    expected = _train(never_warmed, _optimizer(never_warmed), 3, precompute=True)
    resumed = _shard(_model(32, 64), reshard=True)
    QuantizationWarmup(resumed, warmup_steps=4, last_step=4)
    losses = _train(resumed, _optimizer(resumed), 3, precompute=True)

    early = _model(32, 64)
    QuantizationWarmup(early, warmup_steps=4, last_step=2)
    early = _shard(early, reshard=True)
    try:
        early(_batch(0, dist.get_rank()))
        refusal = None
    except NotImplementedError as e:
        refusal = str(e)
    return {"resumed": losses, "never_warmed": expected, "refusal": refusal}


def _every_route() -> dict:
    """The packed all-gather output runs each CPU int8 route this machine has (the routes another CPU would
    choose included): FSDP2 equals the single process under every one."""
    from bitnet_ao.kernels import cpu_matmul
    from tests.conftest import exact_route_pairs

    original, errors = cpu_matmul.routes, {}
    try:
        for ternary, full in exact_route_pairs():
            cpu_matmul.routes = lambda t=ternary, f=full: {"ternary": t, "full": f}
            errors[ternary] = _training(33, 36, reshard=True, precompute=True)().get("max_rel_err")
    finally:
        cpu_matmul.routes = original
    return {"max_rel_err": errors}


def _rank0() -> bool:
    return dist.get_rank() == 0


def _hsdp() -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    result = _training(33, 36, reshard=True, precompute=True, mesh=mesh)()
    model = _shard(_model(33, 36), reshard=True, mesh=mesh)
    with _counting("all_reduce") as calls:
        precompute_bitnet_scale_for_fsdp(model)
    full = _model(33, 36).layers[0].up.weight._data
    sums = model.layers[0].up.weight._local_tensor._fsdp_scale_state.sums
    result.update(
        precompute_calls=len(calls),
        sums=sums.tolist(),
        ref_sums=[full.double().abs().sum().item(), full.double().sum().item()],
    )
    return result


SCENARIOS_2: dict[str, Callable[[], dict]] = {
    "fp32_reshard_precompute": _training(32, 64, reshard=True, precompute=True),
    "fp32_uneven_no_reshard_fallback": _training(33, 33, reshard=False, precompute=False),
    "binary_uneven": _training(33, 36, reshard=True, precompute=True, weights="binary"),
    "bf16_params": _training(32, 64, reshard=True, precompute=True, param_dtype=torch.bfloat16),
    "bf16_params_uneven": _training(33, 33, reshard=False, precompute=True, param_dtype=torch.bfloat16),
    "collectives": _collectives,
    "bytes": lambda: _bytes(64, 128),
    "bytes_odd": lambda: _bytes(33, 33),
    "compiled": _compiled,
    "every_route": _every_route,
    "warmup": _warmup,
}
SCENARIOS_4: dict[str, Callable[[], dict]] = {"hsdp": _hsdp}


def scenarios(world: int, out_dir: str) -> dict[str, Callable[[], dict]]:
    """The scenarios of a launch of ``world`` processes (``tests/conftest.py`` ``run_distributed``)."""
    if world == 4:
        return dict(SCENARIOS_4)
    return {**SCENARIOS_2, "dcp": lambda: _dcp(os.path.join(out_dir, "ckpt"))}


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, dict]]:
    with tempfile.TemporaryDirectory() as out_dir:
        saved = os.environ.get("BITNET_AO_COMPILE_MIN_NUMEL")
        # Inherited by the spawned workers: the tiny tensors run the op bodies eagerly, no inductor compiles.
        os.environ["BITNET_AO_COMPILE_MIN_NUMEL"] = str(1 << 40)
        try:
            for world in (2, 4):
                run_distributed(__name__, world, out_dir)
        finally:
            if saved is None:
                del os.environ["BITNET_AO_COMPILE_MIN_NUMEL"]
            else:
                os.environ["BITNET_AO_COMPILE_MIN_NUMEL"] = saved
        yield read_results(out_dir)


@pytest.mark.parametrize("name", ["fp32_reshard_precompute", "fp32_uneven_no_reshard_fallback", "binary_uneven"])
def test_fsdp_fp32_matches_single_process(results, name):
    r = scenario_result(results, name)
    assert r["max_rel_err"] < 1e-5, r


def test_fsdp_matches_single_process_on_every_cpu_route(results):
    errors = scenario_result(results, "every_route")["max_rel_err"]
    assert errors and all(e < 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("name", ["bf16_params", "bf16_params_uneven"])
def test_fsdp_bf16_param_dtype_close_to_single_process(results, name):
    r = scenario_result(results, name)
    assert r["max_rel_err"] < 1e-2, r


def test_precompute_is_one_collective_and_all_gathers_run_none(results):
    r = scenario_result(results, "collectives")
    n = r["n_weights"]
    assert n == 4, r
    assert r["in_precompute"] == 1, r
    assert r["after_precompute"] == r["accumulation_precomputed"] == 0, r  # forward all-gathers, backward re-gathers
    # Without a precompute: one per weight in the forward, the backward re-gathers reuse the forward's scale.
    assert r["first_step"] == r["no_precompute"] == r["accumulation"] == n, r
    assert r["stale"] == 1, r  # only the updated weight


def test_all_gather_moves_an_eighth_of_bf16(results):
    r = scenario_result(results, "bytes")
    assert r["bitnet"] * 8 == r["bf16"], r  # K a multiple of 4: exactly 1/8, the scale is not gathered
    odd = scenario_result(results, "bytes_odd")
    # K = 33 packs into ceil(33 / 4) = 9 bytes per row against 66; rows padded the same way in both.
    assert odd["bitnet"] * 66 == odd["bf16"] * 9, odd


def test_dcp_save_load_resume_equals_uninterrupted(results):
    r = scenario_result(results, "dcp")
    assert r["resumed"] == r["uninterrupted"], r
    assert "BitNetTrainingLinearWeight" in r["local_types"], "loading must keep the recipe"
    assert r["saved"] == ["Tensor"], "the checkpoint holds plain master-weight shards"


def test_compiled_blocks_match_eager(results):
    r = scenario_result(results, "compiled")
    assert r["max_rel_err"] < 1e-6, r


def test_warmup_resumed_past_its_end_is_plain_bitnet_and_lambda_below_one_is_refused(results):
    r = scenario_result(results, "warmup")
    assert r["resumed"] == r["never_warmed"], r
    assert r["refusal"] and "quantization warmup" in r["refusal"] and "then shard" in r["refusal"], r


def test_hsdp_2x2_matches_single_process_and_scales_are_global(results):
    r = scenario_result(results, "hsdp")
    assert r["max_rel_err"] < 1e-5, r
    assert r["precompute_calls"] == 1
    assert r["sums"] == pytest.approx(r["ref_sums"], rel=1e-12)
