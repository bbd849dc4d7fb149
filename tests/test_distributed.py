"""NEAT under torch.distributed on CPU (gloo): DDP equality, FSDP2 sharding, and guards for unsupported sharding.

The two-process tests spawn workers with torch.multiprocessing; each worker writes its results to safetensors
files that the test compares against a single-process reference computed here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import enum
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from neat_peft import NeatConfig, NeatLayer, get_neat_model
from neat_peft.distributed import ShardingError, check_sharding, is_dtensor, shard_model
from neat_peft.model import count_adapter_parameters

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")

DIM, HIDDEN, SEQ, CLASSES = 16, 32, 5, 4
STEPS, PER_RANK_BATCH, WORLD = 3, 4, 2
TIMEOUT = datetime.timedelta(seconds=120)
SPAWN_DEADLINE = 300  # seconds; a run takes 5-30 s


class Block(nn.Module):
    """Transformer-shaped: gated 'attention' projections and an MLP, with residuals and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(DIM, DIM)
        self.value = nn.Linear(DIM, DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x):
        x = x + torch.tanh(self.query(x)) * self.value(x)
        return self.norm(x + self.down(F.gelu(self.up(x))))


class TinyNet(nn.Module):
    def __init__(self, n_blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def build_model(init_weights: bool = True):
    torch.manual_seed(0)
    config = NeatConfig(r=4, depth=1, target_modules=["query", "value", "up", "down"], modules_to_save=["head"],
                        init_weights=init_weights)
    return get_neat_model(TinyNet(), config)


def make_data(global_batch: int):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, global_batch, SEQ, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (STEPS, global_batch), generator=generator)
    return inputs, labels


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for x, y in zip(inputs, labels):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def process_group(rank: int, world: int, init_file: Path):
    """A worker's gloo group. A worker that fails tears the group down and raises (mp.spawn reports it). A worker
    that succeeds meets the others at a barrier and exits at once: gloo's teardown, with the peer already gone, hung
    twice on a loaded 2-core machine (torch 2.13, the main thread in a futex wait after every file was written)."""
    torch.set_num_threads(1)  # the CI machine has 2 cores for 2 processes
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    os._exit(0)  # every result is on disk (closed files); nothing else of this process is wanted


def spawn(worker, tmp_path: Path, *args) -> None:
    """Run `worker` on WORLD processes; a run that outlives SPAWN_DEADLINE is killed and fails the test (a hang
    must not hold CI)."""
    context = mp.spawn(worker, args=(WORLD, tmp_path / "rendezvous", tmp_path, *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {SPAWN_DEADLINE} s (ranks {alive}); killed")


# --- DDP ---------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: Path, out: Path) -> None:
    with process_group(rank, world, init_file):
        from torch.nn.parallel import DistributedDataParallel

        model = build_model()
        ddp = DistributedDataParallel(model)
        inputs, labels = make_data(world * PER_RANK_BATCH)
        mine = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        train(ddp, inputs[:, mine], labels[:, mine])
        save_file(trainable_state(model), str(out / f"rank{rank}.safetensors"))
        model.save_pretrained(out / "adapter")  # every rank calls it, rank 0 writes


def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    spawn(_ddp_worker, tmp_path)
    inputs, labels = make_data(WORLD * PER_RANK_BATCH)
    reference = build_model()
    initial = trainable_state(reference)
    train(reference, inputs, labels)
    expected = trainable_state(reference)

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert set(ranks[0]) == set(expected) and any("neat_A" in k for k in expected) and any("head" in k for k in expected)
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"DDP ranks disagree on {name}"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(value, initial[name]), f"{name} did not train"

    # Teeth: training on one rank's half alone ends somewhere else.
    half = build_model()
    train(half, inputs[:, :PER_RANK_BATCH], labels[:, :PER_RANK_BATCH])
    assert max((trainable_state(half)[n] - v).abs().max() for n, v in expected.items()) > 1e-3

    # Only rank 0 wrote the adapter, and it holds the trained weights.
    reference.save_pretrained(tmp_path / "reference")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for key, value in load_file(str(tmp_path / "reference" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6)


# --- FSDP2 -------------------------------------------------------------------------------------------------
def _fsdp2_worker(rank: int, world: int, init_file: Path, out: Path) -> None:
    with process_group(rank, world, init_file):
        from torch.distributed.device_mesh import init_device_mesh

        model = build_model(init_weights=False)  # B != 0: the output depends on H, hence on all of W0
        reference = copy.deepcopy(model)
        inputs, labels = make_data(world * PER_RANK_BATCH)
        shard_model(model, model.base_model.blocks, mesh=init_device_mesh("cpu", (world,)))

        layer = model.base_model.blocks[0].query
        assert is_dtensor(layer.base_layer.weight) and is_dtensor(layer.neat_A["default"].weight)
        assert layer.base_layer.weight.to_local().shape == (DIM // world, DIM), "W0 is not sharded"

        # H computed inside NeatLayer.forward sees the unsharded W0: same output as the unsharded model.
        with torch.no_grad():
            torch.testing.assert_close(model(inputs[0]), reference(inputs[0]), rtol=1e-5, atol=1e-6)

        # The adapter saved from the sharded model (gathered) is the unsharded model's file, bit for bit.
        model.save_pretrained(out / "sharded_init")
        if rank == 0:
            reference.save_pretrained(out / "unsharded_init")

        # Only adapter (and modules_to_save) parameters get gradients.
        mine = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        F.cross_entropy(model(inputs[0, mine]), labels[0, mine]).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert with_grad == trainable and all("neat_" in n or ".copies." in n for n in with_grad), with_grad
        model.zero_grad(set_to_none=True)

        train(model, inputs[:, mine], labels[:, mine])
        model.save_pretrained(out / "sharded_trained")
        train(reference, inputs, labels)
        if rank == 0:
            reference.save_pretrained(out / "unsharded_trained")

        # Eval without grad (where NeatLayer caches H): right after training, and after an in-place change that
        # only reaches the unsharded weights through FSDP2's next all-gather (the cache must notice).
        model.eval(), reference.eval()
        with torch.no_grad():
            before = model(inputs[0])
            torch.testing.assert_close(before, reference(inputs[0]), rtol=1e-4, atol=1e-5)
            for m in (model, reference):
                m.base_model.blocks[0].query.neat_A["default"].weight.mul_(1.5)
            after = model(inputs[0])
            torch.testing.assert_close(after, reference(inputs[0]), rtol=1e-4, atol=1e-5)
            assert (after - before).abs().max() > 1e-3


def test_fsdp2_matches_unsharded_model(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
    spawn(_fsdp2_worker, tmp_path)

    def read(name):
        directory = tmp_path / name
        return (directory / "adapter_config.json").read_text(), load_file(str(directory / "adapter_model.safetensors"))

    sharded_config, sharded = read("sharded_init")
    unsharded_config, unsharded = read("unsharded_init")
    assert sharded_config == unsharded_config
    assert sharded.keys() == unsharded.keys()
    for key in unsharded:
        assert torch.equal(sharded[key], unsharded[key]), key

    _, trained_sharded = read("sharded_trained")
    _, trained_unsharded = read("unsharded_trained")
    adapter_keys = [key for key in trained_unsharded if ".peanut_" in key or ".neat_" in key]
    assert len(adapter_keys) == 2 * 4 * 4  # 2 blocks x 4 targets x (A, B, 1 encoder, 1 decoder)
    for key in trained_unsharded:
        torch.testing.assert_close(trained_sharded[key], trained_unsharded[key], rtol=1e-5, atol=1e-6)
    for key in adapter_keys:  # the comparison above is only meaningful if training changed them
        assert not torch.equal(trained_unsharded[key], unsharded[key]), f"{key} did not train"


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group in the test process, enough for fully_shard to build DTensors."""
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            timeout=TIMEOUT)
    yield
    dist.destroy_process_group()


def test_neat_after_fully_shard_raises_at_wrap_time(single_process_group):
    from torch.distributed.fsdp import fully_shard

    net = TinyNet()
    for block in net.blocks:
        fully_shard(block)
    before = {n: type(m) for n, m in net.named_modules()}
    with pytest.raises(ShardingError, match=r"blocks\.0\.query.*already a sharded DTensor.*get_neat_model"):
        get_neat_model(net, NeatConfig(r=2, target_modules=["query", "value"]))
    assert {n: type(m) for n, m in net.named_modules()} == before  # untouched


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # FSDPLinear returns a view: the bad setup itself
def test_sharding_a_base_layer_alone_is_rejected(single_process_group):
    model = build_model(init_weights=False)
    x = torch.randn(2, SEQ, DIM)
    inner = model.base_model.blocks[1].value.base_layer
    with pytest.raises(ShardingError, match=r"blocks\.1\.value\.base_layer was sharded on its own"):
        shard_model(model, [inner])
    # Used anyway: the layer refuses to compute H from the resharded W0 rather than returning other numbers.
    with pytest.raises(ShardingError, match=r"whole base_layer\.weight of layer 'blocks\.1\.value'.*DTensor"):
        model(x)


# --- DeepSpeed ZeRO-3 (not installed here: a stand-in with ZeRO-3's parameter life cycle) ----------------------
class FakeZeroStatus(enum.Enum):  # deepspeed.runtime.zero.partition_parameters.ZeroParamStatus
    AVAILABLE = 1
    NOT_AVAILABLE = 2


def partition_like_zero3(param: nn.Parameter) -> torch.Tensor:
    """What ZeRO-3 leaves of a parameter outside its module's forward: ds_* metadata, an empty visible tensor."""
    full = param.data
    param.ds_shape, param.ds_numel = full.shape, full.numel()
    param.ds_status = FakeZeroStatus.NOT_AVAILABLE
    param.data = torch.empty(0, dtype=full.dtype)
    return full


def gather_like_zero3(param: nn.Parameter, full: torch.Tensor) -> None:
    param.data = full
    param.ds_status = FakeZeroStatus.AVAILABLE


class FakeZero3:
    """ZeRO-3's schedule on one process: every parameter is partitioned except while the module owning it runs
    (its direct parameters only), and a module of a leaf type gathers every parameter under it for its forward
    (deepspeed.utils.set_z3_leaf_modules)."""

    def __init__(self, model: nn.Module, leaf_types: tuple[type, ...] = ()):
        self.full = {param: partition_like_zero3(param) for param in model.parameters()}
        self._hook(model, leaf_types)

    def _hook(self, module: nn.Module, leaf_types) -> None:
        leaf = isinstance(module, leaf_types)
        params = list(module.parameters(recurse=leaf))
        if params:
            def gather(*_):
                for p in params:
                    gather_like_zero3(p, self.full[p])

            def release(*_):
                for p in params:
                    partition_like_zero3(p)

            module.register_forward_pre_hook(gather)
            module.register_forward_hook(release)
        if not leaf:
            for child in module.children():
                self._hook(child, leaf_types)


ZERO3_CONFIG = NeatConfig(r=2, target_modules=["query", "value"], init_weights=False)


def test_zero3_partitioned_model_wraps_from_ds_shape():
    """The usual flow: from_pretrained under deepspeed.zero.Init (weights partitioned), then get_neat_model."""
    torch.manual_seed(0)
    net, unpartitioned = TinyNet(), TinyNet()
    for param in net.parameters():
        partition_like_zero3(param)
    assert count_adapter_parameters(net, ZERO3_CONFIG) == count_adapter_parameters(unpartitioned, ZERO3_CONFIG)
    layer = get_neat_model(net, ZERO3_CONFIG).base_model.blocks[0].query
    assert (layer.d_out, layer.d_in) == (DIM, DIM) and layer.neat_A["default"].weight.shape == (2, DIM)


def test_zero3_without_leaf_marking_raises_instead_of_using_an_empty_weight(tmp_path):
    torch.manual_seed(0)
    model = get_neat_model(TinyNet(), ZERO3_CONFIG)
    FakeZero3(model)
    x = torch.randn(2, SEQ, DIM)
    # base_layer ran (gathered for its own forward) and was released again before NEAT computes H from it.
    with pytest.raises(ShardingError, match=r"base_layer\.weight of layer 'blocks\.0\.query'.*ZeRO-3 partition "
                                            r"\(ds_status=NOT_AVAILABLE, 0 of 256.*set_z3_leaf_modules"):
        model(x)
    # Outside forward: saving and merging refuse the partitioned tensors and change nothing.
    with pytest.raises(ShardingError, match=r"Cannot save .*peanut_A.*ZeRO-3.*GatheredParameters"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ShardingError, match="ZeRO-3 partition"):
        model.merge_adapter()
    assert not any(layer.merged for _, layer in model.neat_layers())


def test_zero3_with_neat_layer_as_leaf_module_matches_unpartitioned_model():
    torch.manual_seed(0)
    model = get_neat_model(TinyNet(), ZERO3_CONFIG)
    reference = copy.deepcopy(model)
    x = torch.randn(2, SEQ, DIM)
    expected = reference(x)
    FakeZero3(model, leaf_types=(NeatLayer,))
    torch.testing.assert_close(model(x), expected)
    assert model.base_model.blocks[0].query.base_layer.weight.numel() == 0  # partitioned again after forward


def test_flat_shard_weight_is_refused():
    """FSDP1 wrapping a base_layer as its own unit leaves a flattened 1-D shard in place of its weight once that
    unit's forward is over: NEAT must refuse it (whatever shape a shard has, it is not W0)."""
    torch.manual_seed(0)
    model = get_neat_model(TinyNet(), NeatConfig(r=2, target_modules=["query"]))
    base = model.base_model.blocks[0].query.base_layer
    full = base.weight.data

    def unshard(*_):
        base.weight.data = full

    def reshard(*_):
        base.weight.data = full.flatten()[: DIM * DIM // 2]

    base.register_forward_pre_hook(unshard)
    base.register_forward_hook(reshard)
    with pytest.raises(ShardingError, match=r"shape \(128,\) instead of \(16, 16\).*FSDP1"):
        model(torch.randn(1, SEQ, DIM))


def test_check_sharding_accepts_per_block_sharding(single_process_group):
    model = build_model()
    shard_model(model, model.base_model.blocks)
    check_sharding(model)
    assert isinstance(model.base_model.blocks[0].query, NeatLayer)
    assert model(torch.randn(2, SEQ, DIM)).shape == (2, CLASSES)
