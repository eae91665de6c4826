"""Which parameters are kernels: the one rule behind weight decay.

The reference decays parameters whose name matches '.*/kernel' (dense,
convolution, expert and router matrices). Here a parameter's role comes
from the module that owns it, never from its name or shape: the weight of
an `nn.Linear` / `nn.Conv2d`, and the parameters a module lists in its
`kernel_params` class attribute (`Experts`: w1, w2; the gating routers:
weight). Everything else (biases, expert biases b1/b2, norm scales,
position embeddings, the class token, the MAP probe, Soft MoE's slot
parameters mu and scale) is not a kernel.
"""
from __future__ import annotations

from torch import nn


def kernel_parameter_names(model: nn.Module) -> set[str]:
    """Full names (as in `named_parameters()`) of the kernels of `model`."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            own: tuple[str, ...] = ("weight",)
        else:
            own = tuple(getattr(module, "kernel_params", ()))
        for local in own:
            if isinstance(getattr(module, local, None), nn.Parameter):
                names.add(f"{prefix}.{local}" if prefix else local)
    return names


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of every parameter that is not a kernel."""
    kernels = kernel_parameter_names(model)
    return {n for n, _ in model.named_parameters() if n not in kernels}
