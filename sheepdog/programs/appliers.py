"""Functions that call a user's function with keyword arguments, or over a chunk of calls.

sheepdog.executor compiles this text under a module name nothing can import, so that
serialisation ships the appliers by value (the workers do not have sheepdog installed).
Python 3.6+, standard library only.
"""
MYPY = False
if MYPY:  # type checkers only
    from typing import Any, Callable, Dict, List, Tuple  # noqa: F401 - named in type comments


def make_kwargs_applier(f):
    # type: (Callable[..., Any]) -> Callable[[Tuple[Any, ...], Dict[str, Any]], Any]
    def sheepdog_apply_kwargs(args, kwargs):
        # type: (Tuple[Any, ...], Dict[str, Any]) -> Any
        return f(*args, **kwargs)
    return sheepdog_apply_kwargs


def make_chunk_applier(f):
    # type: (Callable[..., Any]) -> Callable[[List[Tuple[Any, ...]]], List[Any]]
    def sheepdog_apply_chunk(chunk):
        # type: (List[Tuple[Any, ...]]) -> List[Any]
        return [f(*args) for args in chunk]
    return sheepdog_apply_chunk
