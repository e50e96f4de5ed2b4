"""Restricted unpickling of data files (feature and annotation pickles) that may come from other people.

``pickle.load`` imports and calls whatever a file names, so a crafted file runs code on load. The
unpickler here resolves only the globals that plain data needs: numpy arrays, dtypes and scalars
(as pickled by numpy 1.x and 2.x, protocols 0 to 5), the bytes helper of protocols 0 to 2 and a few
builtin containers. Dicts, lists, tuples, strings, bytes, numbers, booleans and None need no global.
Any other global raises :class:`UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Union

__all__ = ["ALLOWED_GLOBALS", "UnsafePickleError", "RestrictedUnpickler", "load_pickle", "loads_pickle"]

ALLOWED_GLOBALS = frozenset({
    # ndarray reconstruction: numpy 1.x writes numpy.core, numpy 2.x writes numpy._core.
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 stores arrays as raw buffers rebuilt by _frombuffer.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocols 0 to 2 rebuild bytes objects as _codecs.encode(text, 'latin1').
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
})


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing of it has been called.

    It is also a ValueError, so callers that treat invalid data files alike catch it with the rest.
    """


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` and raises on any other global."""

    def __init__(self, file: io.BufferedIOBase, source: str = "<bytes>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: rejected the global {module}.{name}, because data pickles may contain only "
                "dicts, lists, tuples, strings, numbers and numpy arrays. Do not use this file unless you "
                "trust its origin, and re-create it with plain data (or use the packed feature store)."
            )
        return super().find_class(module, name)


def load_pickle(path: Union[str, Path]) -> Any:
    """Unpickle a data file with :class:`RestrictedUnpickler`.

    Raises:
        UnsafePickleError: the file names a global outside the allow-list; the message names the file.
        pickle.UnpicklingError, EOFError, ValueError and the like: the file is truncated or not a pickle.
    """
    path = Path(path)
    with path.open("rb") as handle:
        return RestrictedUnpickler(handle, source=str(path)).load()


def loads_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle bytes with :class:`RestrictedUnpickler`; ``source`` names them in error messages."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()
