"""Evaluation metrics (lycoris_like.metrics): hand-computed values on tiny inputs, the identities
the papers rely on, and clear errors for bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lycoris_like import ConfigError
from lycoris_like.metrics import (
    amplification_factor,
    average_cosine_similarity,
    embedding_variance,
    gram_matrix,
    squared_centroid_distance,
    style_loss,
    subspace_similarity,
    vendi_score,
    vlhi,
)


def close(x, expected, tol=1e-12):
    """x (a tensor) equals the hand-computed `expected` to float64 rounding."""
    torch.testing.assert_close(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------- VLHI


def test_vlhi_by_hand():
    # FID 10, 20, 30 → (max − FID)/(max − min) = (30−10)/20, (30−20)/20, 0 = 1, 0.5, 0
    # CLIP .30, .25, .35 → (CLIP − min)/(max − min) = .05/.10, 0, .10/.10 = 0.5, 0, 1
    out = vlhi([10.0, 20.0, 30.0], [0.30, 0.25, 0.35])
    assert out.dtype == torch.float64 and out.shape == (3,)
    close(out, [1.5, 0.5, 1.0])


def test_vlhi_accepts_tensors_and_is_bounded():
    g = torch.Generator().manual_seed(0)
    fid, clip = torch.rand(9, generator=g) * 50, torch.rand(9, generator=g)
    out = vlhi(fid, clip)
    assert bool(((out >= 0) & (out <= 2)).all())
    # the best-FID model gets 1 from the FID term, the worst 0
    close(vlhi(fid, torch.zeros(9))[fid.argmin()], 1.0)
    close(vlhi(fid, torch.zeros(9))[fid.argmax()], 0.0)


def test_vlhi_degenerate_terms_are_zero():
    # all FIDs equal: (max − FID) = 0 for every model, so the FID term is 0 (no 0/0 NaN);
    # the CLIP term alone ranks: (1−1)/1, (2−1)/1 = 0, 1
    close(vlhi([5.0, 5.0], [1.0, 2.0]), [0.0, 1.0])
    close(vlhi([3.0, 1.0], [7.0, 7.0]), [0.0, 1.0])
    close(vlhi([4.0], [0.3]), [0.0])  # a group of one: both terms degenerate


@pytest.mark.parametrize(
    "fid, clip, match",
    [
        ([], [], "empty"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
        ([1.0, 2.0], [1.0], "one score per model"),
        ([1.0, float("nan")], [1.0, 2.0], "NaN"),
        ([1.0, 2.0], [float("inf"), 2.0], "NaN or Inf"),
        ("abc", [1.0], "tensor or a sequence"),
    ],
)
def test_vlhi_rejects_bad_input(fid, clip, match):
    with pytest.raises(ConfigError, match=match):
        vlhi(fid, clip)


# --------------------------------------------------------------------------------------------- LyCORIS App. D.4

A = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
B = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # normalised: (0.6, 0.8)


def test_cosine_centroid_variance_by_hand():
    # cross pairs: cos(e1, b) = 0.6, cos(e2, b) = 0.8 → mean 0.7
    close(average_cosine_similarity(A, B), 0.7)
    # centroids (0.5, 0.5) and (0.6, 0.8): (−0.1)² + (−0.3)² = 0.01 + 0.09 = 0.10
    close(squared_centroid_distance(A, B), 0.10)
    # each of e1, e2 is at squared distance 0.25 + 0.25 = 0.5 from (0.5, 0.5) → mean 0.5
    close(embedding_variance(A), 0.5)
    close(embedding_variance(B), 0.0)  # a single point has no spread
    # D.4 on these numbers: 1 − 0.7 = 0.3 = ½(0.10 + 0.5 + 0)
    close(1 - 0.7, 0.5 * (0.10 + 0.5 + 0.0))


def test_within_set_similarity_by_hand():
    # K = I₂: with self-pairs (1 + 0 + 0 + 1)/4 = 0.5; without, (0 + 0)/2 = 0
    close(average_cosine_similarity(A), 0.5)
    close(average_cosine_similarity(A, include_self=False), 0.0)
    # three vectors at 0°, 0°, 90°: off-diagonal cosines 1, 0, 0 (each twice) → 2/6; with self 5/9
    x = torch.tensor([[2.0, 0.0], [5.0, 0.0], [0.0, 1.0]])
    close(average_cosine_similarity(x, include_self=False), 2 / 6)
    close(average_cosine_similarity(x), (3 + 2) / 9)


@pytest.mark.parametrize("seed", range(5))
def test_lycoris_d4_identity_on_random_embeddings(seed):
    # 1 − S_C = ½(‖z̄¹ − z̄²‖² + Var¹ + Var²) with S_C the mean over all n₁·n₂ cross pairs and Var the
    # 1/n mean squared distance of normalised embeddings to their centroid.
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 16, generator=g) * torch.rand(7, 1, generator=g) * 5  # unnormalised, any scale
    b = torch.randn(11, 16, generator=g) + 0.5
    lhs = 1 - average_cosine_similarity(a, b)
    rhs = 0.5 * (squared_centroid_distance(a, b) + embedding_variance(a) + embedding_variance(b))
    close(lhs, rhs)
    # within one set (self-pairs included) the identity reads 1 − S_C(a) = Var(a)
    close(average_cosine_similarity(a), average_cosine_similarity(a, a))
    close(1 - average_cosine_similarity(a), embedding_variance(a))
    # and the i ≠ j mean is the self-inclusive one with the n ones on the diagonal taken out
    n = a.shape[0]
    close(average_cosine_similarity(a, include_self=False), (n * n * average_cosine_similarity(a) - n) / (n * (n - 1)))


def test_embedding_metrics_are_scale_invariant_and_symmetric():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, 5, generator=g, dtype=torch.float64)
    close(average_cosine_similarity(a, b), average_cosine_similarity(b, a))
    close(average_cosine_similarity(a * 7, b * 0.01), average_cosine_similarity(a, b))
    close(squared_centroid_distance(a, b), squared_centroid_distance(b, a))
    close(embedding_variance(a * torch.arange(1.0, 5.0, dtype=torch.float64).unsqueeze(1)), embedding_variance(a))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: average_cosine_similarity(torch.ones(3)), "unsqueeze"),
        (lambda: average_cosine_similarity(torch.ones(0, 3)), "empty"),
        (lambda: average_cosine_similarity(torch.ones(2, 0)), "empty"),
        (lambda: average_cosine_similarity(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), r"zero-norm rows \[1\]"),
        (lambda: average_cosine_similarity(torch.ones(2, 3), torch.ones(2, 4)), "embedding sizes differ"),
        (lambda: average_cosine_similarity(torch.ones(1, 3), include_self=False), "at least two"),
        (lambda: average_cosine_similarity(torch.ones(2, 3), torch.ones(2, 3), include_self=False), "only within"),
        (lambda: squared_centroid_distance(torch.ones(2, 3), torch.ones(2, 2)), "embedding sizes differ"),
        (lambda: embedding_variance(torch.tensor([[float("nan"), 1.0]])), "NaN"),
        (lambda: embedding_variance(torch.ones(2, 2, 2)), "2-D"),
    ],
)
def test_embedding_metrics_reject_bad_input(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# --------------------------------------------------------------------------------------------- Vendi


def test_vendi_by_hand():
    # x₁ = (1, 0), x₂ = (0.6, 0.8): cos = 0.6, K = [[1, .6], [.6, 1]], K/2 has eigenvalues 0.8 and 0.2
    # VS = exp(−(0.8 ln 0.8 + 0.2 ln 0.2)) = exp(0.17851 + 0.32189) = exp(0.50040) = 1.649385
    out = vendi_score(torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64))
    close(out, math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))))
    close(out, 1.6493848884661177, tol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_vendi_identical_vectors_count_once(n):
    v = torch.tensor([[0.3, -1.2, 2.0, 0.5]])
    close(vendi_score(v.repeat(n, 1) * torch.arange(1.0, n + 1).unsqueeze(1)), 1.0)


@pytest.mark.parametrize("n, d", [(1, 1), (3, 3), (4, 9)])
def test_vendi_orthogonal_vectors_count_n(n, d):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64))
    x = q[:, :n].T * torch.arange(1.0, n + 1, dtype=torch.float64).unsqueeze(1)  # scaled orthogonal rows
    close(vendi_score(x), float(n), tol=1e-10)


def test_vendi_duplicates_and_dimension_bound():
    # three orthogonal directions, each appearing twice: K/6 has eigenvalues 1/3 ×3 → VS = 3
    e = torch.eye(3)
    close(vendi_score(torch.cat([e, 2 * e])), 3.0, tol=1e-10)
    # n > d (uses the d×d matrix): never more than d distinct directions
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    vs = float(vendi_score(x))
    assert 1.0 <= vs <= 3.0 + 1e-9


def test_vendi_rejects_bad_input():
    with pytest.raises(ConfigError, match="empty"):
        vendi_score(torch.ones(0, 4))
    with pytest.raises(ConfigError, match="zero-norm"):
        vendi_score(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="2-D"):
        vendi_score(torch.ones(2, 2, 2))


# --------------------------------------------------------------------------------------------- Gram / style loss

# one sample, C=2, H=1, W=2: channel 0 = [1, 2], channel 1 = [3, 4]
FA = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
# channel 0 = [1, 0], channel 1 = [0, 1]
FB = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])


def test_gram_by_hand():
    # ψψᵀ = [[1+4, 3+8], [3+8, 9+16]] = [[5, 11], [11, 25]], c·h·w = 2·1·2 = 4
    close(gram_matrix(FA), [[[1.25, 2.75], [2.75, 6.25]]])
    # ψψᵀ = I, /4
    close(gram_matrix(FB), [[[0.25, 0.0], [0.0, 0.25]]])


def test_gram_is_per_sample_and_keeps_dtype():
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = gram_matrix(x)
    assert g.shape == (3, 4, 4) and g.dtype == torch.float64
    for i in range(3):
        psi = x[i].reshape(4, -1)
        close(g[i], psi @ psi.T / (4 * 5 * 6))
    # 1-D feature maps (N, C, L) work the same way; half precision is summed in float32
    close(gram_matrix(x[:, :, 0]), gram_matrix(x[:, :, :1]))
    assert gram_matrix(x.half()).dtype == torch.float32


def test_style_loss_by_hand():
    # layer 1: G(a) − G(b) = [[1.0, 2.75], [2.75, 6.0]] → 1 + 2·7.5625 + 36 = 52.125
    # layer 2: ones (1,1,2,2) → G = 4/4 = 1; twos → 16/4 = 4; (1 − 4)² = 9
    # total 52.125 + 9 = 61.125
    out = style_loss([FA, torch.ones(1, 1, 2, 2)], [FB, 2 * torch.ones(1, 1, 2, 2)])
    close(out, 61.125, tol=1e-6)
    close(style_loss(FA, FB), 52.125, tol=1e-6)  # a lone tensor is one layer


def test_style_loss_reductions_broadcast_and_spatial_sizes():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 4, 4, generator=g)]
    b = [torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 4, 4, generator=g)]
    per = style_loss(a, b, reduction="none")
    assert per.shape == (4,)
    for i in range(4):
        close(per[i], style_loss([t[i : i + 1] for t in a], [t[i : i + 1] for t in b]), tol=1e-5)
    close(style_loss(a, b), per.mean(), tol=1e-6)
    close(style_loss(a, b, reduction="sum"), per.sum(), tol=1e-6)
    # one reference image against a batch, at another resolution (Gram matrices are C×C)
    ref = [torch.randn(1, 3, 6, 5, generator=g), torch.randn(1, 5, 2, 3, generator=g)]
    per_ref = style_loss(a, ref, reduction="none")
    assert per_ref.shape == (4,)
    close(per_ref[2], style_loss([t[2:3] for t in a], ref), tol=1e-5)
    close(style_loss(a, a), 0.0)


def test_style_loss_is_differentiable():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    style_loss([a], [torch.randn(2, 3, 4, 4)]).backward()
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gram_matrix(torch.ones(2, 3)), r"\(N, C, H, W\)"),
        (lambda: gram_matrix(torch.ones(0, 3, 2, 2)), "empty"),
        (lambda: gram_matrix(torch.ones(1, 3, 2, 2, dtype=torch.int64)), "floating-point"),
        (lambda: style_loss([], []), "at least one layer"),
        (lambda: style_loss([FA, FA], [FB]), "2 layers"),
        (lambda: style_loss([FA], [torch.ones(1, 3, 1, 2)]), "channel counts differ"),
        (lambda: style_loss([torch.ones(2, 2, 2, 2)], [torch.ones(3, 2, 2, 2)]), "do not pair up"),
        (lambda: style_loss([torch.ones(2, 2, 2, 2), torch.ones(3, 2, 2, 2)], [torch.ones(1, 2, 2, 2)] * 2), "earlier layers"),
        (lambda: style_loss([FA], [FB], reduction="max"), "reduction"),
        (lambda: style_loss([FA], [torch.full_like(FB, float("inf"))]), r"layer 0: .*NaN or Inf"),
    ],
)
def test_style_metrics_reject_bad_input(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# --------------------------------------------------------------------------------------------- ΔW vs W


def diag(*values):
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def test_subspace_similarity_by_hand():
    # ΔW = diag(2, 1, 0): rank 2, U_Δ = [e1, e2]. W = diag(0, 5, 3): top-2 U_W = [e2, e3].
    # U_Δᵀ U_W = [[0, 0], [1, 0]] → ‖·‖_F² = 1 → φ = 1 / min(2, 2) = 0.5
    close(subspace_similarity(diag(2, 1, 0), diag(0, 5, 3)), 0.5)
    # ΔW = u uᵀ, u = (0.6, 0.8, 0): U_Δ = u. W = diag(5, 0, 3): top-1 U_W = e1 → (u·e1)² = 0.36
    u = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    close(subspace_similarity(torch.outer(u, u), diag(5, 0, 3)), 0.36)
    # same with j = 2: U_W = [e1, e3] → (0.6² + 0²) / min(1, 2) = 0.36
    close(subspace_similarity(torch.outer(u, u), diag(5, 0, 3), rank_weight=2), 0.36)


def test_subspace_similarity_side():
    # ΔW = e1 e2ᵀ: column space e1, row space e2. W = e1 e1ᵀ·4 + e3 e2ᵀ·3: top-1 column e1, row e1.
    d = torch.zeros(3, 3, dtype=torch.float64)
    d[0, 1] = 1.0
    w = torch.zeros(3, 3, dtype=torch.float64)
    w[0, 0], w[2, 1] = 4.0, 3.0
    close(subspace_similarity(d, w, side="left"), 1.0)  # e1 vs e1
    close(subspace_similarity(d, w, side="right"), 0.0)  # e2 vs e1
    close(subspace_similarity(d, w, rank_weight=2, side="right"), 1.0)  # e2 ∈ span(e1, e2) → 1 / min(1, 2)


def test_subspace_similarity_identities():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 8, generator=g)  # float32, numerical rank 3
    conv = torch.randn(6, 4, 3, 3, generator=g)
    for m in (low, conv, torch.randn(5, 9, generator=g)):
        close(subspace_similarity(m, m), 1.0, tol=1e-10)
        close(subspace_similarity(m, 2.5 * m, side="right"), 1.0, tol=1e-10)
    # orthogonal subspaces: ΔW lives on the first 3 coordinates, W on the last 4
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    d = q[:, :3] @ torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = q[:, 3:] @ torch.randn(4, 5, generator=g, dtype=torch.float64)
    close(subspace_similarity(d, w), 0.0, tol=1e-12)
    close(subspace_similarity(d, w, rank_weight=4), 0.0, tol=1e-12)
    # always in [0, 1]
    for i in (1, 2, 4):
        phi = float(subspace_similarity(conv, torch.randn(6, 4, 3, 3, generator=g), i, 5))
        assert 0.0 <= phi <= 1.0


def test_conv_weights_are_flattened():
    g = torch.Generator().manual_seed(1)
    d, w = torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, 3, 3, 3, generator=g)
    close(subspace_similarity(d, w, 2, 3), subspace_similarity(d.reshape(8, -1), w.reshape(8, -1), 2, 3))
    close(amplification_factor(d, w, 2), amplification_factor(d.reshape(8, -1), w.reshape(8, -1), 2))


def test_amplification_factor_by_hand():
    # ΔW = diag(0, 2): U = V = e2; Uᵀ W V = W[1, 1] = 3; ‖ΔW‖_F = 2 → 2/3
    close(amplification_factor(diag(0, 2), diag(4, 3)), 2 / 3)
    # ΔW = 5·e1 e2ᵀ: U = e1, V = e2; Uᵀ W V = W[0, 1] = 1 → 5/1
    d = torch.tensor([[0.0, 5.0], [0.0, 0.0]])
    close(amplification_factor(d, torch.tensor([[4.0, 1.0], [0.0, 3.0]])), 5.0)
    # W has no component along (e1, e2): Uᵀ W V = 0 → +inf
    assert math.isinf(float(amplification_factor(d, diag(4, 3))))
    # rank = 2 with ΔW = diag(2, 1): U = V = I → ‖W‖_F = 5 for W = [[3, 0], [4, 0]]; ‖ΔW‖_F = √5
    close(amplification_factor(diag(2, 1), torch.tensor([[3.0, 0.0], [4.0, 0.0]])), math.sqrt(5) / 5)


def test_amplification_factor_of_scaled_weight():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_r = (u[:, :5] * s[:5]) @ vh[:5]  # W's best rank-5 part
    for c in (3.0, -0.5):
        # ΔW = c·W_r: U, V are W's top-5 singular vectors, Uᵀ W V = diag(σ₁…σ₅) → |c|·‖Σ₅‖ / ‖Σ₅‖ = |c|
        close(amplification_factor(c * w_r, w), abs(c), tol=1e-10)
        # a genuinely rank-5 W scaled: ΔW = c·W
        close(amplification_factor(c * w_r, w_r), abs(c), tol=1e-10)


def test_default_rank_ignores_float32_rounding():
    # a float32 LoRA product is rank 4 up to float32 noise; the default rank must see 4, not 16
    g = torch.Generator().manual_seed(3)
    d = torch.randn(16, 4, generator=g) @ torch.randn(4, 16 * 9, generator=g)
    w = torch.randn(16, 16 * 9, generator=g)
    close(amplification_factor(d, w), amplification_factor(d, w, rank=4), tol=1e-12)
    close(subspace_similarity(d, w), subspace_similarity(d, w, 4, 4), tol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: subspace_similarity(torch.ones(3, 4), torch.ones(4, 3)), "same shape"),
        (lambda: subspace_similarity(torch.zeros(3, 3), torch.eye(3)), "delta is zero"),
        (lambda: subspace_similarity(torch.eye(3), torch.zeros(3, 3)), "weight is zero"),
        (lambda: subspace_similarity(torch.zeros(3, 3), torch.eye(3), 2), "delta is zero"),
        (lambda: subspace_similarity(torch.eye(3), torch.zeros(3, 3), 1, 2), "weight is zero"),
        (lambda: amplification_factor(torch.zeros(2, 2), torch.eye(2), rank=1), "delta is zero"),
        (lambda: subspace_similarity(torch.eye(3), torch.eye(3), 4), r"rank_delta must be in \[1, 3\]"),
        (lambda: subspace_similarity(torch.eye(3), torch.eye(3), None, 0), "rank_weight"),
        (lambda: subspace_similarity(torch.eye(3), torch.eye(3), 1.5), "must be an int"),
        (lambda: subspace_similarity(torch.eye(3), torch.eye(3), side="up"), "side"),
        (lambda: subspace_similarity(torch.ones(3), torch.ones(3)), "≥ 2 dims"),
        (lambda: subspace_similarity(torch.ones(0, 3), torch.ones(0, 3)), "empty"),
        (lambda: subspace_similarity([[1.0]], [[1.0]]), "must be a tensor"),
        (lambda: amplification_factor(torch.zeros(2, 2), torch.eye(2)), "delta is zero"),
        (lambda: amplification_factor(torch.eye(2), torch.eye(2), rank=3), r"rank must be in \[1, 2\]"),
        (lambda: amplification_factor(torch.eye(2), torch.eye(3)), "same shape"),
        (lambda: amplification_factor(torch.eye(2), torch.full((2, 2), float("nan"))), "NaN"),
    ],
)
def test_weight_metrics_reject_bad_input(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        vendi_score(torch.ones(3))
