"""ksm-analyze: predict what Linux KSM would save, offline, from memory dumps.

The public names are loaded when first used (PEP 562), so ``import ksm_analyze`` and the
command's start-up do not pay for numpy and pandas before they are needed, and Ctrl-C during
start-up is handled like Ctrl-C later (``_entry``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

_WHERE = {
    "TABLES": "analysis", "Analysis": "analysis", "ContentTable": "content_table",
    "Scope": "eligibility",
    "CorruptPageError": "errors", "DumpFormatError": "errors", "InputError": "errors",
    "KsmAnalyzeError": "errors", "TruncatedDumpError": "errors",
    "UnsupportedDumpError": "errors", "DumpFormat": "formats", "detect_format": "formats",
    "open_dump": "formats", "KsmCounters": "ksm", "KsmSettings": "ksm", "Extent": "pages",
    "PageBatch": "pages", "PageState": "pages", "ScanOptions": "options", "analyze": "pipeline",
    "Tune": "whatif.tune", "tune": "whatif.tune",
}
"""Each public name and the module that defines it."""

__all__ = [
    "TABLES",
    "Analysis",
    "ContentTable",
    "CorruptPageError",
    "DumpFormat",
    "DumpFormatError",
    "Extent",
    "InputError",
    "KsmAnalyzeError",
    "KsmCounters",
    "KsmSettings",
    "PageBatch",
    "PageState",
    "ScanOptions",
    "Scope",
    "TruncatedDumpError",
    "Tune",
    "UnsupportedDumpError",
    "analyze",
    "detect_format",
    "open_dump",
    "tune",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ksm_analyze' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:  # what type checkers and editors see
    from .analysis import TABLES, Analysis
    from .content_table import ContentTable
    from .eligibility import Scope
    from .errors import (
        CorruptPageError,
        DumpFormatError,
        InputError,
        KsmAnalyzeError,
        TruncatedDumpError,
        UnsupportedDumpError,
    )
    from .formats import DumpFormat, detect_format, open_dump
    from .ksm import KsmCounters, KsmSettings
    from .options import ScanOptions
    from .pages import Extent, PageBatch, PageState
    from .pipeline import analyze
    from .whatif.tune import Tune, tune
