"""Tracebacks as a function's author should see them: their own frames and their libraries', not nuclide's.

Lambda and nuclio show a handler's traceback from the handler down. Ours would start in
``executor.py`` and ``handlers.py`` (and pass through ``context_calls.py`` when a task call failed), which
tells the user nothing and shows them our internals. Every traceback the runtime writes to a
function's log (a handler that raised, ``context.logger.exception``, a module that failed to load)
goes through :func:`user_traceback`; a chained exception (``raise ... from``, or raised while
handling another) is shown with its chain, each filtered alike.
"""

from __future__ import annotations

import importlib
import os
import traceback

import services
import shared

# nuclide's own packages, as the code objects name their files (imports give absolute paths)
_OWN_PREFIXES = tuple(os.path.dirname(os.path.abspath(pkg.__file__ or "")) + os.sep for pkg in (services, shared))
# the import machinery nuclide loads handlers with (importlib.import_module and the frozen
# bootstrap under it), which a plain `import x` hides from tracebacks too
_IMPORT_MODULE = os.path.abspath(importlib.__file__ or "")
_IMPORT_MACHINERY = "<frozen importlib."
MAX_FRAMES = 50  # the innermost ones, per exception of a chain (a deep recursion is cut)


def is_own(filename: str) -> bool:
    """Whether a frame of ``filename`` belongs to nuclide (or to the import machinery) and is left out."""
    return filename.startswith(_OWN_PREFIXES) or filename.startswith(_IMPORT_MACHINERY) or filename == _IMPORT_MODULE


def _keep_users_frames(exc: traceback.TracebackException) -> None:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        kept = [frame for frame in te.stack if not is_own(frame.filename)]
        te.stack = traceback.StackSummary.from_list(kept[-MAX_FRAMES:])
        todo.extend(t for t in (te.__cause__, te.__context__) if t is not None)
        todo.extend(getattr(te, "exceptions", None) or ())  # the members of an ExceptionGroup


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without nuclide's frames; just "Type: message" when no frame is the user's."""
    te = traceback.TracebackException.from_exception(exc)
    _keep_users_frames(te)
    return "".join(te.format())
