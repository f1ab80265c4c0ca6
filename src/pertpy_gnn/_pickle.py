"""Read pickles of plain data (the auxiliary files of published models) without running their code.

A pickle can call any importable function while it loads. The files read here are expected to
hold only dicts, lists, tuples, sets, strings, numbers and numpy scalars/arrays; :func:`read_plain_pickle`
refuses anything else before it is built, naming the file and the object it refused. A caller may
allow a few more named globals (e.g. torch's tensor rebuilders, with a storage reader that uses
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "bool",
    }
)
_NUMPY = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle holds something other than plain data."""


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, extra: Mapping[tuple[str, str], Callable | None]):
        super().__init__(file)
        self._path = path
        self._extra = extra

    def find_class(self, module: str, name: str):
        if (module, name) in self._extra:
            sub = self._extra[(module, name)]
            return super().find_class(module, name) if sub is None else sub
        if (module == "builtins" and name in _BUILTINS) or (module, name) in _NUMPY:
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):  # numpy >= 1.25 dtype classes
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._path}: refusing to load `{module}.{name}`: this file should hold only plain data (dicts, "
            "lists, strings, numbers, numpy arrays). It is not the expected file, or it was tampered with."
        )


def read_plain_pickle(
    path: str | Path, *, extra_globals: Mapping[tuple[str, str], Callable | None] | None = None
):
    """Unpickle ``path``, accepting only builtins containers/scalars and numpy scalars/arrays.

    Parameters
    ----------
    path
        The pickle file.
    extra_globals
        Further ``(module, name)`` globals to accept, each mapped to ``None`` (the real object) or to
        a callable used in its place.

    Returns
    -------
    The unpickled object.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    UnsafePickleError
        The pickle references any other class or function (nothing of it is run).
    ValueError
        The file is not a readable pickle (truncated or another format); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as fh:
        try:
            return _PlainUnpickler(fh, path, dict(extra_globals or {})).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise ValueError(
                f"{path} is not a readable pickle ({type(e).__name__}: {e}); the file may be truncated or corrupt."
            ) from e
