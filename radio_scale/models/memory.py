"""Measured activation memory: the bytes autograd keeps for backward (what the planner's memory model is
calibrated against: tests/test_plan.py, benchmarks/planner.py)."""
from __future__ import annotations

import torch
from torch import nn


def saved_tensor_bytes(model: nn.Module, *args, **kwargs) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `model(*args, **kwargs)`: unique
    storages, the model's own parameters excluded (they exist whether or not anything is saved)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, **kwargs)
    return sum(kept.values())
