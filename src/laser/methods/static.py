"""``static``: a LANCE-like fixed basis per site, the exact top-rank SVD of the first activation it encodes."""

from __future__ import annotations

import torch

from laser.methods.projection import FixedBasisMethod
from laser.subspace import top_k_basis


class StaticMethod(FixedBasisMethod):
    """Codes against a per-site basis fixed once, from the first tensor the site encodes, never updated.

    The basis is the top-``rank`` SVD of that tensor (``subspace.top_k_basis``): optimal for it, and stale
    for whatever the site produces once training has moved the activation subspace.

    >>> method = StaticMethod(model, ProjectionConfig(rank=64))   # doctest: +SKIP
    >>> with method:
    ...     loss = model(x).square().mean()
    >>> loss.backward(); method.step()
    """

    name = "static"

    def basis(self, x: torch.Tensor, site: str, rank: int) -> torch.Tensor:
        if site not in self.bases:
            self.bases[site] = top_k_basis(x, rank, self.generator)
        return self.bases[site]
