"""Degradation-Aware Prompt Learning (DAPL, §3.2).

Shared 2-conv encoder for I'_D and I_R → Concat → conv → patch embedding (Q) → MambaBlock 1 →
three token orders (forward, reversed, bidirectional) each through the shared MambaBlock 2, whose
last hidden states are h1, h2, h3 → (a) degradation classifier p, (b) prompt selection G from h
through two MLPs, P̂ = P ⊙ G (Eq. 2).

Classifier input: the paper feeds h1..h3 through an MLP + linear + softmax. We feed MambaBlock 2's
outputs instead — each output token is the residual plus the out-projection of the read-out
C_t h_t (+ D u_t) of the hidden state at that position, gated by SiLU(z_t): a function of h, not
h itself — because token read-outs can be pooled per z-slab, which gives
the per-slice degradation probabilities of 3-D volumes from the same head as the global p. The
pooled read-outs are standardised with running statistics before the MLP (see
:class:`~napari_unifuse.model.layers.RunningStandardize`): without it the head stays at the class
prior. With ``pool_readout_std`` (the presets) the pooling is their mean and standard deviation:
noise, ghosts and streaks show in how the read-outs vary over an image more than in their
average (48 validation crops of 32³ from the 64³ phantoms, DAPL of the earlier checkpoint trained on
L_ce alone: with mean pooling 0.42-0.44 accuracy after 100-300 steps, loss at the class prior;
with mean and standard deviation 0.71 after 150 steps).

Size-robust read-out (``readout_window``, our addition). A read-out pooled over a whole volume is
not that of its parts: the Mamba scans run over more tokens and the pooled statistics move, so a
checkpoint trained on 32³ crops named every larger input's degradation wrong. With a window (the
training crop, set by the engine from the checkpoint), the token path (MambaBlock 1 and 2, the
read-outs and the last hidden states) runs on windows of that size on the patch grid (the
last one along an axis shifted back to end at the border), batched, from the encoder on the
image's windows (its GroupNorm then sees a window's statistics): each window sees what a training
crop did. The image's class probabilities are the windows' mean, weighted by how much
anatomy each holds; each window's slabs are classified on the window's own tokens, and a slice's
probabilities are those of the slabs holding it, averaged over windows by the same weights; h1..h3
are the windows' weighted mean. An input no larger than the window is one window: the read-out is
then the plain one, and the weights are unchanged either way.

Patch statistics (``readout_patch_statistics``, our addition). The read-outs come from patch
embeddings, and what is smaller than a patch (noise, ghosts, streaks) reaches them only as far as
training taught the embedding to keep it: the CPU-trained 3-D head named a clean T2, CT or PET the
way it named a degraded one (likelihood ratio 1.0, docs/speed_3d.md), while a
logistic regression on a few high-pass statistics of the same 32³ crops told clean from degraded
with AUC 0.87-0.97 per task. With the option, each token carries :func:`patch_statistics` of its
patch beside its read-outs, and the classifier pools them with the read-outs (mean, and standard
deviation with ``pool_readout_std``), per image, window and slab alike. They have no weights.

Statistics alone (``classifier_statistics_only``, our addition). On 360 held-out 32³ crops moved
by the matching, as the head reads them, a cross-validated logistic regression on the pooled
read-outs alone told clean from degraded with AUC 0.48 (CT → PET), 0.50 (MRI → CT) and 0.60
(T1 → T2): at CPU scale they carry the task, not the image's quality. An MLP head fitted on
read-outs and statistics together fits its training crops almost perfectly and loses on held-out
ones (accuracy 0.83 / 0.93 / 0.84, against 0.95 / 0.97 / 0.94 on the statistics alone;
``bench/probe_head_inputs.py``, bench/results/probe_head_inputs.md). With the option the
classifier pools the statistics only; the read-outs still give h1..h3 and the prompts. The class
read-out alone (:meth:`DegradationAwarePromptLearning.classify`, what the engine's ``classify``
stage runs) then skips the encoder and the Mamba scans, with the same logits bitwise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.layers import ConvBlock, RunningStandardize, conv, flatten_spatial
from napari_unifuse.model.mamba import MambaBlock
from napari_unifuse.model.smoothing import gaussian_blur

# Normalised intensity above which a voxel of either image counts as anatomy when weighting windows.
_ANATOMY = 0.05
# Weight of a window with no anatomy at all, so that an empty input still has a read-out.
_EMPTY_WINDOW_WEIGHT = 1e-3
# Gaussian sigma (voxels) that splits an image into its smooth content and its fine detail.
_DETAIL_SIGMA = 1.0
# Gaussian sigmas (voxels) bounding the finest band and the next one, whose ratio is the spectral slope.
_FINEST_SIGMA, _NEXT_SIGMA = 0.5, 1.5
# Floor of the detail magnitudes before their logarithm (intensities are in [0, 1]).
_DETAIL_FLOOR = 1e-4
PATCH_STATISTICS = 5  # features per patch from patch_statistics


def _per_window(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(W·B, ...) window-major -> (W, B, ...), W and B those of the (W, B) window ``weights``."""
    return x.reshape(*weights.shape, *x.shape[1:])


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(W, B, ...) -> (B, ...): the windows' mean, weighted by their (W, B) ``weights``."""
    return (x * weights.view(*weights.shape, *[1] * (x.dim() - 2))).sum(0)


def patch_statistics(moving: torch.Tensor, reference: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, *spatial) pair -> (B, PATCH_STATISTICS, *grid): per ``patch``-voxel patch, the log
    RMS and log mean magnitude of the moving image's detail (the image minus its Gaussian-smoothed
    self), the log RMS of the reference's detail, the moving image's mean intensity, and the
    moving image's spectral slope: the log RMS of its finest band (the image minus its σ = 0.5
    Gaussian) minus that of the next band (σ = 0.5 minus σ = 1.5).

    Why these: noise raises the moving image's detail everywhere in tissue, and ghosts and streaks
    where the reference has no edge of its own; Poisson (low-dose) noise grows with the intensity.
    Low-dose PET is the hard case: its scanner blur takes about as much detail from the anatomy
    as its noise adds, so the detail's RMS barely moves (a 96³ phantom: -3.11 clean, -3.13 low
    dose), while the noise's flat spectrum raises the slope (-1.67 against -1.33 to -1.49).
    The logarithm makes them independent of an image's contrast scale up to an offset, which the
    classifier's standardisation removes; the slope is a ratio, free of the scale altogether."""
    pool = (F.avg_pool2d, F.avg_pool3d)[moving.dim() - 4]
    floor = _DETAIL_FLOOR ** 2

    def log_rms(band: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.log(pool(band.square(), patch) + floor)

    moving_detail = moving - gaussian_blur(moving, _DETAIL_SIGMA)
    reference_detail = reference - gaussian_blur(reference, _DETAIL_SIGMA)
    finest_smooth, next_smooth = gaussian_blur(moving, _FINEST_SIGMA), gaussian_blur(moving, _NEXT_SIGMA)
    return torch.cat([log_rms(moving_detail),
                      torch.log(pool(moving_detail.abs(), patch) + _DETAIL_FLOOR),
                      log_rms(reference_detail),
                      pool(moving, patch),
                      log_rms(moving - finest_smooth) - log_rms(finest_smooth - next_smooth)], dim=1)


def token_orders(length: int, device=None) -> list[torch.Tensor]:
    """Index permutations of F_for, F_bac and F_bid (§3.2), 0-based.

    F_bid = [f¹ … f^(⌊N/2⌋−1), f^N … f^⌊N/2⌋]: the first ⌊N/2⌋−1 tokens in order, then the rest
    from the last one backwards.
    """
    forward = torch.arange(length, device=device)
    head = max(length // 2 - 1, 0)
    bidirectional = torch.cat([forward[:head], forward[head:].flip(0)])
    return [forward, forward.flip(0), bidirectional]


@dataclass
class DAPLOutput:
    moving_features: torch.Tensor      # F'_D (B, C, *spatial)
    reference_features: torch.Tensor   # F_R (B, C, *spatial)
    hidden_states: list[torch.Tensor]  # h1, h2, h3, each (B, inner_dim, d_state)
    class_logits: torch.Tensor | None        # (B, Ñ); None without the class read-out
    slice_class_logits: torch.Tensor | None  # (B, S, Ñ); idem
    prompts: torch.Tensor              # P̂ (B, Ñ, L, M)


class DegradationAwarePromptLearning(nn.Module):
    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        dims, channels, embed = config.spatial_dims, config.feature_channels, config.embed_dim
        self.config = config
        self.encoder = nn.Sequential(ConvBlock(dims, config.in_channels, channels),
                                     ConvBlock(dims, channels, channels))
        self.merge = conv(dims, 2 * channels, channels, 1)
        self.patch_embed = conv(dims, channels, embed, config.patch_size, stride=config.patch_size)
        self.token_norm = nn.LayerNorm(embed)
        mamba = dict(d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)
        self.mamba_first = MambaBlock(embed, **mamba)
        self.mamba_orders = MambaBlock(embed, **mamba)
        # MLP + linear + softmax head over pooled read-outs (softmax applied by the caller, next
        # to the CE loss).
        token_width = (0 if config.classifier_statistics_only else 3 * embed) + (
            PATCH_STATISTICS if config.readout_patch_statistics else 0)
        pooled_width = (2 if config.pool_readout_std else 1) * token_width
        self.classifier = nn.Sequential(RunningStandardize(pooled_width),
                                        nn.Linear(pooled_width, embed), nn.GELU(),
                                        nn.Linear(embed, embed), nn.GELU(),
                                        nn.Linear(embed, config.num_classes))
        # The two MLPs giving G (Ñ×L×M) from the stacked h (3·inner_dim × d_state): one maps the
        # state axis to the L prompts, the other the channel axis to Ñ·M.
        self.select_prompts = nn.Sequential(nn.Linear(config.d_state, config.prompt_length),
                                            nn.GELU(),
                                            nn.Linear(config.prompt_length, config.prompt_length))
        self.select_classes = nn.Sequential(nn.Linear(3 * config.inner_dim, embed), nn.GELU(),
                                            nn.Linear(embed, config.num_classes * embed))
        # The degradation-aware prompt set P (embedding-like N(0, 1) initialisation).
        self.prompt_set = nn.Parameter(
            torch.randn(config.num_classes, config.prompt_length, embed))
        # Side (voxels) of the windows the token path reads (see the module docstring); None: the
        # whole input. Not a weight: the engine sets it from the checkpoint's training crop.
        self.readout_window: int | None = None

    def forward(self, moving: torch.Tensor, reference: torch.Tensor,
                acquired: torch.Tensor | None = None, *, read_class: bool = True) -> DAPLOutput:
        """``acquired``: the moving image before the initial alignment moved it, on the same grid;
        with it the patch statistics of the moving image are taken there (``config``'s
        ``statistics_before_alignment``), everything else on ``moving``. ``read_class=False``:
        no class read-out (patch statistics, classifier), for a caller that routes by a p read
        elsewhere; the output's logits are then None."""
        moving_features, reference_features = self.encoder(moving), self.encoder(reference)
        patch = self.config.patch_size
        grid = tuple(side // patch for side in moving.shape[2:])
        windows = self._windows(grid)
        if len(windows) == 1:
            batch = self._patches(moving_features, reference_features)
        else:
            # (W·B, E, *window) from the images' windows (window-major): the encoder's GroupNorm
            # then sees each window's statistics, as it saw each training crop's.
            voxels = [tuple(slice(w.start * patch, w.stop * patch) for w in window) for window in windows]
            moving_windows = torch.cat([moving[(slice(None), slice(None), *w)] for w in voxels])
            reference_windows = torch.cat([reference[(slice(None), slice(None), *w)] for w in voxels])
            batch = self._patches(self.encoder(moving_windows), self.encoder(reference_windows))
        tokens = self.mamba_first(self.token_norm(flatten_spatial(batch)))
        readouts, hidden_states = [], []
        for order in token_orders(tokens.shape[1], tokens.device):
            readout, state = self.mamba_orders(tokens[:, order], return_last_state=True)
            readouts.append(readout[:, torch.argsort(order)])  # back to raster order
            hidden_states.append(state)
        weights = self._window_weights(moving, reference, grid, windows)  # (W, B)
        hidden_states = [_weighted_mean(_per_window(state, weights), weights) for state in hidden_states]
        prompts = self._select_prompts(hidden_states)
        if not read_class:
            return DAPLOutput(moving_features, reference_features, hidden_states, None, None, prompts)
        class_logits, slice_class_logits = self._read_class(
            torch.cat(readouts, dim=-1), moving, reference, acquired, grid, windows, weights)
        return DAPLOutput(moving_features, reference_features, hidden_states, class_logits,
                          slice_class_logits, prompts)

    def classify(self, moving: torch.Tensor, reference: torch.Tensor,
                 acquired: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The class read-out alone: (class logits (B, Ñ), per-slab logits (B, S, Ñ)), those of
        :meth:`forward`. With ``classifier_statistics_only`` the classifier reads nothing but the
        patch statistics, so the encoder and the Mamba scans (most of DAPL's time) are skipped."""
        if not self.config.classifier_statistics_only:
            output = self(moving, reference, acquired)
            assert output.class_logits is not None and output.slice_class_logits is not None
            return output.class_logits, output.slice_class_logits
        grid = tuple(side // self.config.patch_size for side in moving.shape[2:])
        windows = self._windows(grid)
        weights = self._window_weights(moving, reference, grid, windows)
        return self._read_class(None, moving, reference, acquired, grid, windows, weights)

    def _read_class(self, readouts: torch.Tensor | None, moving: torch.Tensor, reference: torch.Tensor,
                    acquired: torch.Tensor | None, grid: tuple[int, ...], windows: list[tuple[slice, ...]],
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and per-slab logits from the windows' token ``readouts`` (W·B, Nw, 3E) and the
        patch statistics; ``readouts`` is not read (may be None) with ``classifier_statistics_only``."""
        token_features = readouts
        if self.config.readout_patch_statistics:
            statistics = patch_statistics(moving if acquired is None else acquired, reference, self.config.patch_size)
            token_statistics = torch.cat(
                [flatten_spatial(statistics[(slice(None), slice(None), *window)]) for window in windows])
            token_features = (token_statistics if self.config.classifier_statistics_only or readouts is None
                              else torch.cat([readouts, token_statistics], dim=-1))
        assert token_features is not None
        pooled = self._pool(token_features, dim=1)[:, None]  # (W·B, 1, classifier width)
        if len(windows) == 1:
            slabs = self._slab_pool(token_features, grid) if self.config.spatial_dims == 3 else None
            # One head call for the image and its slabs: in training they share the running statistics.
            logits = self.classifier(pooled if slabs is None else torch.cat([pooled, slabs], dim=1))
            return logits[:, 0], logits if slabs is None else logits[:, 1:]
        window_grid = tuple(window.stop - window.start for window in windows[0])
        window_probs = torch.softmax(self.classifier(pooled)[:, 0], dim=-1)
        class_logits = _weighted_mean(_per_window(window_probs, weights), weights).clamp_min(1e-12).log()
        slice_class_logits = class_logits[:, None] if self.config.spatial_dims == 2 else self._window_slab_logits(
            _per_window(token_features, weights), window_grid, windows, weights, grid)
        return class_logits, slice_class_logits

    def _patches(self, moving_features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
        """Encoder features of the pair -> merged patch embeddings Q (B, E, *grid)."""
        return self.patch_embed(self.merge(torch.cat([moving_features, reference_features], dim=1)))

    def _windows(self, grid: tuple[int, ...]) -> list[tuple[slice, ...]]:
        """Windows of ``readout_window`` voxels (in patches) tiling the patch ``grid``: one per
        step of the window along each axis, the last shifted back to end at the border; the whole
        grid when there is no window or the grid fits in one."""
        if self.readout_window is None:
            return [tuple(slice(0, side) for side in grid)]
        size = max(1, self.readout_window // self.config.patch_size)
        starts_per_axis = []
        for side in grid:
            width = min(size, side)
            starts = list(range(0, side - width + 1, width))
            if starts[-1] + width < side:
                starts.append(side - width)
            starts_per_axis.append([slice(start, start + width) for start in starts])
        return list(itertools.product(*starts_per_axis))

    def _window_weights(self, moving: torch.Tensor, reference: torch.Tensor, grid: tuple[int, ...],
                        windows: list[tuple[slice, ...]]) -> torch.Tensor:
        """(W, B) weights summing to 1 over the windows: each window's share of anatomy (voxels
        where either image shows something), so that air around a head does not vote."""
        if len(windows) == 1:
            return moving.new_ones(1, moving.shape[0])
        pool = (F.avg_pool2d, F.avg_pool3d)[self.config.spatial_dims - 2]
        anatomy = pool((torch.maximum(moving, reference) > _ANATOMY).to(moving.dtype), self.config.patch_size)
        anatomy = anatomy[:, 0, *(slice(0, side) for side in grid)]
        weights = torch.stack([anatomy[(slice(None), *window)].flatten(1).mean(1) for window in windows])
        weights = weights + _EMPTY_WINDOW_WEIGHT
        return weights / weights.sum(0, keepdim=True)

    def _window_slab_logits(self, window_features: torch.Tensor, window_grid: tuple[int, ...],
                            windows: list[tuple[slice, ...]], weights: torch.Tensor,
                            grid: tuple[int, ...]) -> torch.Tensor:
        """(W, B, Nw, F) token read-outs of the windows -> (B, S, Ñ) per-slab log-probabilities.

        Each window's slabs are pooled over the window's own tokens, as a training crop's are (a
        slab pooled across a whole slice spreads over far more anatomy than a crop's, and its
        standard deviation reads as noise: the per-slice plot of the 1 mm sample said "low dose"
        where the volume said "motion"). Their probabilities go onto the window's rows of patches,
        are averaged over the windows covering each row, weighted by the windows' anatomy, and
        then over each slab's rows."""
        images, slab_rows = window_features.shape[1], self.config.slab_patches
        row_probs = window_features.new_zeros(images, grid[0], self.config.num_classes)
        row_weights = window_features.new_zeros(images, grid[0], 1)
        for features, window, weight in zip(window_features, windows, weights):
            probs = torch.softmax(self.classifier(self._slab_pool(features, window_grid)), dim=-1)
            rows = probs.repeat_interleave(slab_rows, dim=1)[:, : window_grid[0]]
            row_probs[:, window[0]] += rows * weight[:, None, None]
            row_weights[:, window[0]] += weight[:, None, None]
        row_probs = row_probs / row_weights.clamp_min(1e-12)
        slabs = torch.stack([rows.mean(dim=1) for rows in row_probs.split(slab_rows, dim=1)], dim=1)
        return slabs.clamp_min(1e-12).log()

    def _pool(self, features: torch.Tensor, dim: int) -> torch.Tensor:
        """Token features pooled over ``dim``: their mean, and with ``pool_readout_std`` their
        standard deviation after it (one token: 0)."""
        mean = features.mean(dim=dim)
        if not self.config.pool_readout_std:
            return mean
        spread = features.std(dim=dim) if features.shape[dim] > 1 else torch.zeros_like(mean)
        return torch.cat([mean, spread], dim=-1)

    def _slab_pool(self, token_features: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """(B, N, F) token features of a volume -> (B, S, F or 2F): pooled (``_pool``) over the
        tokens of each slab of ``slab_patches`` patch rows along the first array axis (z); the last
        slab may be thinner."""
        rows = token_features.reshape(token_features.shape[0], grid[0], -1, token_features.shape[-1])
        return torch.stack([self._pool(rows_in_slab.flatten(1, 2), dim=1)
                            for rows_in_slab in rows.split(self.config.slab_patches, dim=1)],
                           dim=1)

    def _select_prompts(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """h1..h3 -> G (B, Ñ, L, M) in (0, 1) -> P̂ = P ⊙ G."""
        stacked = torch.cat(hidden_states, dim=1)           # (B, 3·inner, d_state)
        per_prompt = self.select_prompts(stacked).transpose(1, 2)   # (B, L, 3·inner)
        selection = self.select_classes(per_prompt)          # (B, L, Ñ·M)
        batch, length = selection.shape[:2]
        selection = selection.view(batch, length, self.config.num_classes, -1).transpose(1, 2)
        return self.prompt_set * torch.sigmoid(selection)
