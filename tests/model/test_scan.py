"""The chunked torch selective scan against the one-step-per-token reference, and backend dispatch.

Strict checks run in float64 (chunking reorders nothing but the carry, so agreement is ~1e-12;
we assert 1e-9). float32 runs are checked against the float64 reference to 1e-4 relative to the
output's scale, the accuracy the model actually gets.
"""

from __future__ import annotations

import builtins

import pytest
import torch

from napari_unifuse.errors import InputError
from napari_unifuse.model import scan
from napari_unifuse.model.scan import (
    _scan_from_zero_state_kernel,
    scan_backend,
    selective_scan,
    selective_scan_torch,
)
from napari_unifuse.model.scan_reference import selective_scan_reference

STRICT = 1e-9


def make_inputs(batch=2, dim=6, dstate=4, length=33, groups=None, dtype=torch.float64, seed=0,
                time_invariant_bc=False):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc_shape = (
        (dim, dstate) if time_invariant_bc
        else (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    )
    return dict(
        u=randn(batch, dim, length),
        delta=randn(batch, dim, length) * 0.5,
        # Mamba's S4D-real init spans A = -1 .. -N; widen it so some channels forget fast.
        A=-torch.rand(dim, dstate, generator=gen, dtype=dtype) * 8.0 - 0.05,
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim),
        z=randn(batch, dim, length),
        delta_bias=randn(dim) * 0.5,
        initial_state=randn(batch, dim, dstate),
    )


# Option sets exercised at every length: each can fail independently of the others.
OPTIONS = {
    "bare": dict(drop=("D", "z", "delta_bias", "initial_state"), softplus=False),
    "softplus+bias": dict(drop=("D", "z", "initial_state"), softplus=True),
    "D+z": dict(drop=("delta_bias", "initial_state"), softplus=True),
    "initial_state": dict(drop=("D", "z"), softplus=True),
    "everything": dict(drop=(), softplus=True),
}


def run_both(inputs, options, return_last_state, **torch_kwargs):
    kwargs = {k: v for k, v in inputs.items() if k not in options["drop"]}
    kwargs.update(delta_softplus=options["softplus"], return_last_state=return_last_state)
    ours = selective_scan_torch(**kwargs, **torch_kwargs)
    reference = selective_scan_reference(**kwargs)
    return ours, reference


def assert_close(actual, expected, tol, what=""):
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol:.1g} x {scale:.3g}"


@pytest.mark.parametrize("length", [1, 7, 1000, 4096])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference_float64(length, option):
    dims = dict(batch=1, dim=3, dstate=2) if length > 1000 else {}
    inputs = make_inputs(length=length, **dims)
    (out, last), (ref_out, ref_last) = run_both(inputs, OPTIONS[option], return_last_state=True)
    assert out.shape == ref_out.shape and last.shape == ref_last.shape
    assert_close(out, ref_out, STRICT)
    assert_close(last, ref_last, STRICT)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_B_C(groups):
    inputs = make_inputs(groups=groups, length=50)
    (out, last), (ref_out, ref_last) = run_both(inputs, OPTIONS["everything"], True)
    assert_close(out, ref_out, STRICT)
    assert_close(last, ref_last, STRICT)


def test_time_invariant_B_C():
    inputs = make_inputs(time_invariant_bc=True, length=40)
    out, ref_out = run_both(inputs, OPTIONS["everything"], False)
    assert_close(out, ref_out, STRICT)


@pytest.mark.parametrize("chunk_size", [1, 5, 32, 64, 500])
def test_any_chunk_size_gives_the_same_result(chunk_size):
    # 97 tokens: prime, so every chunk size > 1 leaves a padded last chunk.
    inputs = make_inputs(length=97)
    (out, last), (ref_out, ref_last) = run_both(inputs, OPTIONS["everything"], True,
                                                chunk_size=chunk_size)
    assert_close(out, ref_out, STRICT)
    assert_close(last, ref_last, STRICT)


def test_float32_long_sequence_within_1e_4():
    inputs64 = make_inputs(batch=1, dim=8, dstate=16, length=4096)
    inputs32 = {k: v.float() for k, v in inputs64.items()}
    out32, last32 = selective_scan(**inputs32, delta_softplus=True, return_last_state=True,
                                   backend="torch")
    ref_out, ref_last = selective_scan_reference(**inputs64, delta_softplus=True,
                                                 return_last_state=True)
    assert out32.dtype == torch.float32 and last32.dtype == torch.float32
    assert_close(out32.double(), ref_out, 1e-4)
    assert_close(last32.double(), ref_last, 1e-4)


def test_very_negative_decay_does_not_overflow():
    # |A|·delta up to ~1e4 per token: a cumulative-product trick that divides by decays would
    # overflow float32 here; the chunked carry must stay finite and exact.
    inputs = {k: v.float() for k, v in make_inputs(length=300).items()}
    inputs["A"] = inputs["A"] * 200
    inputs["delta"] = inputs["delta"] * 20  # softplus(.) up to ~40
    out = selective_scan_torch(**inputs, delta_softplus=True, chunk_size=64)
    ref_out = selective_scan_reference(**inputs, delta_softplus=True)
    assert torch.isfinite(out).all()
    assert_close(out.double(), ref_out.double(), 1e-4)


def _loss_and_grads(scan_fn, inputs, **kwargs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out, last = scan_fn(**leaves, delta_softplus=True, return_last_state=True, **kwargs)
    # Nonlinear in both outputs, so every gradient path (y and last state) is exercised.
    loss = (out * torch.sin(out)).sum() + (last ** 2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("groups", [None, 2])
def test_gradients_match_reference(groups):
    inputs = make_inputs(groups=groups, length=29)
    ours = _loss_and_grads(selective_scan_torch, inputs, chunk_size=4)  # 8 chunks, padded
    reference = _loss_and_grads(selective_scan_reference, inputs)
    for name in inputs:
        assert_close(ours[name], reference[name], STRICT, f"grad {name}")


def test_gradients_pass_torch_gradcheck():
    # Independent of the reference: finite differences of the hand-written backward.
    inputs = make_inputs(batch=1, dim=2, dstate=2, length=9, groups=2)
    names = list(inputs)

    def fn(*tensors):
        kwargs = dict(zip(names, tensors))
        out, last = selective_scan_torch(**kwargs, delta_softplus=True, return_last_state=True,
                                         chunk_size=4)
        return out, last

    leaves = tuple(v.clone().requires_grad_(True) for v in inputs.values())
    assert torch.autograd.gradcheck(fn, leaves)


def test_backward_memory_does_not_grow_with_states_times_length():
    # Autograd must keep O(batch·dim·(L + N·L/T)) numbers, not the (batch, dim, N, L) states.
    batch, dim, dstate, length = 1, 32, 16, 4096
    inputs = {k: v.float().requires_grad_(True) for k, v in
              make_inputs(batch=batch, dim=dim, dstate=dstate, length=length).items()
              if k in ("u", "delta", "A", "B", "C")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        out = selective_scan_torch(**inputs, delta_softplus=True)
    full_states = batch * dim * dstate * length
    assert sum(saved) < full_states / 2
    out.sum().backward()
    assert inputs["A"].grad is not None and torch.isfinite(inputs["A"].grad).all()


def test_injected_state_composition_matches_reference():
    # The mamba-ssm path runs a zero-state kernel and adds the closed-form response to h0 (and
    # recomputes the last state in closed form). Check that composition on CPU, with the torch
    # scan standing in for the CUDA kernel.
    def zero_state_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus)

    def composed(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                 return_last_state):
        return _scan_from_zero_state_kernel(zero_state_scan, u, delta, A, B, C, D, z, delta_bias,
                                            delta_softplus, initial_state, return_last_state)

    for groups in (None, 3):
        inputs = make_inputs(groups=groups, length=77)
        out, last = composed(**inputs, delta_softplus=True, return_last_state=True)
        ref_out, ref_last = selective_scan_reference(**inputs, delta_softplus=True,
                                                     return_last_state=True)
        assert_close(out, ref_out, STRICT)
        assert_close(last, ref_last, STRICT)
        ours = _loss_and_grads(composed, inputs)
        reference = _loss_and_grads(selective_scan_reference, inputs)
        for name in inputs:
            assert_close(ours[name], reference[name], STRICT, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Backend dispatch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_mamba_import():
    """Forget the cached mamba-ssm import attempt before and after the test."""
    scan.mamba_selective_scan_fn.cache_clear()
    yield
    scan.mamba_selective_scan_fn.cache_clear()


def _refusing_import(error):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith(("mamba_ssm", "selective_scan_cuda")):
            raise error
        return real_import(name, *args, **kwargs)

    return fake_import


def test_a_mamba_install_that_fails_otherwise_on_import_falls_back_with_a_warning(monkeypatch, fresh_mamba_import):
    """Triton raises RuntimeError for a GPU it cannot compile for: every run would fail, not just the scan."""
    monkeypatch.setattr(builtins, "__import__", _refusing_import(RuntimeError("Triton Error [CUDA]: no kernel image")))
    with pytest.warns(RuntimeWarning, match="mamba-ssm is installed but failed to import.*Triton Error"):
        assert scan.mamba_selective_scan_fn() is None
    assert scan_backend("cuda") == "torch"


@pytest.mark.parametrize("error", [OSError("libcudart.so.12: cannot open shared object file"),
                                   ImportError("No module named 'selective_scan_cuda'")])
def test_broken_mamba_import_falls_back_to_torch(monkeypatch, fresh_mamba_import, error):
    monkeypatch.setattr(builtins, "__import__", _refusing_import(error))
    assert scan.mamba_selective_scan_fn() is None
    assert scan_backend("cuda") == "torch"
    assert scan_backend("cpu") == "torch"
    inputs = {k: v.float() for k, v in make_inputs(length=20).items()}
    out = selective_scan(**inputs, delta_softplus=True, backend="auto")
    assert_close(out, selective_scan_reference(**inputs, delta_softplus=True), 1e-4)


def test_auto_uses_torch_on_cpu_even_when_mamba_imports(monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("mamba-ssm kernel called for CPU tensors")

    monkeypatch.setattr(scan, "mamba_selective_scan_fn", lambda: kernel_must_not_run)
    assert scan_backend("cpu") == "torch"
    assert scan_backend("cuda") == "mamba-ssm"
    inputs = {k: v.float() for k, v in make_inputs(length=20).items()}
    out = selective_scan(**inputs, backend="auto")
    assert_close(out, selective_scan_reference(**inputs), 1e-4)


def test_module_reports_backend(monkeypatch):
    monkeypatch.setattr(scan, "mamba_selective_scan_fn", lambda: None)
    assert scan.BACKEND == "torch"


def test_explicit_mamba_backend_on_cpu_is_a_clear_error():
    inputs = {k: v.float() for k, v in make_inputs(length=5).items()}
    with pytest.raises(InputError, match="mamba-ssm"):
        selective_scan(**inputs, backend="mamba-ssm")
    with pytest.raises(InputError, match="backend"):
        selective_scan(**inputs, backend="triton")


@pytest.mark.parametrize(
    "field, bad",
    [
        ("u", torch.zeros(2, 6)),
        ("A", torch.zeros(5, 4)),
        ("B", torch.zeros(2, 4, 32)),
        ("C", torch.zeros(2, 4, 4, 33)),  # 4 groups do not divide dim 6
        ("D", torch.zeros(5)),
        ("initial_state", torch.zeros(2, 6, 3)),
    ],
)
def test_bad_shapes_raise_input_error(field, bad):
    inputs = {k: v.float() for k, v in make_inputs(length=33).items()}
    inputs[field] = bad
    with pytest.raises(InputError, match=field if field != "u" else "u and delta"):
        selective_scan(**inputs, backend="torch")
