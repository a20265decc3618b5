"""UniFuse training losses (paper §3, Eq. 1, 4–6, 11–14), generic over 2D and 3D.

Every image tensor is ``(B, C, *spatial)`` with 1, 2 or 3 spatial axes; displacements are
``(B, ndim, *spatial)`` in voxels (see docs/architecture.md). Each function returns a scalar
tensor averaged over the batch unless it says otherwise.

Where the paper writes ``SSIM(a, b)`` inside a loss to be minimised (Eq. 11, 13) we use
``1 - SSIM(a, b)``, the form every fusion paper it builds on (BSAFusion, MMIF-AMIN) optimises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# Wang et al. (2004) constants, as in skimage.metrics.structural_similarity.
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_SIGMA = 1.5
# scipy.ndimage.gaussian_filter's default truncation: radius = int(3.5 * 1.5 + 0.5) = 5 -> 11 taps.
SSIM_TRUNCATE = 3.5

PAPER_TEMPERATURE = 0.1


def _spatial_dims(x: torch.Tensor) -> int:
    spatial_dims = x.ndim - 2
    if spatial_dims not in _CONV:
        raise ValueError(f"expected a (B, C, *spatial) tensor with 1-3 spatial axes, got shape {tuple(x.shape)}")
    return spatial_dims


def _gaussian_taps(length: int, sigma: float, truncate: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 1D Gaussian, shortened (kept odd) when the axis is shorter than the window."""
    radius = int(truncate * sigma + 0.5)
    radius = min(radius, (length - 1) // 2)
    offsets = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _separable_gaussian_valid(x: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    """Gaussian filter along every spatial axis, 'valid' region only (no padding)."""
    spatial_dims = _spatial_dims(x)
    channels = x.shape[1]
    conv = _CONV[spatial_dims]
    for axis in range(spatial_dims):
        taps = _gaussian_taps(x.shape[2 + axis], sigma, truncate, x)
        view = [1, 1] + [1] * spatial_dims
        view[2 + axis] = taps.numel()
        weight = taps.reshape(view).expand(channels, *view[1:]).contiguous()
        x = conv(x, weight, groups=channels)
    return x


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
) -> torch.Tensor:
    """Mean structural similarity per sample, shape ``(B,)``.

    Gaussian-weighted SSIM of Wang et al. (2004) with population (co)variances, averaged over
    channels and over the positions where the whole window lies inside the image. This is the
    definition of ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``, which the tests use as the independent reference.
    """
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    filtered = _separable_gaussian_valid(stacked, sigma, truncate)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = filtered.chunk(5, dim=1)
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov_xy = mean_xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM(x, y)`` averaged over the batch (0 for identical images)."""
    return 1.0 - ssim(x, y).mean()


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sum over spatial axes of the absolute Sobel derivative, same shape as ``x``.

    Along each axis: central difference ``[-1, 0, 1]`` smoothed by ``[1, 2, 1]`` along the other
    axes, edges replicated. Equals ``sum_a |scipy.ndimage.sobel(x, axis=a, mode="nearest")|``.
    The L1 magnitude (|gx| + |gy| [+ |gz|]) is what the fusion losses this paper follows use.
    """
    spatial_dims = _spatial_dims(x)
    channels = x.shape[1]
    conv = _CONV[spatial_dims]
    padded = F.pad(x, [1, 1] * spatial_dims, mode="replicate")
    derivative = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    smoothing = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    magnitude = torch.zeros_like(x)
    for axis in range(spatial_dims):
        kernel = torch.ones([3] * spatial_dims, dtype=x.dtype, device=x.device)
        for other in range(spatial_dims):
            taps = derivative if other == axis else smoothing
            view = [1] * spatial_dims
            view[other] = 3
            kernel = kernel * taps.reshape(view)
        # conv is cross-correlation, like scipy's correlate1d inside ndimage.sobel.
        weight = kernel.expand(channels, 1, *kernel.shape).contiguous()
        magnitude = magnitude + conv(padded, weight, groups=channels).abs()
    return magnitude


def classification_loss(class_logits: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """L_ce (Eq. 1): cross-entropy of the degradation class, from logits ``(B, Ñ)``."""
    return F.cross_entropy(class_logits, class_index.long())


def _as_tokens(features: torch.Tensor) -> torch.Tensor:
    """``(B, N, M)`` tokens stay; ``(B, C, *spatial)`` maps become ``(B, N=prod(spatial), C)``."""
    if features.ndim == 3:
        return features
    if features.ndim in (4, 5):
        return features.flatten(2).transpose(1, 2)
    raise ValueError(f"features must be (B, N, M) tokens or (B, C, *spatial) maps, got {tuple(features.shape)}")


def contrastive_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    *,
    num_negatives: int = 16,
    temperature: float = PAPER_TEMPERATURE,
    max_anchors: int | None = 1024,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_cont (Eq. 5): InfoNCE between two feature sets whose positions correspond.

    For anchor ``f_i`` in ``anchors`` the positive is ``candidates`` at the same position ``i``;
    the K negatives are ``candidates`` at K positions drawn uniformly (with replacement) among
    the other positions. Similarities are cosine, divided by ``temperature`` (τ = 0.1).
    ``max_anchors`` positions (the same for the whole batch) are used as anchors to bound memory
    on 3D feature maps; ``None`` uses all.
    """
    anchor_tokens = F.normalize(_as_tokens(anchors), dim=-1)
    candidate_tokens = F.normalize(_as_tokens(candidates), dim=-1)
    if anchor_tokens.shape != candidate_tokens.shape:
        raise ValueError(f"feature shapes differ: {tuple(anchor_tokens.shape)} vs {tuple(candidate_tokens.shape)}")
    batch, positions, _ = anchor_tokens.shape
    if positions < 2:
        raise ValueError("the contrastive loss needs at least two positions to draw negatives from")
    device = anchor_tokens.device
    if max_anchors is not None and positions > max_anchors:
        anchor_index = torch.randperm(positions, generator=generator, device="cpu")[:max_anchors].to(device)
    else:
        anchor_index = torch.arange(positions, device=device)
    # An offset in [1, N-1] added modulo N never lands on the anchor's own position.
    offsets = torch.randint(1, positions, (batch, anchor_index.numel(), num_negatives), generator=generator)
    negative_index = (anchor_index[None, :, None] + offsets.to(device)) % positions

    chosen_anchors = anchor_tokens[:, anchor_index]  # (B, A, M)
    positives = candidate_tokens[:, anchor_index]  # (B, A, M)
    negatives = torch.gather(
        candidate_tokens[:, None].expand(-1, anchor_index.numel(), -1, -1),
        2,
        negative_index[..., None].expand(-1, -1, -1, candidate_tokens.shape[-1]),
    )  # (B, A, K, M)
    positive_similarity = (chosen_anchors * positives).sum(-1, keepdim=True)
    negative_similarity = torch.einsum("bam,bakm->bak", chosen_anchors, negatives)
    logits = torch.cat([positive_similarity, negative_similarity], dim=-1) / temperature
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean()


def registration_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_reg (Eq. 6): squared Euclidean error of the displacement, averaged over voxels.

    Per voxel ``|φ_gt(x) − φ(x)|²`` (the Frobenius norm of Eq. 6 divided by the voxel count, so
    the weight does not depend on the image size); voxel units.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"displacement shapes differ: {tuple(predicted.shape)} vs {tuple(target.shape)}")
    return ((predicted - target) ** 2).sum(dim=1).mean()


def smoothness_loss(displacement: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of ``Σ_axes Σ_components (∂u/∂axis)²`` with forward differences.

    The usual diffusion regulariser (VoxelMorph); optional in UniFuse, weight set in the config.
    """
    spatial_dims = displacement.ndim - 2
    total = displacement.new_zeros(())
    for axis in range(spatial_dims):
        difference = torch.diff(displacement, dim=2 + axis)
        total = total + (difference**2).sum(dim=1).mean()
    return total


def intensity_loss(fused: torch.Tensor, moving_target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_inten (Eq. 12): ``‖I_f − max(I_D, I_R)‖₁`` (mean absolute error)."""
    return (fused - torch.maximum(moving_target, reference)).abs().mean()


def gradient_loss(fused: torch.Tensor, moving_target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_grad (Eq. 12): ``‖|∇I_f| − max(|∇I_D|, |∇I_R|)‖₁`` with Sobel magnitudes."""
    target = torch.maximum(sobel_magnitude(moving_target), sobel_magnitude(reference))
    return (sobel_magnitude(fused) - target).abs().mean()


def structure_loss(fused: torch.Tensor, moving_target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_ssim (Eq. 11): ``(1 − SSIM(I_f, I_D)) + (1 − SSIM(I_f, I_R))``."""
    return ssim_loss(fused, moving_target) + ssim_loss(fused, reference)


def balance_loss(fused: torch.Tensor, moving_target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``max(1 − SSIM(I_f, I_D), 1 − SSIM(I_f, I_R))`` per sample, averaged over the batch (ours).

    The structural dissimilarity to the source the fused image resembles least: minimising it
    maximises the smaller per-source gain SSIM(I_f, S) − SSIM(other, S), which a copy of either
    source leaves at 0, so a one-sided fusion cannot score well on it.
    """
    return torch.maximum(1.0 - ssim(fused, moving_target), 1.0 - ssim(fused, reference)).mean()


def color_loss(
    cbcr_fused: torch.Tensor, cbcr_target: torch.Tensor, is_color: torch.Tensor | None = None
) -> torch.Tensor:
    """L_crcb (Eq. 13): ``‖C_f − C_fine‖₁ + (1 − SSIM(C_f, C_fine))`` on the 2 chroma channels.

    ``is_color`` (B,) masks out grayscale samples of a mixed batch; an all-grayscale batch gives 0.
    """
    per_sample = (cbcr_fused - cbcr_target).abs().flatten(1).mean(dim=1) + (1.0 - ssim(cbcr_fused, cbcr_target))
    if is_color is None:
        return per_sample.mean()
    weights = is_color.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def restoration_loss(restored: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Restored + aligned moving image vs. its clean aligned label: L1 + (1 − SSIM)."""
    return (restored - label).abs().mean() + ssim_loss(restored, label)

