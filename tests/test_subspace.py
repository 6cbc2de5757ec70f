import pytest
import torch

from pegp_hf.core.subspace import accumulate_covariance, empty_basis, grow_basis, max_overlap, project_out


def rotated_covariance(eigenvalues, seed=0):
    """C = Q diag(eigenvalues) Q^T with a random orthogonal Q; returns (C, Q)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


def assert_orthonormal(basis):
    gram = basis.double().T @ basis.double()
    assert torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-5)


def same_span(a, b):
    """Projectors onto span(a) and span(b) agree."""
    a, b = a.double(), b.double()
    return torch.allclose(a @ a.T, b @ b.T, atol=1e-5)


def test_covariance_is_uncentred_float64_sum_over_all_tokens():
    features = torch.randn(3, 5, 6) + 4.0  # (batch, tokens, d), far from zero mean
    cov = accumulate_covariance(None, features[:2])
    cov = accumulate_covariance(cov, features[2:])
    flat = features.reshape(-1, 6).double()
    assert cov.dtype == torch.float64
    assert torch.allclose(cov, flat.T @ flat)


@pytest.mark.parametrize(("threshold", "expected_k"), [(0.39, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (1.0, 4)])
def test_first_task_keeps_smallest_k_reaching_the_energy_threshold(threshold, expected_k):
    cov, q = rotated_covariance([4.0, 3.0, 2.0, 1.0, 0.0])  # energy shares 0.4, 0.3, 0.2, 0.1, 0
    basis = grow_basis(cov, threshold)
    assert basis.shape == (5, expected_k)
    assert basis.dtype == torch.float32
    assert_orthonormal(basis)
    assert same_span(basis, q[:, :expected_k])


def test_growth_appends_leading_residual_directions_and_keeps_the_old_basis():
    eye = torch.eye(6, dtype=torch.float64)
    old = eye[:, :1].float()  # e1 already protected
    cov = torch.diag(torch.tensor([1.0, 10.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    # captured 1/12 by e1; need 0.9: e2 adds 10/12 -> 11/12 >= 0.9, so exactly e2 is appended
    basis = grow_basis(cov, 0.9, old)
    assert basis.shape == (6, 2)
    assert torch.equal(basis[:, 0], old[:, 0])
    assert same_span(basis, eye[:, :2])
    assert_orthonormal(basis)


def test_growth_adds_nothing_when_old_basis_already_holds_the_energy():
    cov, q = rotated_covariance([5.0, 1.0, 0.0, 0.0])
    old = q[:, :2].float()
    assert torch.equal(grow_basis(cov, 0.99, old), old)


def test_growth_with_oblique_new_features_stays_orthonormal():
    torch.manual_seed(0)
    old = grow_basis(accumulate_covariance(None, torch.randn(50, 3) @ torch.randn(3, 8)), 0.999)
    new_features = torch.randn(50, 3) @ torch.randn(3, 8)  # a different 3-dim subspace, overlapping the old one
    basis = grow_basis(accumulate_covariance(None, new_features), 0.999, old)
    assert_orthonormal(basis)
    assert basis.shape[1] == 6
    residual = new_features - project_out(new_features, basis)  # the part inside span(basis)
    assert torch.allclose(residual, new_features, atol=1e-4)


def test_basis_is_capped_at_the_feature_dimension():
    cov, _ = rotated_covariance([1.0, 1.0, 1.0])
    full = grow_basis(cov, 1.0)
    assert full.shape == (3, 3)
    assert grow_basis(cov * 2, 1.0, full).shape == (3, 3)


def test_zero_covariance_gives_no_directions():
    assert grow_basis(torch.zeros(4, 4), 0.9).shape == (4, 0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="threshold"):
        grow_basis(torch.eye(3), 0.0)
    with pytest.raises(ValueError, match="feature dim"):
        grow_basis(torch.eye(3), 0.9, torch.zeros(4, 1))


def test_projection_removes_exactly_the_span_and_keeps_the_rest():
    _, q = rotated_covariance([3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    basis = q[:, :2].float()
    grad = torch.randn(7, 6)
    projected = project_out(grad, basis)
    assert max_overlap(projected, basis) < 1e-6
    assert max_overlap(grad, basis) > 1e-2
    complement = q[:, 2:].float()
    assert torch.allclose(projected @ complement, grad @ complement, atol=1e-6)
    assert torch.allclose(project_out(projected, basis), projected, atol=1e-6)  # idempotent
    assert torch.equal(project_out(grad, empty_basis(6)), grad)


def test_projection_of_low_precision_tensors_runs_in_float32():
    _, q = rotated_covariance([1.0] * 16)
    basis = q[:, :8].float()
    grad = torch.randn(32, 16).to(torch.bfloat16)
    projected = project_out(grad, basis)
    assert projected.dtype == torch.bfloat16
    reference = grad.double() - (grad.double() @ q[:, :8]) @ q[:, :8].T
    # one bf16 rounding of the result, not an accumulation of bf16 errors
    assert (projected.double() - reference).abs().max() <= 2**-7 * reference.abs().max()


def test_tensors_reading_one_input_share_one_covariance_and_the_cpu_sums_agree():
    """LoRA A of q_proj and v_proj multiply the same hidden states: one sum serves both, equal to what each would
    accumulate alone; on_cpu keeps float64 sums on the CPU from float32 batch products."""
    from helpers import tiny_vit

    from pegp_hf.core.capture import FeatureCovariances
    from pegp_hf.tuners import find_protected_tensors

    model = tiny_vit().eval()
    tensors = find_protected_tensors(model)
    pixels = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sums = {}
    for on_cpu in (False, True):
        with FeatureCovariances(tensors, on_cpu=on_cpu) as capture, torch.no_grad():
            model(pixel_values=pixels)
            model(pixel_values=pixels[:3])
        sums[on_cpu] = capture
    shared = sums[False].covariances
    q_a, v_a = (next(n for n in shared if f"{p}.lora_A" in n and "layers.0." in n) for p in ("q_proj", "v_proj"))
    assert shared[q_a] is shared[v_a] and len({id(c) for c in shared.values()}) == 3 * 2  # per layer: x, Aq x, Av x
    alone = {}
    for tensor in tensors:  # each tensor on its own: no sharing possible
        with FeatureCovariances([tensor]) as capture, torch.no_grad():
            model(pixel_values=pixels)
            model(pixel_values=pixels[:3])
        alone[tensor.name] = capture.covariances[tensor.name]
    for name, covariance in shared.items():
        torch.testing.assert_close(covariance, alone[name], rtol=0, atol=0)
        torch.testing.assert_close(sums[True].covariances[name], covariance, rtol=1e-5, atol=1e-4)
        assert sums[True].covariances[name].device.type == "cpu" and covariance.dtype == torch.float64
    assert sums[False].stored_bytes < sum(c.numel() * 8 for c in alone.values())
