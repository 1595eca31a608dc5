"""FID, Inception Score and improved precision/recall from extractor features, plus a torchmetrics Metric.

The plain functions follow OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``):
  * FID: Fréchet distance between Gaussians fitted to 2048-d pool features (float64 statistics).
  * Inception Score: softmax of the logits, cut into ``num_splits`` consecutive chunks *in the given order*;
    exp(mean KL(p(y|x) || p(y))) per chunk, then mean and std over chunks. Class-sorted samples give a much
    lower score, so shuffle samples first (``GenerativeMetrics`` does, with a fixed seed).
  * Precision/recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its points
    with radius = distance to the k-th nearest neighbour (k=3; the point itself counts as the 0-th).
    Precision = share of fakes inside the real manifold, recall = share of reals inside the fake manifold.
    Distances are computed in row/column blocks so 50k x 50k never sits in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from varlib.images import check_uint8_images


def _as_float64_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def feature_statistics(features_ND: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D,D) of features (N,D), in float64. Needs N >= 2."""
    features_ND = _as_float64_numpy(features_ND)
    if features_ND.ndim != 2 or features_ND.shape[0] < 2:
        raise ValueError(f"expected features of shape (N>=2, D), got {features_ND.shape}")
    return features_ND.mean(axis=0), np.cov(features_ND, rowvar=False)


def _symmetric_psd_sqrt(matrix_DD: np.ndarray) -> np.ndarray:
    eigenvalues_D, eigenvectors_DD = np.linalg.eigh((matrix_DD + matrix_DD.T) / 2)
    return (eigenvectors_DD * np.sqrt(np.clip(eigenvalues_D, 0.0, None))) @ eigenvectors_DD.T


def frechet_distance(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """Fréchet distance ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two Gaussians.

    tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b). Unlike a general ``sqrtm`` this never produces
    complex parts, and tiny negative eigenvalues from round-off are clipped to zero.

    Args: means (D,), covariances (D,D). Returns: the distance as a float.
    """
    mu_a, mu_b = np.atleast_1d(_as_float64_numpy(mu_a)), np.atleast_1d(_as_float64_numpy(mu_b))
    sigma_a, sigma_b = np.atleast_2d(_as_float64_numpy(sigma_a)), np.atleast_2d(_as_float64_numpy(sigma_b))
    dim = mu_a.shape[0]
    if mu_b.shape != (dim,) or sigma_a.shape != (dim, dim) or sigma_b.shape != (dim, dim):
        raise ValueError(
            f"expected means (D,) and covariances (D,D) with one D, got mu_a {mu_a.shape}, mu_b {mu_b.shape}, "
            f"sigma_a {sigma_a.shape}, sigma_b {sigma_b.shape}"
        )
    sqrt_sigma_a = _symmetric_psd_sqrt(sigma_a)
    product_eigenvalues = np.linalg.eigvalsh(sqrt_sigma_a @ sigma_b @ sqrt_sigma_a)
    trace_sqrt_product = np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum()
    mean_term = np.sum((mu_a - mu_b) ** 2)
    return float(mean_term + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product)


def fid_from_features(real_ND: np.ndarray | torch.Tensor, fake_MD: np.ndarray | torch.Tensor) -> float:
    """FID between real features (N,D) and generated features (M,D)."""
    return frechet_distance(*feature_statistics(real_ND), *feature_statistics(fake_MD))


def inception_score(logits_NK: np.ndarray | torch.Tensor, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score of class logits (N,K): (mean, std) over ``num_splits`` consecutive chunks.

    Chunks are taken in the given order (sizes differ by at most one when N is not divisible), so shuffle
    class-sorted samples first. The std is the population std over chunks.
    """
    logits_NK = torch.as_tensor(logits_NK).double()
    if logits_NK.ndim != 2:
        raise ValueError(f"expected logits of shape (N, K), got {tuple(logits_NK.shape)}")
    if num_splits < 1 or logits_NK.shape[0] < num_splits:
        raise ValueError(f"need at least num_splits={num_splits} >= 1 samples, got {logits_NK.shape[0]}")
    scores = []
    for chunk_log_p in torch.tensor_split(torch.log_softmax(logits_NK, dim=1), num_splits):
        log_marginal_K = torch.logsumexp(chunk_log_p, dim=0) - np.log(chunk_log_p.shape[0])
        kl_N = (chunk_log_p.exp() * (chunk_log_p - log_marginal_K)).sum(dim=1)
        scores.append(kl_N.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def pairwise_squared_distances(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N,M) via ||a||^2 - 2 a.b + ||b||^2, clamped at 0."""
    distances_NM = (a_ND * a_ND).sum(1, keepdim=True) - 2.0 * a_ND @ b_MD.T + (b_MD * b_MD).sum(1)[None]
    return distances_NM.clamp_min_(0.0)


def knn_radii(features_ND: torch.Tensor, k: int = 3, batch_size: int = 4096) -> torch.Tensor:
    """Squared distance (N,) from each point to its k-th nearest neighbour, the point itself being the 0-th."""
    num_points = features_ND.shape[0]
    if num_points < k + 1:
        raise ValueError(f"k={k} nearest neighbours need at least {k + 1} points, got {num_points}")
    radii = []
    for rows in features_ND.split(batch_size):
        # Keep the k+1 smallest per column block, then the k+1 smallest of those.
        candidates = [
            pairwise_squared_distances(rows, columns).topk(min(k + 1, columns.shape[0]), dim=1, largest=False)[0]
            for columns in features_ND.split(batch_size)
        ]
        smallest_RK = torch.cat(candidates, dim=1).topk(k + 1, dim=1, largest=False)[0]
        radii.append(smallest_RK[:, k])
    return torch.cat(radii)


def inside_manifold(
    query_QD: torch.Tensor, reference_ND: torch.Tensor, radii_N: torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    """(Q,) bool: is each query within radius of at least one reference point (squared distances, <=)."""
    inside = []
    for rows in query_QD.split(batch_size):
        row_inside = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for columns, column_radii in zip(reference_ND.split(batch_size), radii_N.split(batch_size)):
            row_inside |= (pairwise_squared_distances(rows, columns) <= column_radii[None]).any(dim=1)
        inside.append(row_inside)
    return torch.cat(inside)


def precision_recall(
    real_ND: torch.Tensor | np.ndarray, fake_MD: torch.Tensor | np.ndarray, k: int = 3, batch_size: int = 4096
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fakes (M,D) against reals (N,D).

    Distances are computed in float32 in blocks of ``batch_size`` rows and columns.
    """
    real_ND = torch.as_tensor(real_ND).float()
    fake_MD = torch.as_tensor(fake_MD, device=real_ND.device).float()
    if real_ND.ndim != 2 or fake_MD.ndim != 2 or real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(
            f"expected real (N,D) and fake (M,D) features, got {tuple(real_ND.shape)} and {tuple(fake_MD.shape)}"
        )
    real_radii_N = knn_radii(real_ND, k, batch_size)
    fake_radii_M = knn_radii(fake_MD, k, batch_size)
    precision = inside_manifold(fake_MD, real_ND, real_radii_N, batch_size).double().mean().item()
    recall = inside_manifold(real_ND, fake_MD, fake_radii_M, batch_size).double().mean().item()
    return precision, recall


class GenerativeMetrics(Metric):
    """Accumulates extractor outputs of real and generated images; ``compute()`` gives FID, IS, precision, recall.

    Args:
        extractor: any module following ``varlib.evaluation.inception.FeatureExtractor``
            (uint8 (B,3,H,W) -> (features (B,D), logits (B,K))), e.g. ``build_inception_extractor()``.
            It is kept in eval mode.
        num_is_splits: chunks for the Inception Score (10, as ADM for 50k samples).
        pr_k: neighbourhood size for precision/recall radii (3, as ADM).
        is_shuffle_seed: generated logits are permuted with this seed before the IS split, so a class-sorted
            generation order does not deflate IS; None keeps the update order.
        pr_batch_size: block size of the pairwise-distance computation.
    ``update(images_uint8_BCHW, real)`` adds a batch; ``compute()`` returns
    ``{"fid", "is_mean", "is_std", "precision", "recall"}`` as floats. States are gathered across processes.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        extractor: nn.Module,
        num_is_splits: int = 10,
        pr_k: int = 3,
        is_shuffle_seed: int | None = 0,
        pr_batch_size: int = 4096,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.extractor = extractor.eval()
        self.num_is_splits = num_is_splits
        self.pr_k = pr_k
        self.is_shuffle_seed = is_shuffle_seed
        self.pr_batch_size = pr_batch_size
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_logits", default=[], dist_reduce_fx="cat")

    def train(self, mode: bool = True) -> GenerativeMetrics:
        """Switching the metric to train mode leaves the extractor in eval mode (its BatchNorm must not update)."""
        super().train(mode)
        self.extractor.eval()
        return self

    def update(self, images_uint8_BCHW: torch.Tensor, real: bool) -> None:
        """Add a batch of uint8 images (B,3,H,W): real images if ``real`` else generated ones."""
        check_uint8_images(images_uint8_BCHW)
        with torch.no_grad():
            output = self.extractor(images_uint8_BCHW)
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise ValueError(
                f"the extractor must return (features (B,D), logits (B,K)), got {type(output).__name__}"
            )
        features_BD, logits_BK = output
        batch = images_uint8_BCHW.shape[0]
        if features_BD.ndim != 2 or logits_BK.ndim != 2 or features_BD.shape[0] != batch or logits_BK.shape[0] != batch:
            raise ValueError(
                f"the extractor must return (B,D) features and (B,K) logits for B={batch}, "
                f"got {tuple(features_BD.shape)} and {tuple(logits_BK.shape)}"
            )
        if real:
            self.real_features.append(features_BD.float())
        else:
            self.fake_features.append(features_BD.float())
            self.fake_logits.append(logits_BK.float())

    def compute(self) -> dict[str, float]:
        """FID, IS (mean, std over splits), precision and recall of everything added since the last reset.

        Raises ValueError when too few images were added (FID needs 2 per side, IS ``num_is_splits`` fakes,
        precision/recall ``pr_k + 1`` per side).
        """
        if not self.real_features or not self.fake_features:
            raise ValueError(
                f"need both real and generated images, got {len(self.real_features)} real and "
                f"{len(self.fake_features)} generated batches"
            )
        real_ND = dim_zero_cat(self.real_features)
        fake_MD = dim_zero_cat(self.fake_features)
        fake_logits_MK = dim_zero_cat(self.fake_logits)
        if self.is_shuffle_seed is not None:
            generator = torch.Generator().manual_seed(self.is_shuffle_seed)
            permutation = torch.randperm(fake_logits_MK.shape[0], generator=generator)
            fake_logits_MK = fake_logits_MK[permutation.to(fake_logits_MK.device)]
        is_mean, is_std = inception_score(fake_logits_MK, self.num_is_splits)
        precision, recall = precision_recall(real_ND, fake_MD, self.pr_k, self.pr_batch_size)
        return {
            "fid": fid_from_features(real_ND, fake_MD),
            "is_mean": is_mean,
            "is_std": is_std,
            "precision": precision,
            "recall": recall,
        }
