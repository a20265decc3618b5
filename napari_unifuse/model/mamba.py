"""Mamba-1 block (Gu & Dao 2023) whose SSM can start from an injected hidden state.

Layout follows mamba-ssm's ``Mamba`` mixer: in_proj → causal depthwise conv1d → SiLU → x_proj →
dt_proj → selective scan → SiLU(z) gate → out_proj, wrapped in pre-LayerNorm + residual. The
``initial_state`` h0 is what makes the "Spatial Mamba" of OUFR (Eq. 3: y = C(Ā h_j + B̄ f)),
and ``return_last_state`` gives DAPL's h1..h3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_unifuse.model.scan import selective_scan


class SelectiveScan(nn.Module):
    """The selective scan as a module, so FLOP counters can tell its operations apart (a fused
    CUDA kernel is invisible to them, the torch path only partly visible) and add them
    analytically instead."""

    # Per (batch, channel, step, state): exp(δA), δ·B·u (2), A-update (2), C·h read-out (2).
    FLOPS_PER_STATE = 8
    # Per (batch, channel, step): softplus(δ + bias), D·u skip, SiLU(z) gate.
    FLOPS_PER_CHANNEL = 10

    def forward(self, *args, **kwargs):
        return selective_scan(*args, **kwargs)

    @classmethod
    def flops(cls, batch: int, channels: int, length: int, d_state: int) -> int:
        return batch * channels * length * (cls.FLOPS_PER_STATE * d_state + cls.FLOPS_PER_CHANNEL)


class MambaBlock(nn.Module):
    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.inner_dim = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * self.inner_dim, bias=False)
        self.conv1d = nn.Conv1d(self.inner_dim, self.inner_dim, d_conv, groups=self.inner_dim,
                                padding=d_conv - 1)
        self.x_proj = nn.Linear(self.inner_dim, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner_dim, bias=True)
        self.scan = SelectiveScan()
        self.out_proj = nn.Linear(self.inner_dim, dim, bias=False)
        # S4D-real initialisation of A and Mamba's dt initialisation (log-uniform step sizes in
        # [dt_min, dt_max] through an inverse softplus bias), as in mamba-ssm.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.inner_dim, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.inner_dim))
        dt = torch.exp(torch.rand(self.inner_dim) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                return_last_state: bool = False):
        """x: (B, L, dim) tokens. initial_state: (B, inner_dim, d_state) or None.

        Returns the updated tokens (B, L, dim), and the SSM's last hidden state
        (B, inner_dim, d_state) when ``return_last_state``.
        """
        length = x.shape[1]
        xz = self.in_proj(self.norm(x)).transpose(1, 2)  # (B, 2·inner, L)
        u, z = xz.chunk(2, dim=1)
        u = F.silu(self.conv1d(u)[..., :length])  # causal: drop the right-hand padding
        dt, b, c = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # bias added inside the scan
        result = self.scan(
            u, delta, -torch.exp(self.A_log), b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(), self.D, z=z, delta_bias=self.dt_proj.bias,
            delta_softplus=True, initial_state=initial_state,
            return_last_state=return_last_state,
        )
        y, last_state = result if return_last_state else (result, None)
        out = x + self.out_proj(y.transpose(1, 2))
        return (out, last_state) if return_last_state else out

    def extra_repr(self) -> str:
        return f"inner_dim={self.inner_dim}, d_state={self.d_state}"
