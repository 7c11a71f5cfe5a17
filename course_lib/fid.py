"""Distribution metrics: FID, KID and diversity, on the evaluator's features.

Prompt adherence (``evaluator.prompt_adherence``) asks whether each image obeys its caption. It cannot see
whether the images, *as a set*, look like the world's: a generator that draws the same perfect red circle
for every "red circle" prompt scores full adherence and has lost all variety. The field measures that with
distances between the distribution of generated images and the distribution of real ones, computed on
the features of a network trained on real images (Inception-v3 for photographs; here the course's
evaluator, ``Evaluator.features``: its stage 1 pooled 8 x 8 bottleneck, D = 64 numbers per image).

- ``fid``: the Frechet distance between two Gaussians fitted to the two feature sets (Heusel et al.
  2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium"):
  ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. 0 for identical statistics; biased upwards
  for small sets, so compare FIDs only at the same set size, and print ``real_floor`` beside each one.
- ``kid``: the squared maximum mean discrepancy with the polynomial kernel ``(x.y / D + 1)^3``, unbiased,
  averaged over random subsets (Binkowski et al. 2018, "Demystifying MMD GANs"). Its expectation is 0
  when both sets come from one distribution, whatever their size: better than FID for small sets.
- ``diversity``: for images drawn from *one* prompt, how different they are from each other.

This is a module of its own, beside ``metrics.py``: it needs only torch and the evaluator (no pipeline,
VAE or CLIP), so a lesson, a benchmark or a test can import it alone, and its reference statistics live in
their own file (``weights/fid_reference.safetensors``).

Notation::

    N, M   numbers of images in the two sets      D   feature dimension
    mu     (D,) feature mean                      C   (D, D) feature covariance (unbiased, N - 1)
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import data
from .evaluator import Evaluator, entropy_bits, match_prompt, parse_captions

REFERENCE_SEED = 0  # held-out scenes of this seed give the reference statistics
KID_SUBSETS = 100  # as in Binkowski et al. 2018 and torch-fidelity
KID_SUBSET_SIZE = 1000


def _features(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) tensor of features (Evaluator.features(images)), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} holds {x.shape[0]} feature vectors; FID and KID need at least 2 per set")
    return x.detach().cpu().double()


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (D,), C (D, D)) of ``features`` (N, D) in float64: the Gaussian FID fits to a set."""
    f = _features(features, "features")
    mu = f.mean(0)
    centred = f - mu  # (N, D)
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """The Frechet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b), squared, as FID reports it.

    tr((C_a C_b)^(1/2)) is computed without a non-symmetric matrix square root: with S = C_a^(1/2) (symmetric,
    from an eigendecomposition), C_a C_b is similar to S C_b S, which is symmetric positive semi-definite, so
    the trace is the sum of the square roots of its eigenvalues (float64; tiny negative round-off -> 0).
    ``scipy.linalg.sqrtm`` on C_a C_b, what the reference implementation uses, gives the same number.
    """
    mu_a, mu_b, cov_a, cov_b = (t.detach().cpu().double() for t in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.numel(), mu_a.numel()):
        raise ValueError(f"statistics do not fit together: mu {tuple(mu_a.shape)}, {tuple(mu_b.shape)}; "
                         f"cov {tuple(cov_a.shape)}, {tuple(cov_b.shape)}")
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T  # (D, D)
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D) (Heusel et al. 2017)."""
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def fid_to_reference(features: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> float:
    """FID of ``features`` against saved reference statistics (``load_reference``)."""
    return frechet_distance(*statistics(features), *reference)


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD between samples ``x`` (m, D) and ``y`` (n, D) with k(a, b) = (a.b / D + 1)^3:
    the within-set kernel means leave out the diagonal (Binkowski et al. 2018, eq. 3 of Gretton et al. 2012)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = x.shape[0], y.shape[0]
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(features_a: torch.Tensor, features_b: torch.Tensor, n_subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased polynomial-kernel MMD^2 on ``n_subsets``
    random subsets of ``min(subset_size, N, M)`` features from each set (drawn without replacement within a
    subset). Returns (mean, std) over the subsets. Around 0 (possibly negative) for one distribution.
    When neither set is larger than ``subset_size``, every subset is the whole set: the std is then 0 and
    says nothing; pass a smaller ``subset_size`` to see the spread."""
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be at least 1, got {n_subsets}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    m = min(subset_size, a.shape[0], b.shape[0])
    values = torch.tensor([polynomial_mmd2(a[torch.randperm(a.shape[0], generator=g)[:m]],
                                           b[torch.randperm(b.shape[0], generator=g)[:m]]) for _ in range(n_subsets)])
    return float(values.mean()), float(values.std()) if n_subsets > 1 else 0.0


# --- Reference statistics of real scenes, and the floor that real data itself reaches. ---------------------

def reference_scenes(n: int, seed: int = REFERENCE_SEED) -> data.Scenes:
    """The held-out real scenes the generator's images are compared with: the generator's world
    (``concepts="train"``: no reserved shape or colour), held-out split."""
    return data.generate(n, seed=seed, split="heldout", concepts="train")


def reference_statistics(evaluator: Evaluator, n: int = 10_000, seed: int = REFERENCE_SEED) -> dict:
    """mu and cov of the evaluator's features of ``n`` held-out real scenes, with what made them."""
    mu, cov = statistics(evaluator.features(reference_scenes(n, seed).images_float()))
    return {"mu": mu, "cov": cov, "n": n, "seed": seed}


def save_reference(stats: dict, path: str | Path) -> Path:
    """Write ``reference_statistics`` to a safetensors file (tensors ``mu``, ``cov``; n and seed as metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": stats["mu"].contiguous(), "cov": stats["cov"].contiguous()}, str(path),
              metadata={"n": str(stats["n"]), "seed": str(stats["seed"]),
                        "what": "evaluator features of held-out real scenes (concepts='train')"})
    return path


def load_reference(path: str | Path) -> dict:
    """Read a file written by ``save_reference``: {"mu", "cov", "n", "seed"}."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no reference statistics at {path}: write them with "
                                "save_reference(reference_statistics(load_evaluator()), path)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        mu, cov = f.get_tensor("mu"), f.get_tensor("cov")
    if cov.shape != (mu.numel(), mu.numel()):
        raise ValueError(f"{path} holds mu {tuple(mu.shape)} and cov {tuple(cov.shape)}, which do not fit together")
    return {"mu": mu, "cov": cov, "n": int(meta.get("n", -1)), "seed": int(meta.get("seed", -1))}


def real_floor(evaluator: Evaluator, n: int, seed: int = REFERENCE_SEED + 1, n_subsets: int = KID_SUBSETS) -> dict:
    """FID and KID between two disjoint sets of ``n`` real held-out scenes each: the best a generator can
    score at that set size (a perfect generator is another sample of real scenes). Print it beside every
    figure: FID of ``n`` generated images means little without it."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    feats = evaluator.features(reference_scenes(2 * n, seed).images_float())
    a, b = feats[:n], feats[n:]
    mean, std = kid(a, b, n_subsets=n_subsets)
    return {"fid": fid(a, b), "kid_mean": mean, "kid_std": std, "n": n}


# --- Diversity of the images of one prompt. ---------------------------------------------------------------

@torch.no_grad()
def diversity(images: torch.Tensor, evaluator: Evaluator, prompt: str | None = None) -> dict:
    """How varied ``images`` (B, 3, 64, 64), all drawn from ONE prompt, are.

    ``feature_distance``: the mean Euclidean distance between the evaluator features of two different
    images of the set. 0 means every image is the same to the evaluator; compare it across settings (guidance
    scales, samplers) and with the same number for real scenes that fit the prompt.

    With ``prompt``: ``unsaid``, for each attribute the prompt leaves unsaid on each of its objects
    (and the background when it names none), the entropy in bits of what the evaluator reads on the
    matching object across the images, and ``normalised`` = bits / log2(number of values): 1.0 when the
    images spread evenly over every value (real scenes do, for position: 9 cells), 0 when all agree. Keys are
    ``"object 1 position"`` etc.; an image where the object is not found adds nothing to that entry.
    """
    if images.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 images of one prompt, got {images.shape[0]}")
    f = evaluator.features(images).double()  # (B, D)
    b = f.shape[0]
    dist = torch.cdist(f, f)  # (B, B)
    out = {"feature_distance": float(dist.sum() / (b * (b - 1))), "n": b}
    if prompt is None:
        return out
    want = parse_captions([prompt])[0]
    pred = evaluator.predict(images)
    read = pred["objects"]
    seen: dict[str, list] = {}
    for i, objs in enumerate(read):
        pick, _ = match_prompt(want["objects"], objs)
        for k, (w, p) in enumerate(zip(want["objects"], pick)):
            for name in ("colour", "size", "position", "fill"):
                if name not in w and p is not None:
                    seen.setdefault(f"object {k + 1} {name}", []).append(objs[p][name])
        if want["background"] is None:
            seen.setdefault("background", []).append(int(pred["background"][i]))
    sizes = {**{name: len(v) for name, v in data.ATTRIBUTES.items()}, "background": len(data.BACKGROUNDS)}
    out["unsaid"] = {}
    for key, values in seen.items():
        bits, norm = entropy_bits(values, sizes[key.split(" ")[-1]])
        out["unsaid"][key] = {"bits": bits, "normalised": norm, "n": len(values)}
    return out



def main(argv: list[str] | None = None) -> None:
    """``python -m course_lib.fid --weights DIR --out FILE [--n N]``: write the reference statistics of the
    evaluator in ``DIR`` (default: weights/) and print the real floor at a few set sizes."""
    import argparse

    from .evaluator import load_evaluator

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--weights", default=None, help="folder holding evaluator.safetensors (default: weights/)")
    parser.add_argument("--out", required=True, help="where to write the statistics (.safetensors)")
    parser.add_argument("--n", type=int, default=10_000, help="held-out real scenes to use")
    args = parser.parse_args(argv)
    evaluator = load_evaluator(args.weights)
    print("wrote", save_reference(reference_statistics(evaluator, n=args.n), args.out))
    for n in (256, 1000):
        print(f"real floor at n={n}:", real_floor(evaluator, n))


if __name__ == "__main__":
    main()
