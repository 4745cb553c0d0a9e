"""Per-sample state keyed by dataset id, shared by the stateful strategies."""

from __future__ import annotations

import torch


class IdTable:
    """Rows of named per-sample tensors addressed by dataset id.

    Ids are arbitrary int64 values (not necessarily dense), so they map to rows
    through a dict; tensors grow by doubling when new ids arrive.
    """

    def __init__(self, columns: dict[str, tuple[tuple[int, ...], float]]):
        #: name -> (trailing shape, fill value for unseen rows)
        self.columns = columns
        self.row_of: dict[int, int] = {}
        self.data = {k: torch.full((0, *shape), fill, dtype=torch.float64) for k, (shape, fill) in columns.items()}

    def __len__(self) -> int:
        return len(self.row_of)

    def rows(self, ids: torch.Tensor, create: bool = True) -> torch.Tensor:
        """Row per id; with create=False unseen ids give -1."""
        out = []
        for i in ids.tolist():
            r = self.row_of.get(i)
            if r is None and create:
                r = self.row_of[i] = len(self.row_of)
            out.append(-1 if r is None else r)
        self._grow(len(self.row_of))
        return torch.tensor(out, dtype=torch.long)

    def _grow(self, n: int) -> None:
        have = next(iter(self.data.values())).shape[0] if self.data else n
        if n <= have:
            return
        size = max(n, 2 * have, 64)
        for k, (shape, fill) in self.columns.items():
            t = torch.full((size, *shape), fill, dtype=torch.float64)
            t[:have] = self.data[k]
            self.data[k] = t

    def gather(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, seen mask) for ids; unseen ids get the column's fill value."""
        rows = self.rows(ids, create=False)
        seen = rows >= 0
        shape, fill = self.columns[name]
        vals = torch.full((rows.numel(), *shape), fill, dtype=torch.float64)
        vals[seen] = self.data[name][rows[seen]]
        return vals, seen
