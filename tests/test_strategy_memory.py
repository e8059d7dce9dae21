"""Device memory per rank of ring attention against Ulysses on the same attention layer, measured.

Runs the measurement of ``python -m experiments.bench.strategy_memory`` (two gloo ranks, one
attention layer forward + backward under the simulated-device tracker) on small MHA and GQA
layers, once for every test here, and compares the worst rank's device peak of each strategy.
"""

from __future__ import annotations

import pytest

from experiments.bench.strategy_memory import TOLERANCE, Shape, measure, peaks

RANKS = 2
MHA = Shape(S=1024, H=8, Hkv=8, d=32)
GQA = Shape(S=1024, H=8, Hkv=2, d=32)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return measure([MHA, GQA], ["ulysses", "ring"], ranks=RANKS)


def _peak_mib(rows: list[dict], name: str, shape: Shape) -> float:
    return peaks(rows)[(name, shape.S, shape.H, shape.Hkv, shape.d, shape.B)]


def _block_mib(shape: Shape, itemsize: int) -> float:
    """One rank's K and V (``S/P`` tokens, ``Hkv`` heads) at ``itemsize`` bytes per element."""
    return 2 * shape.B * (shape.S // RANKS) * shape.Hkv * shape.d * itemsize / 2**20


def test_every_strategy_matches_the_local_oracle(rows):
    assert {r["strategy"] for r in rows} == {"ulysses", "ring"}
    for r in rows:
        assert max(r["out_rel_err"], r["dx_rel_err"]) <= TOLERANCE, r


def test_gqa_ring_holds_no_more_than_ulysses(rows):
    ring, ulysses = _peak_mib(rows, "ring", GQA), _peak_mib(rows, "ulysses", GQA)
    assert ring <= ulysses, f"GQA: ring {ring:.3f} MiB per rank > ulysses {ulysses:.3f} MiB"


def test_mha_ring_exceeds_ulysses_by_at_most_its_block_in_flight(rows):
    """With MHA at P = 2 the ring cannot come down to Ulysses: both hold the layer's q, k, v, o,
    output, dO and dQ, which are the same size; beyond them Ulysses holds its dK, dV and its
    kernel allocates nothing else, while the ring holds the other rank's K/V block and one fp32
    dK/dV block while its kernels run, and those kernels' temporaries (one pair of zigzag pieces:
    dQ, dK, dV of ``S/(2P)`` tokens and a summed copy) weigh as much as Ulysses' dK, dV. So the
    ring's excess is bounded by one K/V block and one fp32 dK/dV block (what the backward holds
    with the K/V shift overlapped); a third dK/dV buffer or a kernel call over whole blocks
    breaks the bound."""
    ring, ulysses = _peak_mib(rows, "ring", MHA), _peak_mib(rows, "ulysses", MHA)
    bound = ulysses + _block_mib(MHA, 4) + _block_mib(MHA, 4)  # fp32 K/V block, fp32 dK/dV block
    assert ring <= bound, f"MHA: ring {ring:.3f} MiB per rank > ulysses {ulysses:.3f} + blocks = {bound:.3f} MiB"
