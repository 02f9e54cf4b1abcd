"""Batches of token ids in the forms transformers hands out, read one way.

A batch of token ids reaches the public API as a 2-D tensor (`tokenizer(..., return_tensors="pt").input_ids`, what
`generate` returns), as a list of lists (`tokenizer([...]).input_ids`, `out.tolist()`), as a list of 1-D tensors,
or as a NumPy array. Truth-testing a tensor (`if not ids:`) raises for more than one element, so every entry point
reads its argument through `id_rows` (ragged rows allowed) or `id_batch` (one rectangular tensor).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def id_rows(ids, name: str = "sequences") -> list[list[int]]:
    """The rows of a batch of token ids as lists of ints (rows may differ in length).

    Args:
        ids: a `[batch, length]` tensor or NumPy array, or a sequence of rows (lists, tuples or 1-D tensors).
        name: the argument's name, for the error message.

    Returns:
        One list of ids per row.

    Raises:
        TypeError: `ids` is not a batch of integer ids (e.g. a single flat sequence or a float tensor).

    Example:
        >>> id_rows(torch.tensor([[1, 2], [3, 4]])) == id_rows([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
        True
        >>> id_rows([torch.tensor([5]), [6, 7]])
        [[5], [6, 7]]
    """
    if isinstance(ids, torch.Tensor) or hasattr(ids, "__array__") and not isinstance(ids, (list, tuple)):
        tensor = torch.as_tensor(ids)
        if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be a [batch, length] batch of integer token ids, got a tensor of shape "
                            f"{tuple(tensor.shape)} and dtype {tensor.dtype}: add a batch dimension with ids[None] "
                            "for one sequence.")
        return tensor.tolist()
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        raise TypeError(f"{name} must be a batch of token ids (a 2-D tensor or a list of lists), got "
                        f"{type(ids).__name__}.")
    rows = []
    for row in ids:
        if isinstance(row, torch.Tensor) or hasattr(row, "__array__"):
            row = torch.as_tensor(row)
            if row.is_floating_point() or row.dim() > 1 and not (row.dim() == 2 and row.shape[0] == 1):
                raise TypeError(f"each row of {name} must be a 1-D sequence of integer ids, got shape "
                                f"{tuple(row.shape)} and dtype {row.dtype}.")
            rows.append(row.reshape(-1).tolist())
        elif isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in row):
                raise TypeError(f"each row of {name} must hold integer token ids, got "
                                f"{sorted({type(t).__name__ for t in row})}: pass the ids themselves.")
            rows.append([int(t) for t in row])
        else:
            raise TypeError(f"{name} must be a batch of token ids (a 2-D tensor or a list of lists), but a row is "
                            f"{type(row).__name__}: wrap one sequence as [ids].")
    return rows


def id_batch(ids, name: str = "sequences", device: torch.device | str | None = None) -> torch.LongTensor:
    """A batch of token ids as one `[batch, length]` long tensor (rows must have one length: pad them first).

    Args:
        ids: a `[batch, length]` tensor or NumPy array, or a list of equally long rows.
        name: the argument's name, for the error message.
        device: where to put the tensor (default: where a tensor already is, else the CPU).

    Raises:
        TypeError: `ids` is not a batch of integer ids.
        ValueError: rows of different lengths.

    Example:
        >>> id_batch([[1, 2], [3, 4]]).shape
        torch.Size([2, 2])
    """
    if isinstance(ids, torch.Tensor):
        id_rows(ids[:0] if ids.dim() == 2 else ids, name)  # type check only
        tensor = ids.long()
    else:
        rows = id_rows(ids, name)
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"the rows of {name} have different lengths {sorted(lengths)}: pad them to one length "
                             "(tokenizer(..., padding=True)) and pass the attention mask.")
        tensor = torch.tensor(rows, dtype=torch.long)
    return tensor if device is None else tensor.to(device)
