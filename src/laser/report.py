"""What a method stored during one training step: per-site rows and totals, bytes by unique storage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SiteReport:
    """One site (module path + width) during one step.

    Attributes:
        name: site name, ``"<module path>:<dim>"``.
        dim: width ``D`` of the site (last dimension of the saved storage).
        rank: rank of the basis the step's codes were made with (``dim`` where nothing is projected).
        fidelity: cosine between the step's activations at this site and what backward gets back from what
            is stored (after int8 rounding), ``||Z|| / ||X||`` for float codes; 1.0 where stored raw.
        raw_bytes: bytes the autograd graph would have kept without the method (unique storages).
        stored_bytes: bytes actually kept: codes, scales, the site's basis, raw fallbacks and the method's
            own state for the site during the step (``state_bytes``).
        tensors: unique storages saved at this site during the step.
        expansions: rank expansions so far (cumulative).
        resets: hard resets by exact SVD so far (cumulative).
        fallbacks: storages kept raw during this step, for any reason.
        reasons: why they were kept raw: :class:`laser.hooks.Reason` -> storages (sums to ``fallbacks``).
        state_bytes: the method's own memory for this site during the step (its tracked basis where the
            codes use a copy, the ``X^T Z`` accumulator, the row sample), part of ``stored_bytes``.
        factored: saved views that are a linear layer's coded input, whose weight gradient is made from
            the codes (``(dY^T Z) Q^T``, no reconstruction) during the step.
    """

    name: str
    dim: int
    rank: int
    fidelity: float
    raw_bytes: int = 0
    stored_bytes: int = 0
    tensors: int = 0
    expansions: int = 0
    resets: int = 0
    fallbacks: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    state_bytes: int = 0
    factored: int = 0

    @property
    def savings(self) -> float:
        """Fraction of this site's raw bytes saved (negative when the method costs memory)."""
        return 1.0 - self.stored_bytes / self.raw_bytes if self.raw_bytes else 0.0


@dataclass
class Report:
    """Per-site rows and totals of one step; ``str(report)`` is a readable table.

    ``recomputed`` lists the sites of tensors saved by :func:`laser.checkpoint`'s reruns in backward: each
    is held only while its checkpointed call's backward runs, so they are not part of the totals.
    """

    sites: list[SiteReport] = field(default_factory=list)
    method: str = ""
    step: int = 0
    recomputed: list[SiteReport] = field(default_factory=list)

    @property
    def raw_bytes(self) -> int:
        """Saved-activation bytes without the method (unique storages)."""
        return sum(s.raw_bytes for s in self.sites)

    @property
    def stored_bytes(self) -> int:
        """Saved-activation bytes with the method, bases included."""
        return sum(s.stored_bytes for s in self.sites)

    @property
    def savings(self) -> float:
        """Fraction of saved-activation bytes removed, in [0, 1] unless the method costs memory."""
        return 1.0 - self.stored_bytes / self.raw_bytes if self.raw_bytes else 0.0

    def recomputed_totals(self) -> tuple[int, int, int]:
        """``(tensors, raw bytes, stored bytes)`` of the :attr:`recomputed` sites over the step."""
        rows = self.recomputed
        return sum(s.tensors for s in rows), sum(s.raw_bytes for s in rows), sum(s.stored_bytes for s in rows)

    def site(self, name: str) -> SiteReport:
        """The row of one site by name (KeyError listing the sites when absent)."""
        for row in self.sites:
            if row.name == name:
                return row
        raise KeyError(f"no site {name!r}; sites: {[s.name for s in self.sites]}")

    def to_dict(self) -> dict:
        """Plain-data form (for JSON), totals included."""
        return {
            "method": self.method,
            "step": self.step,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "savings": self.savings,
            "sites": [asdict(s) | {"savings": s.savings} for s in self.sites],
            "recomputed": [asdict(s) | {"savings": s.savings} for s in self.recomputed],
        }

    def __str__(self) -> str:
        header = ("site", "dim", "rank", "fidelity", "tensors", "raw", "stored", "saved", "exp", "reset", "fb",
                  "factored", "kept raw because")
        rows = [
            (
                s.name,
                str(s.dim),
                str(s.rank),
                f"{s.fidelity:.4f}",
                str(s.tensors),
                format_bytes(s.raw_bytes),
                format_bytes(s.stored_bytes),
                f"{100 * s.savings:.1f}%",
                str(s.expansions),
                str(s.resets),
                str(s.fallbacks),
                str(s.factored),
                ", ".join(f"{reason} {n}" for reason, n in sorted(s.reasons.items())),
            )
            for s in self.sites
        ]
        rows.append(
            ("total", "", "", "", str(sum(s.tensors for s in self.sites)), format_bytes(self.raw_bytes),
             format_bytes(self.stored_bytes), f"{100 * self.savings:.1f}%", "", "",
             str(sum(s.fallbacks for s in self.sites)), str(sum(s.factored for s in self.sites)), "")
        )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        last = len(header) - 1
        lines = ["  ".join(c.ljust(w) if i in (0, last) else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                 for r in [header, *rows]]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        title = f"{self.method or 'method'} @ step {self.step}"
        if self.recomputed:
            tensors, raw, stored = self.recomputed_totals()
            lines.append(f"recomputed in backward, one checkpointed call at a time: {tensors} tensors over "
                         f"{len(self.recomputed)} sites, raw {format_bytes(raw)}, stored {format_bytes(stored)}")
        return "\n".join([title, *lines])


def format_bytes(n: float) -> str:
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
