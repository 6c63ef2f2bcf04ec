"""Several training runs one after another in the same processes (`abba compare`, the distributed tests): one
process group for all of them, and for each run a fresh Accelerator state in the launcher's environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def one_process_group() -> Iterator[Callable[[], None]]:
    """Under a launcher, keep one distributed process group for all the runs, destroyed once at the end; yields
    the function to call before each run (`fresh`).

    run_training ends with Accelerator.end_training(), which destroys the group; initialising a second one in
    the same processes reuses the rendezvous keys of the first and races (gloo: "connection refused" on a stale
    address). So while several runs train, PartialState.destroy_process_group does nothing.

    `fresh` resets the Accelerator state (each run builds its own from its config: mixed precision may differ)
    and puts back the ACCELERATE_* variables as the launcher set them: an Accelerator given a DeepSpeed plugin
    sets ACCELERATE_USE_DEEPSPEED itself, which the next run would read as an Accelerate config choosing it."""
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    launcher_env = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}

    def fresh() -> None:
        for key in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in launcher_env]:
            del os.environ[key]
        os.environ.update(launcher_env)
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()

    original = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized
    try:
        yield fresh
        if grouped():
            # Every process is done before any tears the group down: a process leaving while another still
            # talks to it aborts the other (gloo: "terminate called without an active exception").
            torch.distributed.barrier()
    finally:
        PartialState.destroy_process_group = original
        if grouped():
            torch.distributed.destroy_process_group()
