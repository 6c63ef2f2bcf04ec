"""torch.compile for a model with adapter layers.

Every ABBA path, `auto` included, traces with `fullgraph=True` (tests/adapters/test_compile_paths.py): the path is chosen by a
few arithmetic operations on the shapes and on constants held in a plain dict per device type, and the custom
autograd functions use only traceable ops. On a GPU the compiled step fuses the element-wise work (casts, the
Khatri-Rao builds, the scale) that eager mode launches one kernel at a time.
"""

from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module, backend: str = "inductor", fullgraph: bool = False) -> nn.Module:
    """Compile `model`'s forward in place and return it (the same object).

    In place (`nn.Module.compile`), not `torch.compile(model)`: the wrapper that returns would prefix every
    state-dict key with `_orig_mod.`, and saving, checkpointing and resuming read those keys. `fullgraph` is off
    by default because a base model's own code may break the graph (the run then still trains, in several
    graphs); the adapter layers never do.
    """
    model.compile(backend=backend, fullgraph=fullgraph)
    return model
