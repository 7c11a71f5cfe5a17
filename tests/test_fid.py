"""FID, KID and diversity: against reference implementations (numpy / scipy), and what they must do."""

import numpy as np
import pytest
import scipy.linalg
import torch

from course_lib import data
from course_lib.evaluator import Evaluator, EvaluatorConfig
from course_lib.fid import (diversity, fid, fid_to_reference, frechet_distance, kid, load_reference, polynomial_mmd2,
                            real_floor, reference_statistics, save_reference, statistics)


def gaussian(n, d=16, shift=0.0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d**0.5 + torch.eye(d)  # one shared covariance
    return (torch.randn(n, d, generator=g) @ mix) * scale + shift


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The formula as pytorch-fid writes it (scipy.linalg.sqrtm of the covariance product)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, written out term by term."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.sum() / (m * n))


def test_fid_matches_scipy_reference():
    for seed in range(3):
        a, b = gaussian(300, seed=seed), gaussian(200, seed=seed + 10, shift=0.3, scale=1.2)
        ours, ref = fid(a, b), scipy_fid(a.double().numpy(), b.double().numpy())
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_fid_is_zero_with_itself_and_grows_with_a_shift():
    a = gaussian(500)
    assert abs(fid(a, a)) < 1e-6
    shifts = [0.0, 0.1, 0.3, 1.0]
    values = [fid(a, a + s) for s in shifts]
    assert all(x < y for x, y in zip(values, values[1:]))
    # A pure shift moves only the mean term: |s|^2 per dimension.
    assert values[-1] == pytest.approx(16 * 1.0**2, rel=1e-6)
    mu, cov = statistics(a)
    assert fid_to_reference(a + 1.0, (mu, cov)) == pytest.approx(values[-1], rel=1e-9)


def test_kid_matches_numpy_and_is_unbiased():
    x, y = gaussian(50, seed=1), gaussian(40, seed=2, shift=0.5)
    assert polynomial_mmd2(x.double(), y.double()) == pytest.approx(numpy_mmd2(x.double().numpy(), y.double().numpy()),
                                                                    rel=1e-6, abs=1e-9)
    # Two samples of one distribution: the mean over subsets is within a few standard errors of 0, and far
    # below the KID of a shifted sample, even for small subsets (where FID is strongly biased upwards).
    same = [kid(gaussian(200, seed=s), gaussian(200, seed=s + 100), n_subsets=50, subset_size=50) for s in range(4)]
    shifted = kid(gaussian(200, seed=0), gaussian(200, seed=100, shift=0.5), n_subsets=50, subset_size=50)
    mean_of_means = sum(m for m, _ in same) / len(same)
    assert abs(mean_of_means) < 0.1 * shifted[0]
    assert shifted[0] > 5 * shifted[1] / 50**0.5
    assert fid(gaussian(50, seed=1), gaussian(50, seed=2)) > 1.0  # the small-sample bias KID avoids


def test_bad_features_get_clear_errors():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid(torch.zeros(10), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="at least 2"):
        kid(torch.zeros(1, 3), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="dimensions"):
        kid(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="do not fit"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_reference_statistics_round_trip_and_real_floor(tmp_path):
    ev = Evaluator(EvaluatorConfig(channels=(8, 8, 16), hidden=8)).eval()  # features need no training to be features
    stats = reference_statistics(ev, n=64)
    assert stats["mu"].shape == (16,) and stats["cov"].shape == (16, 16) and stats["mu"].dtype == torch.float64
    path = save_reference(stats, tmp_path / "fid_reference.safetensors")
    back = load_reference(path)
    assert torch.equal(back["mu"], stats["mu"]) and torch.equal(back["cov"], stats["cov"]) and back["n"] == 64
    with pytest.raises(FileNotFoundError, match="save_reference"):
        load_reference(tmp_path / "missing.safetensors")
    floor = real_floor(ev, n=64, n_subsets=10)
    assert floor["fid"] > 0 and floor["n"] == 64 and np.isfinite(floor["kid_mean"])
    # Real scenes against real scenes beat real scenes against a single repeated scene.
    repeated = ev.features(data.generate(1, seed=5, split="heldout").images_float().repeat(64, 1, 1, 1))
    real = ev.features(data.generate(64, seed=6, split="heldout").images_float())
    assert fid(real, repeated + 1e-3 * torch.randn(repeated.shape, generator=torch.Generator().manual_seed(0))) > floor["fid"]


def test_diversity_is_zero_for_copies_and_counts_unsaid_attributes():
    ev = Evaluator(EvaluatorConfig(channels=(8, 8, 16), hidden=8)).eval()
    scenes = data.generate(16, seed=2, split="heldout")
    copies = scenes.images_float()[:1].repeat(8, 1, 1, 1)
    same = diversity(copies, ev, prompt="a red circle")
    assert same["feature_distance"] == pytest.approx(0.0, abs=1e-5)
    for entry in same["unsaid"].values():  # whatever an untrained evaluator reads, it reads the same each time
        assert entry["bits"] == pytest.approx(0.0, abs=1e-9)
    varied = diversity(scenes.images_float(), ev)
    assert varied["feature_distance"] > 0 and "unsaid" not in varied
    with pytest.raises(ValueError, match="at least 2"):
        diversity(copies[:1], ev)
    with pytest.raises(ValueError, match="caption 0"):
        diversity(copies, ev, prompt="nothing to see")
