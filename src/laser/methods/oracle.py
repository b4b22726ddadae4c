"""``oracle``: a LoRAct-like top-rank SVD of every saved tensor, the bound on any fixed-rank projection."""

from __future__ import annotations

import torch

from laser.methods.projection import FixedBasisMethod
from laser.subspace import top_k_basis


class OracleMethod(FixedBasisMethod):
    """Codes of each saved tensor against its own top-``rank`` SVD basis, recomputed for every tensor.

    Nothing is shared across tensors or steps, so every record stores (and is charged for) its own basis:
    the best reconstruction any rank-``rank`` projection can give (Eckart-Young), at the price of one SVD
    (exact when small, randomized with the method's generator otherwise) and one basis per tensor.

    >>> method = OracleMethod(model, ProjectionConfig(rank=64))   # doctest: +SKIP
    >>> with method:
    ...     loss = model(x).square().mean()
    >>> loss.backward(); method.step()
    """

    name = "oracle"
    per_tensor_basis = True

    def basis(self, x: torch.Tensor, site: str, rank: int) -> torch.Tensor:
        return top_k_basis(x, rank, self.generator)
