import math

import torch


def simplex_etf(num_classes, dim):
    """K x d classifier [E, 0]: E = sqrt(K/(K-1)) (I_K - 11^T/K) in the first K columns.

    Its rows have unit norm, so (1/K)||W||_F^2 = 1, and W W^T = K/(K-1) (I - 11^T/K).
    """
    K = num_classes
    if K < 2 or dim < K:
        raise ValueError(f"a simplex ETF of {K} classes needs feature dimension >= {K}, got {dim}")
    E = math.sqrt(K / (K - 1)) * (torch.eye(K) - torch.full((K, K), 1.0 / K))  # (K, K)
    W = torch.zeros(K, dim)
    W[:, :K] = E
    return W
