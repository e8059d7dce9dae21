"""``local`` vs ``ulysses``, ``fpdt``, ``ring`` and ``usp`` (and FSDP) on gloo: same loss, same gradients.

One launch of ``P`` worker processes per ``P`` in {2, 4} runs every case (model x strategy x
chunks x FSDP x checkpointing) against the single-process model with the same weights, and
sends back per-case numbers; the tests below assert on them. fp32, ``torch`` attention backend.

Gradient contract (see ``parallel/parallelize.py``): after ``loss.backward()`` every rank's
``.grad`` is the single-process gradient (``fsdp=False``: all-reduce SUM over the group), or its
shard of it (``fsdp=True``: reduce-scatter SUM).
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch

from experiments.core.ranks import run_ranks

pytestmark = pytest.mark.distributed

SEQ_LEN = 32  # divisible by P*u for P in {2, 4}, u in {1, 2, 4}
REL = 1e-5


def _case_id(preset, kind, chunks, fsdp=False, ckpt=False, accum=False, ulysses=None):
    parts = [preset, kind + (f"-u{chunks}" if chunks > 1 else "") + (f"-U{ulysses}" if ulysses else "")]
    parts += ["fsdp"] * fsdp + ["host-ckpt"] * ckpt + ["accum2"] * accum
    return "-".join(parts)


def _cases(P):
    cases = []
    for preset in ("gpt-tiny", "llama-tiny"):
        cases.append((preset, "ulysses", 1))
        cases += [(preset, "fpdt", u) for u in (1, 2, 4)]
    # ring and usp (its default Ulysses degree, and each explicit split), with FSDP and host
    # checkpoints on some.
    cases += [("llama-tiny", "ring", 1), ("gpt-tiny", "ring", 1, True, True), ("llama-tiny", "usp", 1)]
    cases += [("llama-tiny", "usp", 1, False, False, False, u) for u in (1, P)]
    if P == 4:
        cases.append(("gpt-tiny", "usp", 1, True, True, False, 2))
    if P == 2:
        cases += [
            ("gpt-tiny", "fpdt", 2, True),
            ("llama-tiny", "fpdt", 4, True, True),
            ("llama-tiny", "fpdt", 2, False, True),
            ("llama-tiny", "ulysses", 1, False, False, True),
        ]
    else:
        cases += [
            ("llama-tiny", "ulysses", 1, True),
            ("gpt-tiny", "fpdt", 4, True, True),
            ("gpt-tiny", "fpdt", 2, False, True),
            ("llama-tiny", "fpdt", 2, False, False, True),
        ]
    return cases


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _batch(vocab):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, SEQ_LEN), generator=g)
    labels = torch.randint(0, vocab, (2, SEQ_LEN), generator=g)
    labels[0, :7] = -100  # ignored tokens land unevenly on the ranks
    labels[1, 20:23] = -100
    return tokens, labels


def _build(cfg):
    import models

    torch.manual_seed(0)
    return models.Transformer(cfg)


def _reference(preset):
    """Single-process loss, gradients and one SGD-with-momentum step."""
    import models

    model = _build(models.get_config(preset))
    tokens, labels = _batch(model.cfg.vocab_size)
    loss = model(tokens, labels=labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).step()
    names = [n for n, _ in model.named_parameters()]
    return loss.item(), grads, [p.detach() for p in model.parameters()], names


def _run_case(case, group, ref):
    import models
    from parallel.parallelize import parallelize, shard_batch

    preset, kind, chunks, fsdp, ckpt, accum, ulysses = (*case, *(False, False, False, None)[len(case) - 3 :])
    cfg = models.get_config(preset, checkpoint=ckpt, checkpoint_on_host=ckpt)
    model = parallelize(_build(cfg), kind, group=group, chunks=chunks, offload=True, fsdp=fsdp,
                        ulysses_degree=ulysses)  # fmt: skip
    tokens, labels = _batch(cfg.vocab_size)
    strategy = model.strategy  # the resolved one (usp: its Ulysses degree)
    tokens, labels, positions = shard_batch(tokens, labels, strategy, group=group)
    for _ in range(2 if accum else 1):
        loss = model(tokens, labels=labels, positions=positions)
        loss.backward()
    ref_loss, ref_grads, ref_params, ref_names = ref
    scale = 2.0 if accum else 1.0
    grads = [_full(p.grad) for p in model.parameters()]
    out = {
        "local_tokens": tokens.shape[1],
        "names": [n for n, _ in model.named_parameters()],
        "loss": loss.item(),
        "ref_loss": ref_loss,
        "ref_names": ref_names,
        "grad_err": max(_rel(g, scale * r) for g, r in zip(grads, ref_grads, strict=True)),
    }
    if fsdp:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt.step()
        momenta = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
        out["sharded"] = all(t.to_local().numel() < t.numel() for t in [*model.parameters(), *momenta])
        after = [_full(p).detach() for p in model.parameters()]
        out["step_err"] = max(_rel(a, r) for a, r in zip(after, ref_params, strict=True))
    return out


def _worker(rank, world, init_file, out_dir):
    os.environ["FPDT_ATTENTION_BACKEND"] = "torch"
    torch.set_num_threads(1)
    from parallel.distributed import destroy_distributed, init_distributed

    group = init_distributed(rank, world, backend="gloo", init_method=f"file://{init_file}")
    refs = {preset: _reference(preset) for preset in ("gpt-tiny", "llama-tiny")}
    results = {_case_id(*case): _run_case(case, group, refs[case[0]]) for case in _cases(world)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_distributed()


@functools.cache
def _launch(world):
    """Run every case for ``world`` ranks once; returns ``[per-rank results]`` or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_ranks(_worker, (world, os.path.join(tmp, "init"), tmp), world)
        except Exception as e:  # reported by every test of this launch, not relaunched
            return e
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


PARAMS = [pytest.param(P, _case_id(*case), id=f"P{P}-{_case_id(*case)}") for P in (2, 4) for case in _cases(P)]


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("models_parallel")  # one worker: each launch above serves all its cases once
@pytest.mark.parametrize("world,case", PARAMS)
def test_parallel_matches_local(world, case):
    results = _launch(world)
    if isinstance(results, Exception):
        pytest.fail(f"the {world}-rank launch failed: {results}")
    per_rank = [r[case] for r in results]
    first = per_rank[0]
    assert first["local_tokens"] == SEQ_LEN // world
    assert first["names"] == first["ref_names"]  # a checkpoint loads under every strategy
    # Every rank reports the loss of the whole sequence, bit for bit the same.
    assert len({r["loss"] for r in per_rank}) == 1, [r["loss"] for r in per_rank]
    assert first["loss"] == pytest.approx(first["ref_loss"], rel=REL)
    for r in per_rank:
        assert r["grad_err"] < REL, (r["grad_err"], case)
        if "step_err" in r:
            assert r["sharded"], "FSDP left a parameter or its optimizer state unsharded"
            assert r["step_err"] < REL, (r["step_err"], case)


def _staged_unfreeze_worker(rank, world, init_file, out_dir, fsdp=False):
    """Embeddings frozen when the model is parallelized, trained from the next step on."""
    os.environ["FPDT_ATTENTION_BACKEND"] = "torch"
    torch.set_num_threads(1)
    import models
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.parallelize import parallelize, shard_batch

    group = init_distributed(rank, world, backend="gloo", init_method=f"file://{init_file}")
    cfg = models.get_config("llama-tiny")
    reference = _build(cfg)
    tokens, labels = _batch(cfg.vocab_size)
    reference(tokens, labels=labels).backward()
    model = _build(cfg)
    model.embed.weight.requires_grad_(False)
    model = parallelize(model, "fpdt", group=group, chunks=2, fsdp=fsdp)
    model.embed.weight.requires_grad_(True)
    tokens, labels, positions = shard_batch(tokens, labels, model.strategy, chunks=2, group=group)
    model(tokens, labels=labels, positions=positions).backward()
    errors = {n: _rel(_full(p.grad), r.grad) for (n, p), r in zip(model.named_parameters(), reference.parameters(),
                                                                   strict=True)}  # fmt: skip
    torch.save(errors, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_distributed()


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_a_parameter_unfrozen_after_parallelize_is_reduced_too(tmp_path, fsdp):
    """Without FSDP each gradient is summed over the ranks by a hook; a parameter frozen when
    ``parallelize`` ran gets its hook once it trains (each rank held only its share of it). FSDP
    reduce-scatters whatever has a gradient at the backward's end."""
    run_ranks(_staged_unfreeze_worker, (2, str(tmp_path / "init"), str(tmp_path), fsdp), 2)
    for rank in range(2):
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        assert max(errors.values()) < REL, (rank, {n: e for n, e in errors.items() if e >= REL})
