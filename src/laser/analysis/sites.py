"""Per-site compression table in the form of the paper's Table 2: final rank, savings, share of all savings."""

from __future__ import annotations

from dataclasses import dataclass

from laser.hooks import Reason
from laser.report import Report, format_bytes


@dataclass(frozen=True)
class SiteRow:
    """One site of a method's report.

    Attributes:
        site, dim, rank: the site, its width and the rank of its codes (``dim`` where stored raw).
        raw_bytes, stored_bytes: bytes without and with the method during the reported step.
        savings: ``1 - stored / raw`` at this site.
        share: this site's saved bytes over all sites' saved bytes (shares sum to 1; a site that costs
            memory has a negative share).
        overhead: the method was allowed to compress the site but kept it raw (the paper's "0% (overhead)":
            the rank grew past break-even), or its codes cost more than the raw tensor.
    """

    site: str
    dim: int
    rank: int
    raw_bytes: int
    stored_bytes: int
    savings: float
    share: float
    overhead: bool


# Reasons a method that may compress a site keeps its storages raw for their rank: codes plus basis would not
# beat the raw bytes (this step, or for any batch).
_PAST_BREAK_EVEN = frozenset({Reason.BREAK_EVEN, Reason.FROZEN})


def site_table(report: Report) -> list[SiteRow]:
    """Rows of ``report`` with savings and share of total savings, largest raw bytes first.

    Raises ValueError when the report saved nothing overall, since shares of zero savings are undefined.
    """
    saved = report.raw_bytes - report.stored_bytes
    if saved == 0:
        raise ValueError(
            f"the {report.method or 'method'} report saved no bytes, so shares of the savings are undefined; "
            "pass the report of a step in which the method compressed something"
        )
    rows = [
        SiteRow(
            site=row.name,
            dim=row.dim,
            rank=row.rank,
            raw_bytes=row.raw_bytes,
            stored_bytes=row.stored_bytes,
            savings=row.savings,
            share=(row.raw_bytes - row.stored_bytes) / saved,
            overhead=row.stored_bytes > row.raw_bytes
            or (not _PAST_BREAK_EVEN.isdisjoint(row.reasons) and row.stored_bytes >= row.raw_bytes),
        )
        for row in report.sites
    ]
    return sorted(rows, key=lambda r: (-r.raw_bytes, r.site))


def format_site_table(rows: list[SiteRow]) -> str:
    """A markdown table: site, dim, final rank, raw, stored, savings (``0% (overhead)`` flagged), share."""
    lines = [
        "| site | dim | final rank | raw | stored | savings | share of savings |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        savings = f"{100 * row.savings:.1f}%" + (" (overhead)" if row.overhead else "")
        lines.append(
            f"| `{row.site}` | {row.dim} | {row.rank} | {format_bytes(row.raw_bytes)} | "
            f"{format_bytes(row.stored_bytes)} | {savings} | {100 * row.share:.1f}% |"
        )
    return "\n".join(lines)
