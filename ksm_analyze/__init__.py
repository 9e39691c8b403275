"""ksm-analyze: predict what Linux KSM would save, offline, from memory dumps."""

from __future__ import annotations

from .analysis import Analysis, analyze
from .errors import (
    CorruptPageError,
    DumpFormatError,
    InputError,
    KsmAnalyzeError,
    TruncatedDumpError,
    UnsupportedDumpError,
)
from .formats import DumpFormat, detect_format, open_dump
from .pages import Extent, PageBatch, PageState

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CorruptPageError",
    "DumpFormat",
    "DumpFormatError",
    "Extent",
    "InputError",
    "KsmAnalyzeError",
    "PageBatch",
    "PageState",
    "TruncatedDumpError",
    "UnsupportedDumpError",
    "analyze",
    "detect_format",
    "open_dump",
]
