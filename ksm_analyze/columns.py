"""Tables as plain columns, made into pandas DataFrames only when one is asked for.

Every table of an analysis is built once, as a :class:`Columns`: named columns of numpy arrays
or lists. The text report reads them as they are; :meth:`Columns.frame` makes the DataFrame
the Python API hands out, and imports pandas only then, so ``scan`` (text or ``--json``)
never loads it. A column given as a list is typed by pandas as it types the values
of records (whole numbers as int64, text as str, None among floats as NaN; no values at all
as object, like a frame of no records), except that whole numbers with a None among them
stay whole numbers (pandas' nullable ``Int64``; None in JSON, an empty cell in CSV): a count
is never a float. An array keeps its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Column", "Columns", "json_safe"]

Column: TypeAlias = "np.ndarray | list[Any]"
"""One column: a numpy array, or a list of plain values."""


class Columns:
    """A table: named columns of one length, in order, its rows numbered or keyed.

    Args:
        data: the columns, in order.
        index: the column whose values name the rows (the DataFrame's index, e.g. ``counter``
            in ``host``), or None: the rows are numbered (a plain 0, 1, ... index).
    """

    def __init__(self, data: Mapping[str, Column], index: str | None = None) -> None:
        self.data = dict(data)
        self.index = index
        self._frame: pd.DataFrame | None = None

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], columns: Sequence[str]
                     ) -> Columns:
        """The table of ``records`` (one dict per row), as ``pd.DataFrame(records, columns)``."""
        rows = list(records)
        return cls({c: [r[c] for r in rows] for c in columns})

    @classmethod
    def from_dicts(cls, data: Mapping[str, Mapping[str, Any]], index: str) -> Columns:
        """The table of ``{column: {row: value}}`` (every column with the same rows), as
        ``pd.DataFrame(data)`` with its index named ``index``."""
        keys = list(next(iter(data.values()), {}))
        return cls({index: keys, **{c: [d[k] for k in keys] for c, d in data.items()}}, index)

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Columns:
        """The columns of a DataFrame with numbered rows; :meth:`frame` gives it back."""
        table = cls({c: df[c].to_numpy() if df[c].dtype.kind in "biuf" else df[c].tolist()
                     for c in df.columns})
        table._frame = df
        return table

    def __len__(self) -> int:
        return len(next(iter(self.data.values()), ()))

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def __repr__(self) -> str:
        return f"Columns({list(self.data)}, {len(self)} rows)"

    @property
    def names(self) -> list[str]:
        """The columns other than the index."""
        return [c for c in self.data if c != self.index]

    @property
    def keys(self) -> list[Any]:
        """The names of the rows (the index column's values)."""
        return list(self.data[self.index]) if self.index else list(range(len(self)))

    def at(self, key: Any, column: str) -> Any:
        """The value of ``column`` in the row named ``key``."""
        return self.data[column][self.keys.index(key)]

    def by_key(self, column: str) -> dict[Any, Any]:
        """``column`` as ``{row name: value}``."""
        return dict(zip(self.keys, self.data[column], strict=True))

    def rows(self) -> list[dict[str, Any]]:
        """Every row as ``{column: value}``, index included."""
        names = list(self.data)
        return [dict(zip(names, values, strict=True))
                for values in zip(*self.data.values(), strict=True)]

    def take(self, positions: Sequence[int]) -> Columns:
        """The rows at ``positions``, in that order."""
        index = np.asarray(positions, np.intp)
        return Columns({c: v[index] if isinstance(v, np.ndarray) else [v[i] for i in index]
                        for c, v in self.data.items()}, self.index)

    def replace(self, **columns: Column) -> Columns:
        """The table with ``columns`` replaced (same names, same length)."""
        return Columns({**self.data, **columns}, self.index)

    def records(self) -> list[dict[str, Any]]:
        """Every row as ``{column: value}``, index included, with the values the DataFrame's
        ``to_dict(orient="records")`` gives (so ``--json`` needs no pandas)."""
        names = list(self.data)
        columns = [_as_pandas_types(self.data[c]) for c in names]
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def keyed(self) -> dict[Any, Any]:
        """The DataFrame's ``to_dict(orient="index")``: ``{row name: {column: value}}``, or
        ``{row name: value}`` for a table whose one column is ``value``."""
        keys = _as_pandas_types(self.data[self.index]) if self.index else list(range(len(self)))
        names = self.names
        columns = [_as_pandas_types(self.data[c]) for c in names]
        if names == ["value"]:
            return dict(zip(keys, columns[0], strict=True))
        return {k: dict(zip(names, values, strict=True))
                for k, values in zip(keys, zip(*columns, strict=True), strict=True)}

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame (made once, then the same object)."""
        if self._frame is None:
            import pandas as pd

            df = pd.DataFrame({c: np.array(v, object) if isinstance(v, list) and not v
                               else pd.array(v, "Int64") if _nullable_ints(v) else v
                               for c, v in self.data.items()})
            self._frame = df.set_index(self.index) if self.index else df
        return self._frame


def _nullable_ints(values: Column) -> bool:
    """A list of whole numbers with a None among them (a count some rows do not have)."""
    if not isinstance(values, list) or None not in values:
        return False
    numbers = [v for v in values if v is not None]
    return bool(numbers) and all(isinstance(v, int | np.integer)
                                 and not isinstance(v, bool | np.bool_) for v in numbers)


def _as_pandas_types(values: Column) -> list[Any]:
    """A column's values as plain Python values, typed as pandas types a list column: numbers
    with a float among them become floats (None: NaN), as in a float64 column; whole numbers
    with a None among them stay whole (None stays None), as in an ``Int64`` column."""
    if isinstance(values, np.ndarray):
        return list(values.tolist()) if values.dtype != object else list(values)
    if _nullable_ints(values):
        return [None if v is None else int(v) for v in values]
    numbers = [v for v in values if v is not None]
    numeric = values and all(isinstance(v, int | float | np.integer | np.floating)
                             and not isinstance(v, bool | np.bool_) for v in numbers)
    if numeric and (len(numbers) < len(values)
                    or any(isinstance(v, float | np.floating) for v in numbers)):
        return [float("nan") if v is None else float(v) for v in values]
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def json_safe(value: Any) -> Any:
    """numpy scalars and containers to plain Python values; NaN and infinities to None
    (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
