"""``sketch``: a data-independent random projection per site (GALE-like randomized sketching)."""

from __future__ import annotations

import zlib

import torch

from laser.methods.projection import FixedBasisMethod


def sketch_basis(dim: int, rank: int, seed: int, site: str) -> torch.Tensor:
    """A (dim, rank) fp32 orthonormal basis: QR of a Gaussian matrix seeded by ``seed`` and ``site``.

    The seed is a CRC32 of both, so the basis is the same in every process and run (Python's ``hash``
    of a string is salted per process) and differs between sites.
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"rank={rank} is invalid for a sketch of width {dim}: must be in [1, {dim}]")
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{site}".encode()))
    gaussian = torch.randn(dim, rank, generator=generator)  # (D, k)
    basis, _ = torch.linalg.qr(gaussian)
    return basis


class SketchMethod(FixedBasisMethod):
    """Codes against a seeded random orthonormal basis per site, never updated and blind to the data.

    >>> method = SketchMethod(model, ProjectionConfig(rank=64, seed=0))   # doctest: +SKIP
    >>> with method:
    ...     loss = model(x).square().mean()
    >>> loss.backward(); method.step()
    """

    name = "sketch"

    def basis(self, x: torch.Tensor, site: str, rank: int) -> torch.Tensor:
        if site not in self.bases:
            self.bases[site] = sketch_basis(x.shape[1], rank, self.config.seed, site).to(x.device)
        return self.bases[site]
