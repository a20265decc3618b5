"""Naive sequential selective scan: the test oracle for :mod:`napari_unifuse.model.scan`.

One Python loop step per token, written from the recurrence of mamba-ssm's ``selective_scan_ref``
(mamba_ssm/ops/selective_scan_interface.py, v2.3.2) with the same order of operations, plus an
injected initial state ``h0``. Slow on purpose: it is the independent reference, not a code path
the model uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, G, N, L) -> (batch, dim, N, L): each group serves dim // G consecutive channels."""
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    backend: str = "reference",
):
    """Sequential selective scan; same signature and semantics as ``scan.selective_scan``.

    ``backend`` is accepted (and ignored) only so both functions can be called interchangeably.
    Computes in float32 unless the inputs are float64 (tests use float64 for strict checks).
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    B, C = B.to(compute), C.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as in the CUDA kernel
    batch, dim, length = u.shape
    dstate = A.shape[1]
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 2:  # time-invariant B (dim, N)
        delta_B_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    else:
        B_full = B[:, None].expand(batch, dim, dstate, length) if B.dim() == 3 else _expand_groups(B, dim)
        delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B_full, u)
    if C.dim() == 2:
        C_full = C[None, :, :, None].expand(batch, dim, dstate, length)
    else:
        C_full = C[:, None].expand(batch, dim, dstate, length) if C.dim() == 3 else _expand_groups(C, dim)
    state = (
        u.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.to(compute)
    )
    outputs = []
    # unbind, not indexing: the backward of L index ops would write L full-size gradients
    # (quadratic in L); unbind's backward stacks them once.
    steps = zip(delta_A.unbind(2), delta_B_u.unbind(2), C_full.unbind(3))
    for decay_t, input_t, C_t in steps:
        state = decay_t * state + input_t
        outputs.append(torch.einsum("bdn,bdn->bd", state, C_t))
    y = torch.stack(outputs, dim=2)
    out = y if D is None else y + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, state) if return_last_state else out
