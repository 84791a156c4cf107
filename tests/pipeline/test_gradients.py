"""genloop's gradient averaging for CPU DeepSpeed engines at ZeRO 0 (`pipeline/gradients.py`):
two real ranks (torch.distributed over gloo, DeepSpeed's shared-memory all-reduce) train
exactly as DeepSpeed's own all-reduce and clipping would."""

from __future__ import annotations

import os
import socket

import pytest

from pipeline.gradients import offer_shared_memory, syncs_own_gradients


def test_only_cpu_zero0_fp32_engines_sync_their_own_gradients():
    zero = {"zero_optimization": {"stage": 0}}
    assert syncs_own_gradients(zero, "cpu")
    assert not syncs_own_gradients(zero, "cuda")
    assert not syncs_own_gradients({"zero_optimization": {"stage": 1}}, "cpu")
    assert not syncs_own_gradients(dict(zero, bf16={"enabled": True}), "cpu")
    assert not syncs_own_gradients(dict(zero, gradient_accumulation_steps=4), "cpu")


@pytest.mark.parametrize(
    "world, local_world, cpus, master",
    [
        (1, 1, 1, True),  # nothing to all-reduce
        (2, 1, 1, True),  # a rank on another node
        (2, 2, 0.5, True),  # no CPU of its own: the kernel's waits spin
        (2, 2, 1, False),  # no group address to name the workspace after
    ],
)
def test_shared_memory_is_offered_only_to_local_ranks_with_a_cpu_each(
    monkeypatch, world, local_world, cpus, master
):
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        if master:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    assert not offer_shared_memory(world, local_world, cpus)
    assert "LOCAL_SIZE" not in os.environ


def test_shared_memory_is_offered_to_two_local_ranks(monkeypatch):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert offer_shared_memory(2, 2, 1)
    assert os.environ["LOCAL_SIZE"] == "2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, results) -> None:
    """One rank: the same 3 steps through DeepSpeed's own all-reduce and clipping, through
    GradientSync over shared memory, and through GradientSync over gloo."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.gradients import SHM_DIR, GradientSync, offer_shared_memory

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    # The ranks agree: one rank without a CPU of its own keeps them all off shared memory.
    offered_to_one = offer_shared_memory(world, world, 1 if rank == 0 else 0.5)
    assert offer_shared_memory(world, world, 1)
    deepspeed.init_distributed("gloo")
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    # Each rank its own batches; a tight clip: the averaging and the clipping both matter.
    torch.manual_seed(100 + rank)
    batches = [torch.randint(1, 40, (4, 12)) for _ in range(3)]

    def train(sync_method: str | None) -> list:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        params = list(model.parameters())
        ds_config = {
            "train_batch_size": 4 * world,
            "gradient_clipping": 0.0 if sync_method else 0.5,
            "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9,
        }
        # SGD: the parameters move by the gradients themselves (Adam would magnify rounding
        # differences in near-zero gradients to whole steps).
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(params, lr=0.5), config=ds_config
        )
        sync = None
        if sync_method:
            if sync_method == "gloo":
                os.environ.pop("LOCAL_SIZE")  # the decision: shared memory no longer offered
            engine.enable_backward_allreduce = False
            sync = GradientSync(params, world, rank, max_norm=0.5)
            assert sync.method == sync_method
        for ids in batches:
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            if sync:
                sync()
            engine.step()
        return [p.detach().clone() for p in params]

    deepspeed_own = train(None)
    shared = train("shared-memory")
    gloo = train("gloo")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"
    results.put(
        {
            "rank": rank,
            "offered_to_one": offered_to_one,
            "shared_vs_deepspeed": _largest_difference(shared, deepspeed_own),
            "gloo_vs_deepspeed": _largest_difference(gloo, deepspeed_own),
            "moved": _largest_difference(shared, _initial(config)),
            "checksum": sum(p.double().sum().item() for p in shared),
            "workspace_left": os.path.exists(os.path.join(SHM_DIR, name)),
        }
    )


def _largest_difference(first: list, second: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def _initial(config) -> list:
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return [p.detach() for p in GPT2LMHeadModel(config).parameters()]


def test_two_ranks_average_and_clip_as_deepspeed_does():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the shared-memory all-reduce needs a core per rank")
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    mp.spawn(_rank, args=(2, _free_port(), results), nprocs=2, join=True)
    by_rank = sorted((results.get(timeout=10) for _ in range(2)), key=lambda r: r["rank"])
    for r in by_rank:
        assert not r["offered_to_one"]
        assert r["moved"] > 1e-2  # the steps changed the model
        assert r["shared_vs_deepspeed"] < 1e-5
        assert r["gloo_vs_deepspeed"] < 1e-5
        assert not r["workspace_left"]  # its /dev/shm name is gone; the ranks still share it
    assert by_rank[0]["checksum"] == by_rank[1]["checksum"]  # the ranks hold the same model
