"""``torch.compile`` around a parallelised ``Transformer``: the same loss and gradients as eager,
to the bit (``aot_eager`` runs the captured graphs op by op), on one rank and on two gloo ranks
(``ulysses`` and ``fpdt``).

What compiles: everything but the FPDT pipeline and a layer whose checkpoint goes to host memory,
which run as they are (a graph break around each); value checks on the inputs are skipped while
Dynamo traces (``parallel.tensors.has_values``). fp32, ``torch`` attention backend.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

import models
import parallel
from experiments.core.ranks import run_ranks

SEQ_LEN = 64

# (strategy, parallelize kwargs, model overrides, packed documents)
ONE_RANK = {
    "local-host-ckpt-packed": ("local", {}, {"checkpoint": True, "checkpoint_on_host": True}, True),
    "fpdt-offload-ckpt": ("fpdt", {"chunks": 4, "offload": True}, {"checkpoint": True}, False),
    "fpdt-host-ckpt-packed": ("fpdt", {"chunks": 2}, {"checkpoint": True, "checkpoint_on_host": True}, True),
}


def _step(model, tokens, labels, positions, cu_seqlens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels, positions=positions, cu_seqlens=cu_seqlens)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _eager_and_compiled(strategy, kwargs, overrides, packed):
    """``(eager, compiled)`` results of one step of this rank, each ``(loss, [grads])``."""
    torch.manual_seed(0)
    model = models.Transformer(models.get_config("llama-tiny", n_layers=1, **overrides))
    parallel.parallelize(model, strategy, **kwargs)
    g = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, model.cfg.vocab_size, (1, SEQ_LEN), generator=g) for _ in range(2))
    cu_seqlens = torch.tensor([0, 23, SEQ_LEN], dtype=torch.int32) if packed else None
    tokens, labels, positions = parallel.shard_batch(
        tokens, labels, strategy, chunks=kwargs.get("chunks", 1), cu_seqlens=cu_seqlens
    )
    eager = _step(model, tokens, labels, positions, cu_seqlens)
    torch._dynamo.reset()
    compiled = _step(torch.compile(model, backend="aot_eager"), tokens, labels, positions, cu_seqlens)
    return eager, compiled


def _assert_equal(eager, compiled):
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(ONE_RANK))
def test_compiled_model_equals_eager(case, one_rank_group):
    with torch_backend():
        _assert_equal(*_eager_and_compiled(*ONE_RANK[case]))


def test_compiled_local_model_is_one_graph_and_equals_eager(one_rank_group):
    """``local`` without host checkpoints: one graph, no break (the attention ops are opaque
    nodes, the input checks read no values while tracing), and eager's loss and gradients."""
    with torch_backend():
        _assert_equal(*_eager_and_compiled("local", {}, {}, False))
        torch.manual_seed(0)
        model = models.Transformer(models.get_config("llama-tiny", n_layers=1))
        parallel.parallelize(model, "local")
        tokens = torch.randint(0, model.cfg.vocab_size, (1, SEQ_LEN))
        explained = torch._dynamo.explain(model)(tokens, labels=tokens)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def torch_backend():
    import fpdt_kernels

    return fpdt_kernels.use_backend("torch")


TWO_RANKS = {"ulysses": {}, "fpdt": {"chunks": 2, "offload": True}, "ring": {}}


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with torch_backend():
            results = {name: _eager_and_compiled(name, kwargs, {}, False) for name, kwargs in TWO_RANKS.items()}
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@functools.cache
def _two_ranks():
    """One launch of two ranks runs every strategy of ``TWO_RANKS``: ``[rank 0's, rank 1's]`` results."""
    directory = tempfile.mkdtemp()
    run_ranks(_worker, (2, f"{directory}/rdzv", directory), 2)
    return [torch.load(f"{directory}/{rank}.pt") for rank in range(2)]


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.xdist_group("compile_two_ranks")  # one worker: the one launch above serves every case
@pytest.mark.parametrize("strategy", list(TWO_RANKS))
def test_compiled_model_equals_eager_on_two_ranks(strategy):
    for rank_results in _two_ranks():
        _assert_equal(*rank_results[strategy])
