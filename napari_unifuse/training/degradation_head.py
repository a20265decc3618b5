"""Refitting UniFuse's degradation head on the frozen network (``train.stage: degradation_head``).

Why. Trained jointly with the fusion at CPU scale (800 steps of two 32³ crops), the 3-D
checkpoint's classifier named the degradation right on half of the phantom validation crops of
every task: it never said "none", said "motion" for most inputs, and read the bundled T1 + motion-T2
pair as motion with p = 0.30. Its input, the DAPL read-outs, carries more than that: a logistic
regression on the frozen read-outs of 240 training crops scored 0.75 on 72 validation crops. The
head had seen 1 600 noisy samples once, each step shared with nine other loss terms. So, as in
decoupled classifier re-training (Kang et al., ICLR 2020), the head alone is fitted again on the
read-outs of many crops, while everything else, including the read-outs, stays as trained.

How. The read-outs (``DegradationAwarePromptLearning.classifier``'s input: the crop's pooled row,
then one row per z-slab in 3-D) of the ``data.train_length`` crops of the first training epoch are
computed once, with the network in evaluation mode, on the moving crop moved by the network's
initial alignment, as its forward pass and the engine compute them (with ``statistics_before_alignment``
the patch statistics on the unmoved crop, as they do then). The head is re-initialised from the seed, so
the result does not depend on the head it started from; its standardisation takes the exact mean
and variance of those read-outs; its MLP is fitted by ``train.max_steps`` AdamW steps of
``train.batch_size`` read-outs with cross-entropy on every row, the crop's class being each of its
slabs' too (a degradation is simulated over the whole crop), under the trainer's cosine schedule
(``train.lr`` to ``train.min_lr``).
Fitting the slab rows is what the per-slice plot reads. The config's fields that shape the head's
input (``HEAD_INPUT_FIELDS``) may differ from the checkpoint's: the shipped 3-D head reads patch
statistics (``model.dapl.patch_statistics``) that its network was trained without, and reads them
alone (``classifier_statistics_only``), which is what lets it tell clean inputs from degraded ones;
the shipped 2-D head also takes them before the matching's move (``statistics_before_alignment``).

What changes downstream. p routes ALSN's experts and gates the restoration (``model.unifuse``), so
the restored and fused outputs move with it; the sidecar's validation is therefore run again on the
whole network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from napari_unifuse.model.layers import RunningStandardize

# The head's name in UniFuse's state dict, and the network config fields that shape only its input:
# a refit may start from a checkpoint saved with other values (model.checkpoint.load_weights).
HEAD_MODULE = "dapl.classifier"
HEAD_INPUT_FIELDS = ("pool_readout_std", "readout_patch_statistics", "classifier_statistics_only",
                     "statistics_before_alignment")


def degradation_head(network: nn.Module) -> nn.Sequential:
    """The classifier the refit replaces: DAPL's MLP head (UniFuse only)."""
    dapl = getattr(network, "dapl", None)
    if dapl is None or not isinstance(getattr(dapl, "classifier", None), nn.Sequential):
        raise TypeError(f"{type(network).__name__} has no degradation head (only UniFuse does)")
    return dapl.classifier


@torch.no_grad()
def collect_readouts(network: nn.Module, dataset: Dataset, device: torch.device, *, batch_size: int,
                     num_workers: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (N, rows, features) for every sample of ``dataset``, and their classes (N,),
    as the network computes them: on the moving image moved by its initial alignment.

    Rows: the pooled read-out of the whole sample, then (3-D) one per z-slab. The network runs in
    evaluation mode and is left so."""
    head = degradation_head(network)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach().cpu()))
    network.eval()
    labels: list[torch.Tensor] = []
    done = 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
            moving, reference = batch["moving"].to(device), batch["reference"].to(device)
            # DAPL reads what UniFuse.forward and the engine give it: the moving image moved by the
            # initial alignment (and, with statistics_before_alignment, the unmoved one for its
            # statistics). Interpolation smooths noise and streaks, so a head fitted on unmoved crops
            # and run on moved ones called the metal CTs of misaligned 128³ pairs "none" (p 0.50-0.60).
            moved = network.moved_by(moving, network.initial_alignment(moving, reference))
            network.dapl(moved, reference, network.statistics_input(moving, moved))
            labels.append(batch["class_index"])
            done += len(batch["class_index"])
            if progress is not None:
                progress(done, len(dataset))
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(labels)


def fit_degradation_head(head: nn.Sequential, readouts: torch.Tensor, labels: torch.Tensor, *, steps: int,
                         batch_size: int, learning_rate: Callable[[int], float], weight_decay: float, seed: int,
                         log: Callable[[int, float], None] | None = None) -> None:
    """Re-initialise ``head`` from ``seed`` and fit it to ``readouts`` (N, rows, F) -> ``labels`` (N,)
    in place (see the module docstring): ``steps`` AdamW steps of ``batch_size`` read-outs, the
    learning rate of step s (0-based) being ``learning_rate(s)``; ``log(step, mean loss since the
    last call)`` every 100 steps and at the end."""
    standardize = head[0]
    if not isinstance(standardize, RunningStandardize):
        raise TypeError("the degradation head must start with a RunningStandardize")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for module in head:
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    rows = readouts.reshape(-1, readouts.shape[-1])
    standardize.running_mean.copy_(rows.mean(dim=0))
    standardize.running_square.copy_(rows.square().mean(dim=0))
    optimizer = torch.optim.AdamW(head[1:].parameters(), lr=learning_rate(0), weight_decay=weight_decay)
    head.train()
    standardize.eval()  # its statistics are the exact ones; no running updates
    row_labels = labels[:, None].expand(-1, readouts.shape[1])
    running, counted = 0.0, 0
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1)
        chosen = torch.randint(len(readouts), (batch_size,), generator=generator)
        logits = head(readouts[chosen])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), row_labels[chosen].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running, counted = running + float(loss.detach()), counted + 1
        if log is not None and (step % 100 == 0 or step == steps):
            log(step, running / counted)
            running, counted = 0.0, 0
    head.eval()
