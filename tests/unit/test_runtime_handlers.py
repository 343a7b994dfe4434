"""Unit tests for services.runtime.handlers: loading real handler modules and calling them."""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import sys
import textwrap
import threading

import pytest

from services.runtime.context import Context, Logger
from services.runtime.event import Event
from services.runtime.handlers import (
    HandlerForm,
    build_args,
    call_init_context,
    close_thread_loop,
    detect_form,
    invoke,
    load_handler,
)
from services.runtime.responses import to_result
from shared.errors import InvalidRequest

_counter = itertools.count()


@pytest.fixture(autouse=True)
def restore_import_state():
    """Undo the sys.path and sys.modules changes load_handler makes."""
    path_before = list(sys.path)
    modules_before = set(sys.modules)
    yield
    close_thread_loop()
    sys.path[:] = path_before
    for name in set(sys.modules) - modules_before:
        del sys.modules[name]


def unique(prefix="handler_mod"):
    return f"{prefix}_{next(_counter)}_{id(object())}"


def write_module(directory, name, source):
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def make_event(body=b'{"name": "ada"}', content_type="application/json"):
    header = {
        "call_id": "call-1",
        "function": "f",
        "method": "POST",
        "path": "/",
        "query": "",
        "headers": [["content-type", content_type]],
        "content_type": content_type,
        "deadline_ms": 0,
        "mode": "http",
    }
    return Event.from_invoke(header, body)


def make_context():
    return Context("f", logger=Logger("f", io.StringIO()))


def load(tmp_path, source, func="handler", **kw):
    name = unique()
    write_module(tmp_path, name, source)
    return load_handler(str(tmp_path), f"{name}:{func}", **kw)


def run(loaded, event=None, context=None, session=None, payload=None):
    event = event if event is not None else make_event()
    context = context if context is not None else make_context()
    return invoke(loaded, build_args(loaded, context, event, session, payload))


# --- forms -------------------------------------------------------------------


def test_nuclio_form(tmp_path):
    loaded = load(
        tmp_path,
        """
        def handler(context, event):
            return {"hello": event.body["name"], "fn": context.function_name}
        """,
    )
    assert loaded.form is HandlerForm.NUCLIO
    assert loaded.is_async is False
    assert loaded.func_name == "handler"
    assert run(loaded) == {"hello": "ada", "fn": "f"}


def test_nuclio_form_with_optional_extra(tmp_path):
    loaded = load(tmp_path, "def handler(context, event, extra=None):\n    return extra\n")
    assert loaded.form is HandlerForm.NUCLIO
    assert run(loaded) is None


def test_fusionizer_form(tmp_path):
    loaded = load(
        tmp_path,
        """
        def handler(context, event, requests_session):
            return requests_session.get(event.body["name"])
        """,
    )
    assert loaded.form is HandlerForm.FUSIONIZER

    class Session:
        def get(self, url):
            return f"GET {url}"

    assert run(loaded, session=Session()) == "GET ada"


@pytest.mark.parametrize(
    "params",
    ["event, context", "evt, ctx", "e, context", "request, ctx", "event, context, extra=1"],
)
def test_lambda_form_by_parameter_names(tmp_path, params):
    first = params.split(",")[0]
    loaded = load(
        tmp_path,
        f"""
        def handler({params}):
            return ({first}, type({first}).__name__)
        """,
    )
    assert loaded.form is HandlerForm.LAMBDA
    assert run(loaded) == ({"name": "ada"}, "dict"), "a Lambda handler gets the JSON payload, a plain dict"


def test_two_params_with_other_names_are_nuclio(tmp_path):
    loaded = load(tmp_path, "def handler(c, ev):\n    return type(c).__name__\n")
    assert loaded.form is HandlerForm.NUCLIO
    assert run(loaded) == "Context"


def test_payload_form_gets_body_text(tmp_path):
    loaded = load(tmp_path, "def handle(payload: str):\n    return payload.upper()\n", func="handle")
    assert loaded.form is HandlerForm.PAYLOAD
    # The body was JSON and parsed into a dict, but the payload is the raw text.
    assert run(loaded) == '{"NAME": "ADA"}'
    assert run(loaded, event=make_event(b"caf\xc3\xa9 \xff", "text/plain")) == "CAFÉ \ufffd"
    assert run(loaded, event=make_event(b"", "text/plain")) == ""


def test_payload_form_prefers_explicit_payload(tmp_path):
    loaded = load(tmp_path, "def handle(payload):\n    return payload\n", func="handle")
    assert run(loaded, payload="given") == "given"


def test_build_args_order():
    context, event, session = object(), object(), object()

    def nuclio(context, event):
        pass

    def fusion(context, event, session):
        pass

    def lam(event, context):
        pass

    from services.runtime.handlers import LoadedHandler

    def loaded(func):
        return LoadedHandler(func, detect_form(func), False, None, "m", func.__name__)

    assert build_args(loaded(nuclio), context, event, session, None) == (context, event)
    assert build_args(loaded(fusion), context, event, session, None) == (context, event, session)
    lambda_args = build_args(loaded(lam), context, make_event(), session, None)
    assert lambda_args == ({"name": "ada"}, context), "the Lambda event first: the JSON payload"
    assert build_args(loaded(lam), context, make_event(), session, None, "apigateway")[0]["body"] == '{"name": "ada"}'


# --- detect_form -------------------------------------------------------------


def test_detect_form_rejects_bad_signatures():
    def none():
        pass

    def too_many(a, b, c, d):
        pass

    def kw_only(context, event, *, token):
        pass

    with pytest.raises(InvalidRequest, match="takes no parameters"):
        detect_form(none)
    with pytest.raises(InvalidRequest, match="requires 4 arguments"):
        detect_form(too_many)
    with pytest.raises(InvalidRequest, match="keyword-only parameter 'token'"):
        detect_form(kw_only)
    with pytest.raises(InvalidRequest, match="cannot read the parameters"):
        detect_form(type("NoSig", (), {"__signature__": "broken", "__call__": lambda self: None})())


def test_detect_form_edge_cases():
    def optional_kw(context, event, *, token=None, **extra):
        pass

    def var_args(*args):
        pass

    def all_defaults(context=None, event=None, session=None):
        pass

    def one_default(payload="x"):
        pass

    class Callable:
        def __call__(self, context, event, session):
            pass

    assert detect_form(optional_kw) is HandlerForm.NUCLIO
    assert detect_form(var_args) is HandlerForm.NUCLIO
    assert detect_form(all_defaults) is HandlerForm.NUCLIO
    assert detect_form(one_default) is HandlerForm.PAYLOAD
    assert detect_form(Callable()) is HandlerForm.FUSIONIZER
    assert detect_form(functools.partial(lambda x, context, event: None, 1)) is HandlerForm.NUCLIO


# --- async -------------------------------------------------------------------


def test_async_handler(tmp_path):
    loaded = load(
        tmp_path,
        """
        import asyncio

        async def handler(context, event):
            await asyncio.sleep(0)
            return {"async": event.body["name"]}
        """,
    )
    assert loaded.is_async is True
    assert run(loaded) == {"async": "ada"}


def test_async_handler_reuses_one_loop_per_thread(tmp_path):
    loaded = load(
        tmp_path,
        """
        import asyncio

        async def handler(context, event):
            return asyncio.get_running_loop()
        """,
    )
    first, second = run(loaded), run(loaded)
    assert first is second
    seen = []

    def in_thread():
        seen.append(run(loaded))
        close_thread_loop()
        seen.append(seen[0].is_closed())

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen[0] is not first
    assert seen[1] is True
    # A closed cached loop is replaced, not reused.
    close_thread_loop()
    assert first.is_closed()
    assert run(loaded) is not first


def test_async_handler_on_given_loop(tmp_path):
    loaded = load(
        tmp_path,
        """
        import asyncio

        async def handler(context, event):
            return asyncio.get_running_loop()
        """,
    )
    loop = asyncio.new_event_loop()
    try:
        args = build_args(loaded, make_context(), make_event(), None, None)
        assert invoke(loaded, args, loop) is loop
    finally:
        loop.close()


def test_async_handler_exception_propagates(tmp_path):
    loaded = load(tmp_path, "async def handler(context, event):\n    raise KeyError('k')\n")
    with pytest.raises(KeyError):
        run(loaded)


def test_async_callable_object_and_decorated_handler(tmp_path):
    loaded = load(
        tmp_path,
        """
        import functools

        class Handler:
            async def __call__(self, context, event):
                return "object"

        handler = Handler()

        def wrap(func):
            def wrapper(context, event):
                return func(context, event)
            return wrapper

        @wrap
        async def decorated(context, event):
            return "decorated"
        """,
    )
    assert loaded.is_async is True
    assert run(loaded) == "object"
    decorated = load_handler(str(tmp_path), f"{loaded.module_name}:decorated")
    assert decorated.is_async is False  # the wrapper hides it; invoke still awaits the coroutine
    assert run(decorated) == "decorated"


# --- init_context ------------------------------------------------------------


def test_init_context(tmp_path):
    loaded = load(
        tmp_path,
        """
        def init_context(context):
            context.user_data.greeting = "hi"

        def handler(context, event):
            return context.user_data.greeting + " " + event.body["name"]
        """,
    )
    assert loaded.init_context is not None
    context = make_context()
    call_init_context(loaded, context)
    assert run(loaded, context=context) == "hi ada"


def test_async_init_context(tmp_path):
    loaded = load(
        tmp_path,
        """
        async def init_context(context):
            context.user_data.ready = True

        def handler(context, event):
            return context.user_data.ready
        """,
    )
    context = make_context()
    call_init_context(loaded, context)
    assert run(loaded, context=context) is True


def test_no_init_context(tmp_path):
    loaded = load(tmp_path, "init_context = 5\n\ndef handler(context, event):\n    return 1\n")
    assert loaded.init_context is None
    call_init_context(loaded, make_context())  # nothing to run, no error


# --- loading -----------------------------------------------------------------


def test_dotted_module_and_lambda_style_name(tmp_path):
    package = unique("pkg")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    write_module(tmp_path / package, "entry", "def handler(context, event):\n    return __name__\n")
    loaded = load_handler(str(tmp_path), f"{package}.entry:handler")
    assert loaded.module_name == f"{package}.entry"
    assert run(loaded) == f"{package}.entry"
    lambda_style = load_handler(str(tmp_path), f"{package}.entry.handler")
    assert lambda_style.func is loaded.func


def test_code_dir_and_extra_paths_go_first(tmp_path):
    code_dir, deps = tmp_path / "code", tmp_path / "deps"
    code_dir.mkdir()
    deps.mkdir()
    dep = unique("dep")
    write_module(deps, dep, "VALUE = 'from deps'\n")
    name = unique()
    write_module(code_dir, name, f"import {dep}\n\ndef handler(context, event):\n    return {dep}.VALUE\n")
    loaded = load_handler(str(code_dir), f"{name}:handler", extra_paths=[str(deps)])
    assert sys.path[:2] == [str(code_dir), str(deps)]
    assert run(loaded) == "from deps"
    # Loading again does not duplicate the entries.
    load_handler(str(code_dir), f"{name}:handler", extra_paths=[str(deps)])
    assert sys.path.count(str(code_dir)) == 1


def test_same_module_name_in_two_code_dirs(tmp_path):
    name = unique("main")
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    write_module(first_dir, name, "def handler(context, event):\n    return 'one'\n")
    write_module(second_dir, name, "def handler(context, event):\n    return 'two'\n")
    first = load_handler(str(first_dir), f"{name}:handler")
    second = load_handler(str(second_dir), f"{name}:handler")
    assert run(first) == "one"
    assert run(second) == "two"


def test_missing_module(tmp_path):
    with pytest.raises(InvalidRequest, match=r"handler module 'nope_\w+' not found in") as info:
        load_handler(str(tmp_path), f"{unique('nope')}:handler")
    assert str(tmp_path) in str(info.value)


def test_missing_dependency_is_an_import_failure(tmp_path):
    missing = unique("missing_dep")
    name = unique()
    write_module(tmp_path, name, f"import {missing}\n")
    with pytest.raises(InvalidRequest, match=f"importing '{name}' failed: ModuleNotFoundError") as info:
        load_handler(str(tmp_path), f"{name}:handler")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_function(tmp_path):
    name = unique()
    write_module(tmp_path, name, "def other(context, event):\n    pass\n")
    with pytest.raises(InvalidRequest, match=f"handler '{name}:foo' not found in {name}.py"):
        load_handler(str(tmp_path), f"{name}:foo")


def test_not_callable(tmp_path):
    name = unique()
    write_module(tmp_path, name, "x = 5\n")
    with pytest.raises(InvalidRequest, match=f"'{name}:x' is not callable"):
        load_handler(str(tmp_path), f"{name}:x")


def test_import_error_is_wrapped_with_cause(tmp_path):
    name = unique()
    write_module(tmp_path, name, "1 / 0\n")
    with pytest.raises(InvalidRequest) as info:
        load_handler(str(tmp_path), f"{name}:handler")
    assert str(info.value).startswith(f"importing '{name}' failed: ZeroDivisionError: division by zero")
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert name not in sys.modules


def test_syntax_error_and_sys_exit_are_wrapped(tmp_path):
    name = unique()
    write_module(tmp_path, name, "def handler(:\n")
    with pytest.raises(InvalidRequest, match=f"importing '{name}' failed: SyntaxError"):
        load_handler(str(tmp_path), f"{name}:handler")
    other = unique()
    write_module(tmp_path, other, "import sys\nsys.exit(3)\n")
    with pytest.raises(InvalidRequest, match=f"importing '{other}' failed: SystemExit"):
        load_handler(str(tmp_path), f"{other}:handler")


def test_bad_signature_is_reported_at_load(tmp_path):
    with pytest.raises(InvalidRequest, match="takes no parameters"):
        load(tmp_path, "def handler():\n    pass\n")


@pytest.mark.parametrize("handler", ["main", "main:", ":handler", "bad-name:handler"])
def test_malformed_handler_setting(tmp_path, handler):
    with pytest.raises(InvalidRequest, match="module:function"):
        load_handler(str(tmp_path), handler)


def test_missing_code_dir(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_handler(str(tmp_path / "absent"), "main:handler")


def test_handler_errors_propagate_and_map_to_results(tmp_path):
    loaded = load(
        tmp_path,
        """
        def handler(context, event):
            if event.body["name"] == "boom":
                raise ValueError("bad name")
            return context.Response(body={"ok": True}, status_code=201, headers={"X-A": "1"})
        """,
    )
    assert to_result(run(loaded)) == (201, [["X-A", "1"]], "application/json", b'{"ok":true}')
    with pytest.raises(ValueError, match="bad name"):
        run(loaded, event=make_event(b'{"name": "boom"}'))
