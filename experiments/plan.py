"""Plan a run before booking the GPUs: ``python -m experiments.plan`` and the planner's API.

    from experiments.plan import estimate, max_seq_len
    max_seq_len("llama3-8b", "fpdt", 4, "a100-80g")                  # tokens
    e = estimate("llama3-8b", "fpdt", 4, "a100-80g", seq_len=1 << 20)

The bodies live in :mod:`experiments.planner`.
"""

from .planner.cli import cli, main, plan_table
from .planner.estimate import Estimate, estimate, estimate_row
from .planner.search import max_seq_len, recommend_chunk_tokens

__all__ = ["Estimate", "cli", "estimate", "estimate_row", "main", "max_seq_len", "plan_table", "recommend_chunk_tokens"]

if __name__ == "__main__":
    cli()
