"""What ksmd does differently by kernel version: one field per rule, set from the release.

The versions and commits are listed in ``docs/model.md`` ("The kernel's rules, by version").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["KernelRules", "rules_for"]

_RELEASE = re.compile(r"^\s*v?(\d+)\.(\d+)")


@dataclass(frozen=True)
class KernelRules:
    """The rules of ``mm/ksm.c`` the time model replays, for one kernel release.

    Attributes:
        release: the release the rules were made for, as given (``uname -r``).
        version: its (major, minor).
        two_visit_gate: the checksum gate comes before the stable-tree search (6.11, "mm/ksm:
            don't waste time searching stable tree for fast changing page"): every page that
            is not yet a KSM page needs two visits with the same checksum, even to join an
            existing KSM page. Before, a page could join a KSM page on its first visit.
        has_smart_scan: pages that keep failing to merge are skipped (6.7, ``smart_scan``,
            ``pages_skipped``); on older kernels every page is processed on every full scan.
        has_advisor: the scan-time advisor exists (6.8, ``advisor_mode``).
        has_general_profit: ``general_profit`` and ``/proc/PID/ksm_stat``'s profit exist
            (6.4).
        zero_pages_in_profit: ``ksm_zero_pages`` exists and counts in ``general_profit``
            (6.6); before, zero pages merged with ``use_zero_pages`` were not counted.
        max_page_sharing_limit: a KSM page has at most ``max_page_sharing`` mappings (4.13);
            before, one KSM page per content.
        walks_every_address: ksmd looks up every address of a mergeable VMA, holes included
            (fixed in 6.18-rc6 and backported to stable kernels, so a stable release before
            6.18 may already have the fix): scan time then grows with the VMA size, not the
            pages present.
    """

    release: str
    version: tuple[int, int]
    two_visit_gate: bool
    has_smart_scan: bool
    has_advisor: bool
    has_general_profit: bool
    zero_pages_in_profit: bool
    max_page_sharing_limit: bool
    walks_every_address: bool


def rules_for(release: str) -> KernelRules:
    """The rules of the kernel ``release`` (``6.18.44-fc-v1272``, ``6.1.0-28-amd64``,
    ``5.15``...).

    Raises:
        ValueError: no ``MAJOR.MINOR`` version at the start of ``release``.
    """
    match = _RELEASE.match(release)
    if match is None:
        raise ValueError(f"cannot read a kernel version (MAJOR.MINOR) from {release!r}")
    version = (int(match[1]), int(match[2]))
    return KernelRules(
        release=release.strip(),
        version=version,
        two_visit_gate=version >= (6, 11),
        has_smart_scan=version >= (6, 7),
        has_advisor=version >= (6, 8),
        has_general_profit=version >= (6, 4),
        zero_pages_in_profit=version >= (6, 6),
        max_page_sharing_limit=version >= (4, 13),
        walks_every_address=version < (6, 18),
    )
