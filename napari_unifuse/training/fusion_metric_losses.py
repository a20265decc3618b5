"""Differentiable counterparts of two fusion metrics, as losses for 2D fusion networks (ours).

* ``edge_transfer_loss`` = 1 − Q^{AB/F} (``metrics.q_abf``, Xydeas & Petrović): Sobel edge strength
  and orientation kept from each source, weighted by the source's edge strength.
* ``information_fidelity_loss`` = 1 − ½ (VIF(R → F) + VIF(M → F)) (``metrics.q_vif`` halved: pixel
  VIF of Sheikh & Bovik, as torchmetrics computes it).

Both metrics alone rank a copy of a source above max fusion (Q_abf 0.72 and Q_vif 1.04 for a copy
of the MRI on clean validation crops, against 0.69 and 0.76 for max fusion:
``bench/probe_mmif_amin_loss.py``), so they are only ever used beside a term a copy cannot
satisfy (``losses.balance_loss``). Images are ``(B, 1, y, x)`` in [0, 1]; both metrics are defined
on a 0–255 grey scale, so the losses scale by 255 first. Each returns the batch mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY_RANGE = 255.0

# Sobel kernels of metrics.fusion_gradient, flipped: conv2d correlates where scipy's convolve2d convolves.
_SOBEL_ROWS = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]])
_SOBEL_COLUMNS = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
_TG, _KG, _DG = 0.9994, -15.0, 0.5
_TA, _KA, _DA = 0.9879, -22.0, 0.8
# Keeps |∇| and arctan(s_y / s_x) differentiable where an image is flat (grey levels, 0–255 scale).
_FLAT = 1e-3

# VIF-P: the HVS noise variance on the 0–255 scale and the guard against 0/0 (torchmetrics' values).
_VIF_NOISE_VARIANCE = 2.0
_VIF_EPS = 1e-10
_VIF_SCALES = 4


def _check_2d(*images: torch.Tensor) -> None:
    for image in images:
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"expected (B, 1, y, x) images, got shape {tuple(image.shape)}")


def _edges(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel strength and orientation arctan(s_y / s_x) (zero padding, as metrics.q_abf)."""
    s_x = F.conv2d(image, _SOBEL_COLUMNS.to(image)[None, None], padding=1)
    s_y = F.conv2d(image, _SOBEL_ROWS.to(image)[None, None], padding=1)
    strength = torch.sqrt(s_x**2 + s_y**2 + _FLAT**2)
    s_x_away_from_zero = torch.where(s_x.abs() < _FLAT, torch.where(s_x < 0, -_FLAT, _FLAT), s_x)
    return strength, torch.atan(s_y / s_x_away_from_zero)


def soft_q_abf(fused: torch.Tensor, reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Q^{AB/F} per image ``(B,)``, differentiable in ``fused``."""
    _check_2d(fused, reference, moving)
    strength_f, orientation_f = _edges(fused * GREY_RANGE)
    transferred = torch.zeros(fused.shape[0], dtype=fused.dtype, device=fused.device)
    weight = torch.zeros_like(transferred)
    for source in (reference, moving):
        strength_s, orientation_s = _edges(source * GREY_RANGE)
        relative = torch.minimum(strength_s, strength_f) / torch.maximum(strength_s, strength_f)
        alignment = 1 - (orientation_s - orientation_f).abs() / (math.pi / 2)
        kept = _TG * torch.sigmoid(-_KG * (relative - _DG)) * _TA * torch.sigmoid(-_KA * (alignment - _DA))
        transferred = transferred + (kept * strength_s).flatten(1).sum(dim=1)
        weight = weight + strength_s.flatten(1).sum(dim=1)
    return transferred / weight


def _gaussian_window(size: int, like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * (size / 5) ** 2))
    window = taps[:, None] * taps[None, :]
    return (window / window.sum())[None, None]


def pixel_vif(source: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
    """VIF-P(source → distorted) per image ``(B,)`` on the 0–255 scale (torchmetrics' algorithm,
    written without in-place masking so that it has a gradient). A flat source (an all-background
    PET or SPECT crop) has no information to lose and scores 1, as in ``metrics.q_vif`` (CDDFuse)."""
    _check_2d(source, distorted)
    source, distorted = source * GREY_RANGE, distorted * GREY_RANGE
    kept = torch.zeros(source.shape[0], dtype=source.dtype, device=source.device)
    available = torch.zeros_like(kept)
    for scale in range(_VIF_SCALES):
        window = _gaussian_window(2 ** (_VIF_SCALES - scale) + 1, source)
        if scale > 0:
            source = F.conv2d(source, window)[:, :, ::2, ::2]
            distorted = F.conv2d(distorted, window)[:, :, ::2, ::2]
        mean_s, mean_d = F.conv2d(source, window), F.conv2d(distorted, window)
        variance_s = (F.conv2d(source**2, window) - mean_s**2).clamp(min=0)
        variance_d = (F.conv2d(distorted**2, window) - mean_d**2).clamp(min=0)
        covariance = F.conv2d(source * distorted, window) - mean_s * mean_d
        gain = covariance / (variance_s + _VIF_EPS)
        noise = variance_d - gain * covariance
        flat_source = variance_s < _VIF_EPS
        gain = torch.where(flat_source, 0.0, gain)
        noise = torch.where(flat_source, variance_d, noise)
        variance_s = torch.where(flat_source, 0.0, variance_s)
        flat_distorted = variance_d < _VIF_EPS
        gain = torch.where(flat_distorted, 0.0, gain)
        noise = torch.where(flat_distorted, 0.0, noise)
        inverted = gain < 0
        noise = torch.where(inverted, variance_d, noise)
        gain = torch.where(inverted, 0.0, gain)
        noise = noise.clamp(min=_VIF_EPS)
        kept = kept + torch.log10(1 + gain**2 * variance_s / (noise + _VIF_NOISE_VARIANCE)).flatten(1).sum(dim=1)
        available = available + torch.log10(1 + variance_s / _VIF_NOISE_VARIANCE).flatten(1).sum(dim=1)
    informative = available > 0
    return torch.where(informative, kept / torch.where(informative, available, 1.0), 1.0)


def edge_transfer_loss(fused: torch.Tensor, moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``1 − Q^{AB/F}``, batch mean."""
    return (1 - soft_q_abf(fused, reference, moving)).mean()


def information_fidelity_loss(fused: torch.Tensor, moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``1 − ½ (VIF(R → F) + VIF(M → F))``, batch mean (VIF can exceed 1, so this can go below 0)."""
    return (1 - (pixel_vif(reference, fused) + pixel_vif(moving, fused)) / 2).mean()
