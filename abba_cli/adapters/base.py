"""What every adapter layer shares: owning the frozen Linear weight, dropout, merge/unmerge, compute dtype.

An adapter layer replaces an `nn.Linear` in place and keeps its frozen `weight`/`bias` as its own parameters,
so the base model's state-dict keys do not change (torchtune's choice). Subclasses declare their trainable
factors in `factor_names`, build them in `__init__`, and implement `delta_weight()` and `adapter_forward()`.

A bitsandbytes Linear4bit / Linear8bitLt (model.quantization) is wrapped the same way: its packed weight is the
layer's `weight`, and the frozen part runs through the bitsandbytes layer's own forward (its quantized matmul),
kept as `quantized_base`. Initialisations read W0 through `frozen_weight()`, the dequantized weight there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from abba_cli.errors import UserError
from abba_cli.models.quantization import dequantized_weight, is_quantized_linear, unpack_cpu_weight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def layer_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, module name): every process initialises every layer identically."""
    digest = 0
    for ch in name:
        digest = (digest * 131 + ord(ch)) % (2**31 - 1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + digest) % (2**63 - 1))
    return gen


def kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform, a=sqrt(5)), as LoRA uses for A, from a given generator."""
    t = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
    return t


class AdapterLinear(nn.Module):
    """Base class: y = x W0^T + b + adapter(x), or x W^T + b with the update merged into W."""

    factor_names: tuple[str, ...] = ()
    kind: str = ""

    def __init__(self, base: nn.Linear, scaling: float, dropout: float, name: str = "") -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Same Parameter objects as the wrapped layer: nothing is copied, base keys stay `<name>.weight`.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = name
        self.merged = False
        # Not registered as a submodule: its weight and bias are already ours, so state-dict keys stay put.
        self.quantized_base: nn.Module | None = None
        if is_quantized_linear(base):
            unpack_cpu_weight(base)
            # Training mode for good: in eval mode on avx512_bf16 CPUs Linear4bit repacks its weight in place
            # for a bf16 inference kernel that has no backward; nothing else in these layers depends on it.
            base.train(True)
            object.__setattr__(self, "quantized_base", base)

    # -- to implement ---------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The update added to `self.weight` when merged, fp32, shape (out, in)."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y including the frozen base part, in `dtype`."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def _add_low_rank_pair(self, r: int) -> None:
        """A (r, n) and B (m, r), fp32: the LoRA-shaped factors of LoRA and HiRA."""
        device = self.weight.device
        self.A = nn.Parameter(torch.zeros(r, self.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=device))

    @torch.no_grad()
    def _reset_kaiming_a_zero_b(self, seed: int) -> None:
        """A Kaiming-uniform, B = 0: dW = 0 at step 0 while B still gets a gradient."""
        gen = layer_generator(seed, self.name)
        self.A.copy_(kaiming_uniform(tuple(self.A.shape), gen).to(self.A.device))
        self.B.zero_()

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout acts on the adapter's input only. Returns `x` itself when dropout is off (eval mode or p = 0),
        which lets the fused paths run one matmul for base and adapter together."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return self.dropout(x)
        return x

    def factors(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in self.factor_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return self.adapter_forward(x, compute_dtype(x))

    def frozen_weight(self) -> torch.Tensor:
        """W0 as fp32 (out, in), detached: on a quantized base, its dequantized weight (what QPiSSA reads)."""
        if self.quantized_base is not None:
            return dequantized_weight(self.quantized_base)
        return self.weight.detach().float()

    def base_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized_base is not None:
            # bitsandbytes casts x to its compute dtype and the result back to x's dtype.
            return self.quantized_base(x.to(dtype))
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold dW into W in fp32, then cast back; safe to call twice."""
        if self.merged:
            return
        self._refuse_quantized("merging the adapter into it")
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise UserError(
                f"merging the adapter of {self.name or 'a layer'} gives non-finite weights; refusing"
            )
        self.weight.data = merged.to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract dW again (exact in fp32 up to rounding; in bf16 within bf16 rounding of W)."""
        if not self.merged:
            return
        self.weight.data = (self.weight.float() - self.delta_weight()).to(self.weight.dtype)
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the current (merged, if merged) weight, for export."""
        self._refuse_quantized("unwrapping it into an nn.Linear")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.weight.data, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=False)
        return lin

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quantized_base is not None:
            # bitsandbytes writes a packed weight's quantization state next to it (`weight.absmax`, ...): the
            # base's keys stay whole, as for an unquantized layer.
            self.quantized_base._save_to_state_dict(destination, prefix, keep_vars)

    def _refuse_quantized(self, what: str) -> None:
        if self.quantized_base is not None:
            raise UserError(
                f"{self.name or 'this layer'} wraps a quantized (bitsandbytes) weight; {what} would round W0 + dW "
                "to 4/8 bits. Run the adapter unmerged, or `abba merge` it (folds into the unquantized base)"
            )

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.factor_names)
        return f"in={self.in_features}, out={self.out_features}, s={self.scaling:.4g}, {ranks}, merged={self.merged}"
