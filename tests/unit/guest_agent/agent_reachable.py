"""What an object keeps alive, for tests of what the agent holds between calls."""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator

#: Not followed: a class, a module or a function reaches the whole program.
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def reachable(root: object) -> Iterator[object]:
    """*root* and every object it references, through containers and instances' attributes
    (gc's referents), but not through classes, modules or functions."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or (obj is not root and isinstance(obj, _SHARED)):
            continue
        seen.add(id(obj))
        yield obj
        todo.extend(gc.get_referents(obj))
