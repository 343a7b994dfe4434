"""Find, import and call user handlers in any of the supported calling conventions."""

from __future__ import annotations

import collections.abc
import enum
import importlib
import inspect
import os
import sys
import threading
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from shared.errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

__all__ = [
    "HandlerForm",
    "LoadedHandler",
    "detect_form",
    "load_handler",
    "build_args",
    "invoke",
    "call_init_context",
    "close_thread_loop",
    "thread_loop",
]


class HandlerForm(enum.Enum):
    """The positional arguments a handler takes."""

    NUCLIO = "nuclio"  # handler(context, event)
    FUSIONIZER = "fusionizer"  # handler(context, event, requests_session)
    LAMBDA = "lambda"  # handler(event, context)
    PAYLOAD = "payload"  # handler(payload: str)


_LAMBDA_EVENT_NAMES = frozenset({"event", "evt", "e", "request"})
_LAMBDA_CONTEXT_NAMES = frozenset({"context", "ctx"})
_POSITIONAL_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _describe(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def detect_form(func: Callable[..., Any]) -> HandlerForm:
    """The calling convention of ``func``, from its required positional parameters (and names)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"cannot read the parameters of handler {_describe(func)!r} ({exc}); "
            "use a plain Python function such as def handler(context, event)"
        ) from None
    positional: list[inspect.Parameter] = []
    required = 0
    has_var_positional = False
    for param in signature.parameters.values():
        if param.kind in _POSITIONAL_KINDS:
            positional.append(param)
            if param.default is inspect.Parameter.empty:
                required += 1
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            has_var_positional = True
        elif param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty:
            raise InvalidRequest(
                f"handler {_describe(func)!r} has a required keyword-only parameter {param.name!r}; "
                "the runtime passes arguments by position, so give it a default or make it positional"
            )
    if required > 3:
        raise InvalidRequest(
            f"handler {_describe(func)!r} requires {required} arguments; handlers take "
            "(context, event), (context, event, requests_session), (event, context) or (payload)"
        )
    if required == 0:
        if positional:
            # All optional: fill as many as the richest form we support needs, most-common first.
            required = min(len(positional), 2)
        elif has_var_positional:
            required = 2  # handler(*args) reads best as nuclio's (context, event)
        else:
            raise InvalidRequest(
                f"handler {_describe(func)!r} takes no parameters; give it (context, event), "
                "(context, event, requests_session), (event, context) or (payload)"
            )
    if required == 1:
        return HandlerForm.PAYLOAD
    if required == 3:
        return HandlerForm.FUSIONIZER
    if (
        len(positional) >= 2
        and positional[0].name in _LAMBDA_EVENT_NAMES
        and positional[1].name in _LAMBDA_CONTEXT_NAMES
    ):
        return HandlerForm.LAMBDA
    return HandlerForm.NUCLIO


def _is_async(func: Any) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    # An instance with `async def __call__` is async too.
    call = getattr(type(func), "__call__", None)
    return call is not None and not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


@dataclass(slots=True)
class LoadedHandler:
    """A handler ready to call: the function, how to call it, and its module's init_context."""

    func: Callable[..., Any]
    form: HandlerForm
    is_async: bool
    init_context: Callable[[Any], Any] | None
    module_name: str
    func_name: str


def _split_handler(handler: str) -> tuple[str, str]:
    if ":" in handler:
        module_name, _, func_name = handler.partition(":")
    else:
        # Lambda-style "main.handler".
        module_name, _, func_name = handler.rpartition(".")
    if not module_name or not func_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise InvalidRequest(
            f"handler {handler!r} is not of the form 'module:function' (e.g. 'main:handler'); fix the handler setting"
        )
    return module_name, func_name


def _put_first_on_path(paths: list[str]) -> None:
    # Remove then insert so the order is exactly code_dir, extra_paths..., then the rest.
    for path in paths:
        while path in sys.path:
            sys.path.remove(path)
    sys.path[0:0] = paths


def _is_within(path: str | None, directory: str) -> bool:
    if not path:
        return False
    try:
        return os.path.commonpath([os.path.abspath(path), directory]) == directory
    except ValueError:  # different drives
        return False


def _evict_foreign(top_name: str, code_dir: str) -> None:
    """Forget a cached module of the same name imported from elsewhere (e.g. another function's main.py)."""
    if not (
        os.path.isfile(os.path.join(code_dir, top_name + ".py"))
        or os.path.isdir(os.path.join(code_dir, top_name))
    ):
        return
    cached = sys.modules.get(top_name)
    if cached is None:
        return
    locations = [getattr(cached, "__file__", None), *list(getattr(cached, "__path__", None) or ())]
    if any(_is_within(location, code_dir) for location in locations):
        return
    # The previously loaded handler keeps its module object alive through its globals.
    prefix = top_name + "."
    for name in [n for n in sys.modules if n == top_name or n.startswith(prefix)]:
        del sys.modules[name]


def _module_display(module: Any, module_name: str, code_dir: str) -> str:
    file = getattr(module, "__file__", None)
    if file and _is_within(file, code_dir):
        return os.path.relpath(file, code_dir)
    return module_name.replace(".", os.sep) + ".py"


def load_handler(code_dir: str, handler: str, extra_paths: Iterable[str] = ()) -> LoadedHandler:
    """Import ``handler`` ("module:function") from ``code_dir``, with ``extra_paths`` after it on sys.path.

    Raises InvalidRequest for a missing module or function, a non-callable, an
    unsupported signature, or an exception raised while importing (kept as __cause__).
    """
    module_name, func_name = _split_handler(handler)
    code_dir = os.path.abspath(code_dir)
    if not os.path.isdir(code_dir):
        raise InvalidRequest(f"code directory {code_dir} does not exist; deploy the function's code first")
    _put_first_on_path([code_dir, *(os.path.abspath(p) for p in extra_paths)])
    # Files written after a directory was first scanned would otherwise be invisible.
    importlib.invalidate_caches()
    _evict_foreign(module_name.partition(".")[0], code_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a miss on the handler module (or its package) is "not found";
        # a missing dependency inside it is an import failure.
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise InvalidRequest(
                f"handler module {module_name!r} not found in {code_dir}; "
                f"check the handler setting {handler!r} and that the file is in the function's code"
            ) from None
        raise InvalidRequest(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except (Exception, SystemExit) as exc:
        raise InvalidRequest(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc

    func: Any = module
    for attr in func_name.split("."):
        try:
            func = getattr(func, attr)
        except AttributeError:
            raise InvalidRequest(
                f"handler {handler!r} not found in {_module_display(module, module_name, code_dir)}; "
                f"define {func_name.split('.')[-1]}() there or fix the handler setting"
            ) from None
    if not callable(func):
        raise InvalidRequest(
            f"{handler!r} is not callable (it is a {type(func).__name__}); point the handler at a function"
        )
    form = detect_form(func)
    init_context = getattr(module, "init_context", None)
    if not callable(init_context):
        init_context = None
    return LoadedHandler(
        func=func,
        form=form,
        is_async=_is_async(func),
        init_context=init_context,
        module_name=module_name,
        func_name=func_name,
    )


def _body_text(event: Any) -> str:
    # raw_body is what was sent, even when event.body was parsed into a dict/list.
    raw = event.raw_body
    return raw.decode("utf-8", "replace") if raw else ""


def build_args(
    loaded: LoadedHandler,
    context: Any,
    event: Any,
    requests_session: Any,
    payload: str | None,
    lambda_shape: str = "auto",
) -> tuple[Any, ...]:
    """The positional arguments for ``loaded``'s form; a Lambda handler's event in ``lambda_shape``
    (see services.runtime.lambda_shape, imported only by functions that have such a handler)."""
    form = loaded.form
    if form is HandlerForm.NUCLIO:
        return (context, event)
    if form is HandlerForm.FUSIONIZER:
        return (context, event, requests_session)
    if form is HandlerForm.LAMBDA:
        from services.runtime.lambda_shape import lambda_event

        return (lambda_event(event, lambda_shape), context)
    return (payload if payload is not None else _body_text(event),)


_thread_state = threading.local()
_PLAIN_VALUES = frozenset((str, bytes, dict, list, tuple, int, float, bool, type(None)))
# what asyncio.iscoroutine accepts, without importing asyncio (about 40 ms) before a handler needs it
_COROUTINE_TYPES = (types.CoroutineType, types.GeneratorType, collections.abc.Coroutine)


def _is_coroutine(value: Any) -> bool:
    return isinstance(value, _COROUTINE_TYPES)


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for async handlers and ``init_context``, made (and asyncio imported) on first use."""
    loop = getattr(_thread_state, "loop", None)
    if loop is None or loop.is_closed():
        import asyncio

        loop = _thread_state.loop = asyncio.new_event_loop()
    return loop


def close_thread_loop() -> None:
    """Close this thread's cached event loop, if invoke() made one (call before a worker thread ends)."""
    loop = getattr(_thread_state, "loop", None)
    if loop is not None:
        _thread_state.loop = None
        if not loop.is_closed():
            loop.close()


def _run(result: Any, loop: asyncio.AbstractEventLoop | None) -> Any:
    if loop is None:
        loop = thread_loop()
    if loop.is_running():
        result.close()  # avoid a "never awaited" warning on top of the real error
        raise RuntimeError(
            "invoke() was given an event loop that is already running; call it from a "
            "thread without a running loop, or await the handler directly"
        )
    return loop.run_until_complete(result)


def invoke(loaded: LoadedHandler, args: tuple[Any, ...], loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """Call the handler and return its value, running a coroutine to completion on ``loop``.

    Without ``loop``, each thread gets one cached event loop of its own, so state
    such as client sessions created by async handlers survives between calls.
    """
    result = loaded.func(*args)
    # Checking the value rather than loaded.is_async also covers sync wrappers
    # (decorators) that return a coroutine; the common plain values skip the check.
    if type(result) in _PLAIN_VALUES or not _is_coroutine(result):
        return result
    return _run(result, loop)


def call_init_context(loaded: LoadedHandler, context: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Run the module's ``init_context(context)`` if it has one (sync or async)."""
    init = loaded.init_context
    if init is None:
        return
    result = init(context)
    if _is_coroutine(result):
        _run(result, loop)
