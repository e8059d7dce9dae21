"""Autocast for our custom autograd Functions: the backward runs in the forward's autocast state.

Under ``torch.autocast`` a custom Function's forward sees autocast (its matmuls run in the
autocast dtype), but its backward runs wherever the engine runs it, usually with autocast off,
and would then mix the bf16 activations and gradients with the fp32 parameters. PyTorch's
``torch.amp.custom_fwd/custom_bwd`` solve this for one device type fixed at decoration; these
helpers do the same for whichever device the inputs are on (CPU runs use autocast too)::

    ctx.autocast = autocast_state(x.device)          # in forward
    with restore_autocast(ctx.autocast): ...         # in backward
"""

from __future__ import annotations

import contextlib

import torch


def autocast_state(device: torch.device) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` if autocast is on for ``device`` in this thread, else ``None``."""
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return kind, torch.get_autocast_dtype(kind)
    return None


def restore_autocast(state: tuple[str, torch.dtype] | None, device: torch.device | None = None):
    """Enter the recorded autocast state (or turn autocast off for ``device`` when it was off)."""
    if state is not None:
        return torch.autocast(device_type=state[0], dtype=state[1])
    if device is not None and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
