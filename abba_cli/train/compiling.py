"""`train.compile`: regional compilation of the model `accelerator.prepare()` returned.

Each decoder layer is compiled in place (`nn.Module.compile`, so state-dict keys, the engines' hooks and saving
are unchanged) rather than the whole model: the layers are one class, so they share one compiled graph (a
32-layer model compiles one layer, not 32), and the model's own top level (masks, loss) stays eager. It runs
after `prepare()`, so FSDP2's sharding hooks and DeepSpeed's are in place before tracing (FSDP2's are skipped by
dynamo and run eagerly; ZeRO-3's are traced, so zero3 refuses train.compile).

Compilations are bounded. Lengths: batches are padded to a multiple of PAD_MULTIPLE tokens (the collator) and
the layers compile with dynamic shapes, so one graph serves every length. Paths: `auto` is resolved once per layer
before compiling (execution_plan.fix_auto_paths), so no batch crosses a path threshold inside a graph. What is
left: the first layer's input needs no gradient (the embedding is frozen) while the others' do, and validation
runs without gradients, one graph each. Every recompilation is logged with its reason (torch's `recompiles`
log), and the count is reported at the end of the run.
"""

from __future__ import annotations

import sys
from typing import Any

from abba_cli.errors import UserError

# Token counts per row are padded to this multiple when compiling: fewer distinct shapes, aligned kernels.
PAD_MULTIPLE = 64


def check_engine_compiles(strategy: str) -> None:
    """Refuse train.compile where the engine's own hooks defeat it: ZeRO-3 gathers each module's parameters in
    module hooks that run inside the compiled layer, and dynamo traces them and recompiles layer after layer
    (2 CPU processes, 2 tiny layers: 28 graphs, against 2 under ddp, fsdp and zero2) until it gives up and runs
    eagerly."""
    if strategy == "zero3":
        raise UserError(
            "train.compile with distributed.strategy zero3: DeepSpeed's parameter-gathering hooks make every "
            "layer recompile; use fsdp (it shards the same way and compiles once), or train.compile false"
        )


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: modules of the classes transformers keeps whole (`_no_split_modules`, the
    decoder layer classes; FSDP2 subclasses them), else the children of the first ModuleList of at least two
    modules of one class."""
    from torch import nn

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if layers:
        return layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            return list(module)
    return []


def compile_regions(model: Any, backend: str = "inductor") -> int:
    """Compile each decoder layer of `model` in place (the whole model when it has none); returns how many
    modules were compiled. Recompilations are logged from here on."""
    import torch

    torch._logging.set_logs(recompiles=True)
    # Each dimension its own symbol: with duck shaping a length equal to the hidden size (576 = 9 x 64 on
    # SmolLM2) is unified with that static size, and the graph specialises to it.
    torch.fx.experimental._config.use_duck_shape = False
    layers = decoder_layers(model) or [model]
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def unwrapped(model: Any) -> Any:
    """The module inside an engine's wrapper (DDP's and DeepSpeed's engine's `.module`); FSDP2 shards in place,
    so its model is the module itself."""
    from torch import nn

    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledRegions:
    """The regions compiled for a run, and the graphs built since (the run's compilations)."""

    def __init__(self, regions: int):
        self.regions = regions
        self.graphs_before = graphs_compiled()

    @property
    def graphs(self) -> int:
        return graphs_compiled() - self.graphs_before

    def report(self) -> None:
        print(
            f"torch.compile: {self.graphs} graph(s) compiled for {self.regions} decoder layer(s) "
            "(each recompilation is logged above with its reason)",
            file=sys.stderr,
        )


def compile_for_training(model: Any, backend: str = "inductor") -> CompiledRegions:
    """Compile the prepared `model`'s decoder layers in place; the returned object counts the compilations."""
    regions = CompiledRegions(0)
    regions.regions = compile_regions(unwrapped(model), backend)
    return regions
