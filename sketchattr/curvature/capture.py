"""Per-example layer inputs and output gradients of Linear and Conv2d modules, by hooks.

For a supported module, one forward + backward pass of the *summed* training loss gives, per
example i and position t (sequence positions of a Linear on [B, T, d]; output pixels of a
Conv2d through ``unfold`` patches):

* ``a[i, t]`` — the layer input (with a trailing 1 when the module has a trainable bias),
  ``[B, T, d_in(+1)]``;
* ``s[i, t]`` — the gradient of example i's loss w.r.t. the module output, ``[B, T, d_out]``.

The per-example parameter gradient is then ``DW_i = Σ_t s_t a_tᵀ`` ``[d_out, d_in(+1)]``
(:func:`per_example_gradients`). :class:`LayerSpec` converts between this matrix and the
featurizer's flat layout (weight flattened as the module stores it, then bias).
A module called several times in one forward (shared weights) contributes every call's
positions. The backward pass asks autograd for the gradients w.r.t. the module outputs only, so
no parameter gradient (``sᵀa``, a third of a training step's work) is computed. Each captured
output is handed on as a copy, so in-place ops after the module (``ReLU(inplace=True)``) do not
change the tensor whose gradient is taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d)


class UnsupportedModuleError(ValueError):
    """A selected module is not one the curvature hooks understand (Linear, Conv2d)."""


@dataclass(frozen=True)
class LayerSpec:
    """Shape bookkeeping of one supported module.

    d_out: output features / channels. d_in: input features, or C_in·kh·kw for Conv2d.
    bias: the module has a trainable bias (a gets a trailing 1; DW a last column).
    """

    name: str
    kind: str
    d_out: int
    d_in: int
    bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of DW: (d_out, d_in + bias)."""
        return self.d_out, self.d_in + int(self.bias)

    @property
    def dim(self) -> int:
        """Number of parameters (the module's block width in the featurizer layout)."""
        return self.d_out * (self.d_in + int(self.bias))

    def to_flat(self, dw: torch.Tensor) -> torch.Tensor:
        """[B, d_out, d_in(+1)] -> [B, dim]: weight row-major, then bias (featurizer layout)."""
        b = dw.shape[0]
        weight = dw[:, :, : self.d_in].reshape(b, -1)
        return torch.cat([weight, dw[:, :, self.d_in]], dim=1) if self.bias else weight

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """[B, dim] -> [B, d_out, d_in(+1)] (inverse of :meth:`to_flat`)."""
        b, nw = flat.shape[0], self.d_out * self.d_in
        weight = flat[:, :nw].reshape(b, self.d_out, self.d_in)
        return torch.cat([weight, flat[:, nw:, None]], dim=2) if self.bias else weight


_CURVATURE = (
    "EKFAC/KFAC/diagonal curvature",
    "Select supported modules with modules=[...] or use SketchedInfluence, which works for any module.",
)


def layer_specs(
    model: nn.Module, names: "list[str] | tuple[str, ...]", purpose: str = _CURVATURE[0], remedy: str = _CURVATURE[1]
) -> list[LayerSpec]:
    """Specs of the named modules; raises :class:`UnsupportedModuleError` listing every
    selected module that is not a Linear or a groups=1, zero-padded Conv2d (the message says
    what needs them, ``purpose``, and how to proceed, ``remedy``)."""
    modules = dict(model.named_modules())
    specs, bad = [], []
    for name in names:
        module = modules[name]
        problem = _unsupported_reason(module)
        if problem:
            bad.append(f"{name or '<root>'} ({problem})")
            continue
        bias = module.bias is not None and module.bias.requires_grad
        d_in = module.weight[0].numel()
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        specs.append(LayerSpec(name, kind, module.weight.shape[0], d_in, bias))
    if bad:
        raise UnsupportedModuleError(
            f"{purpose} supports nn.Linear and nn.Conv2d (groups=1, zero padding) "
            f"only; unsupported selected module(s): {', '.join(bad)}. {remedy}"
        )
    return specs


def _unsupported_reason(module: nn.Module) -> str:
    if not isinstance(module, SUPPORTED):
        return type(module).__name__
    if not module.weight.requires_grad:
        return "frozen weight with a trainable bias"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)
        ):
            return "Conv2d with asymmetric 'same' padding"
    return ""


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding == "valid":
        return 0, 0
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))  # type: ignore[return-value]
    return module.padding  # type: ignore[return-value]


def layer_inputs(module: nn.Module, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Module input -> a [B, T, d_in(+1)] (Conv2d: unfolded patches, T = output pixels)."""
    if isinstance(module, nn.Conv2d):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, module.kernel_size, module.dilation, _conv_padding(module), module.stride)
        a = patches.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def output_gradients(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the module output -> s [B, T, d_out]."""
    if isinstance(module, nn.Conv2d):
        if g.ndim == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class LayerCapture:
    """Hooks that record (a, s) of the given modules during one loss evaluation.

    Use as ``with LayerCapture(model, specs) as cap: acts = cap.run(loss_fn)`` where
    ``loss_fn()`` returns the scalar loss summed over the batch; ``acts[name] = (a, s)``.
    Parameter ``.grad`` fields are not touched (``torch.autograd.grad``).
    """

    def __init__(self, model: nn.Module, specs: list[LayerSpec]) -> None:
        modules = dict(model.named_modules())
        self.specs = specs
        self.modules = {s.name: modules[s.name] for s in specs}
        self._handles: list[Any] = []
        self._a: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor | None]] = {}

    def __enter__(self) -> "LayerCapture":
        for spec in self.specs:
            self._handles.append(self.modules[spec.name].register_forward_hook(self._forward_hook(spec)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, spec: LayerSpec) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> "torch.Tensor | None":
            self._a.setdefault(spec.name, []).append(layer_inputs(module, inputs[0].detach(), spec.bias))
            outputs = self._outputs.setdefault(spec.name, [])
            if not output.requires_grad:
                outputs.append(None)
                return None
            outputs.append(output)
            return output.clone()  # later in-place ops modify the copy, not the captured output

        return hook

    def run(self, loss_fn: Callable[[], torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Evaluate ``loss_fn()``, backpropagate, return {name: (a [B,T,d_in(+1)], s [B,T,d_out])}."""
        self._a, self._outputs = {}, {}
        try:
            loss = loss_fn()
            for spec in self.specs:
                if not self._a.get(spec.name):
                    raise RuntimeError(f"module {spec.name!r} was not called in the forward pass")
            keys = [(n, c) for n, outs in self._outputs.items() for c, o in enumerate(outs) if o is not None]
            targets = [self._outputs[n][c] for n, c in keys]
            grads = dict(zip(keys, torch.autograd.grad(loss, targets, allow_unused=True))) if targets else {}
            out = {}
            for spec in self.specs:
                acts, module = self._a[spec.name], self.modules[spec.name]
                s = [
                    output_gradients(module, grads[spec.name, c].detach()) if grads.get((spec.name, c)) is not None
                    else a.new_zeros(*a.shape[:2], spec.d_out)
                    for c, a in enumerate(acts)
                ]
                out[spec.name] = (_cat_positions(acts), _cat_positions(s))
            return out
        finally:
            self._a, self._outputs = {}, {}


def _cat_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the calls of a module along positions (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def per_example_gradients(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """DW_i = Σ_t s_t a_tᵀ: [B, T, d_in(+1)], [B, T, d_out] -> [B, d_out, d_in(+1)]."""
    return torch.einsum("bto,bti->boi", s, a)
