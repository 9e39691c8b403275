"""ksm-analyze: predict what Linux KSM would save, offline, from memory dumps."""

from __future__ import annotations

from .analysis import analyze
from .contents import ContentTable
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
from .pages import Extent, PageBatch, PageState
from .result import TABLES, Analysis
from .settings import ScanOptions

__version__ = "0.1.0"

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
    "UnsupportedDumpError",
    "analyze",
    "detect_format",
    "open_dump",
]
