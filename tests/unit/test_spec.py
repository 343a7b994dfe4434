"""Tests for shared/spec.py: function.yaml parsing, handler inference and static handler checks."""

from __future__ import annotations

import sys
import textwrap

import pytest

from shared.archive import Archive
from shared.errors import InvalidRequest
from shared.spec import (
    HOST_RUNTIME,
    FunctionSpec,
    check_handler,
    parse_duration_s,
    parse_function,
    parse_memory_bytes,
)

MAIN = b"def handler(context, event):\n    return 'ok'\n"
HOST = f"{sys.version_info.major}.{sys.version_info.minor}"


def archive_with(yaml_text: str | None = None, files: dict[str, bytes | str] | None = None) -> Archive:
    contents = {name: data.encode() if isinstance(data, str) else data for name, data in (files or {}).items()}
    contents.setdefault("main.py", MAIN)
    if yaml_text is not None:
        contents["function.yaml"] = textwrap.dedent(yaml_text).encode()
    return Archive(contents)


def parse_yaml(yaml_text: str, files: dict[str, bytes | str] | None = None) -> tuple[FunctionSpec, list[str]]:
    return parse_function(archive_with(yaml_text, files))


def yaml_error(yaml_text: str, files: dict[str, bytes | str] | None = None) -> str:
    with pytest.raises(InvalidRequest) as exc_info:
        parse_yaml(yaml_text, files)
    return exc_info.value.message


NUCLIO_EXAMPLE = """
    apiVersion: "nuclio.io/v1"
    kind: NuclioFunction
    metadata:
      name: image-resizer
      namespace: nuclio
      labels:
        team: media
      annotations:
        owner: alice
    spec:
      description: Resizes images
      handler: "resizer.core:handler"
      runtime: "python:3.11"
      env:
        - name: TARGET_WIDTH
          value: 640
        - name: DEBUG
          value: true
        - name: EMPTY
        - name: FROM_SECRET
          valueFrom:
            secretKeyRef: {name: s3, key: token}
      build:
        commands:
          - "pip install pillow"
          - "apt-get install -y libjpeg"
        baseImage: "python:3.11-slim"
        noCache: true
      resources:
        limits:
          memory: 256Mi
          cpu: 500m
        requests:
          cpu: 100m
      triggers:
        http:
          kind: http
          maxWorkers: 4
          attributes:
            port: 32001
        nightly:
          kind: cron
          attributes:
            interval: 24h
      minReplicas: 0
      maxReplicas: 4
      timeout: 2m
      maxConcurrency: 8
      scaleToZero:
        idleTimeout: 10m
      image: registry/resizer:latest
      platform: {}
      readinessTimeoutSeconds: 60
      loggerSinks: []
"""


def test_realistic_nuclio_function_yaml() -> None:
    files = {"resizer/core.py": "def handler(context, event):\n    pass\n", "requirements.txt": "pillow>=10\n"}
    spec, warnings = parse_yaml(NUCLIO_EXAMPLE, files)
    assert spec == FunctionSpec(
        name="image-resizer",
        handler="resizer.core:handler",
        runtime=HOST_RUNTIME,
        env={"TARGET_WIDTH": "640", "DEBUG": "true", "EMPTY": ""},
        build_commands=("pip install pillow", "apt-get install -y libjpeg"),
        requirements="pillow>=10\n",
        min_replicas=0,
        max_replicas=4,
        description="Resizes images",
        timeout_s=120.0,
        max_concurrency=8,
        memory_bytes=256 * 1024 * 1024,
        cpu=0.5,
        private=False,
        idle_timeout_s=600.0,
        triggers=(
            {"kind": "http", "maxWorkers": 4, "attributes": {"port": 32001}, "name": "http"},
            {"kind": "cron", "attributes": {"interval": "24h"}, "name": "nightly"},
        ),
    )
    assert sorted(warnings) == sorted(
        [
            "function.yaml: spec.env[3].valueFrom is not supported by nuclide; variable skipped",
            "function.yaml: spec.build.baseImage is ignored by nuclide",
            "function.yaml: spec.build.noCache is ignored by nuclide",
            "function.yaml: spec.resources.requests is ignored by nuclide",
            "function.yaml: spec.image is ignored by nuclide",
            "function.yaml: spec.platform is ignored by nuclide",
            "function.yaml: spec.readinessTimeoutSeconds is ignored by nuclide",
            "function.yaml: spec.loggerSinks is ignored by nuclide",
        ]
    )
    check_handler(archive_with(NUCLIO_EXAMPLE, files), spec.handler)


def test_to_dict_and_from_dict_round_trip() -> None:
    spec, _ = parse_yaml(NUCLIO_EXAMPLE, {"resizer/core.py": MAIN})
    data = spec.to_dict()
    assert list(data) == [
        "name", "handler", "runtime", "env", "build_commands", "requirements", "min_replicas", "max_replicas",
        "description", "timeout_s", "max_concurrency", "target_concurrency", "memory_bytes", "cpu", "pids",
        "scratch_bytes", "network",
        "private", "allow_calls_from", "idle_timeout_s",
        "triggers",
        "retry", "warm_start", "registered_runtime", "lambda_event",
    ]
    assert isinstance(data["build_commands"], list) and isinstance(data["triggers"], list)
    assert FunctionSpec.from_dict(data) == spec


def test_from_dict_is_tolerant() -> None:
    spec = FunctionSpec.from_dict({"handler": "app:handle", "future_field": 1, "build_commands": ["x"]})
    assert spec.handler == "app:handle"
    assert spec.build_commands == ("x",)
    assert spec.timeout_s == 30.0 and spec.runtime == HOST_RUNTIME and spec.env == {}


def test_minimal_yaml_uses_defaults() -> None:
    spec, warnings = parse_yaml("spec:\n  handler: main:handler\n")
    assert warnings == []
    assert spec == FunctionSpec(handler="main:handler")
    assert (spec.min_replicas, spec.max_replicas, spec.runtime) == (1, 1, HOST_RUNTIME)


def test_function_yml_is_accepted() -> None:
    archive = Archive({"main.py": MAIN, "function.yml": b"spec:\n  handler: main:handler\n  private: true\n"})
    spec, _ = parse_function(archive)
    assert spec.private is True


def test_unknown_fields_warn_and_never_fail() -> None:
    spec, warnings = parse_yaml(
        """
        apiVersion: nuclio.io/v1
        extra: 1
        metadata: {name: fn, weird: x}
        spec:
          handler: main:handler
          foo: bar
          resources: {limits: {memory: 64Mi, nvidia.com/gpu: 1}}
          scaleToZero: {scaleResources: []}
        """
    )
    assert spec.name == "fn" and spec.memory_bytes == 64 * 1024 * 1024
    assert "function.yaml: unknown field 'extra' is ignored" in warnings
    assert "function.yaml: unknown field 'metadata.weird' is ignored" in warnings
    assert "function.yaml: unknown field 'spec.foo' is ignored" in warnings
    assert "function.yaml: spec.resources.limits.nvidia.com/gpu is ignored by nuclide" in warnings
    assert "function.yaml: spec.scaleToZero.scaleResources is ignored by nuclide" in warnings


def test_yaml_syntax_error_names_the_line() -> None:
    message = yaml_error("spec:\n  handler: main:handler\n  env: [unclosed\n")
    assert message.startswith("function.yaml line ") and "invalid YAML" in message
    line = int(message.split("line ")[1].split(":")[0])
    assert line in (3, 4)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_yaml_must_be_a_mapping(text: str, kind: str) -> None:
    assert f"must be a YAML mapping with 'metadata' and 'spec', got a {kind}" in yaml_error(text)


@pytest.mark.parametrize(
    "body, field, expected",
    [
        ("metadata: [x]", "metadata", "a mapping"),
        ("metadata: {name: 3}\nspec: {handler: main:handler}", "metadata.name", "a string"),
        ("spec: [x]", "spec", "a mapping"),
        ("spec: {handler: 3}", "spec.handler", "not a handler"),
        ("spec: {handler: main:handler, env: 3}", "spec.env", "a list of {name, value}"),
        ("spec: {handler: main:handler, env: [3]}", "spec.env[0]", "a mapping"),
        ("spec: {handler: main:handler, env: {A: [1]}}", "spec.env.A", "a string or number"),
        ("spec: {handler: main:handler, build: {commands: x}}", "spec.build.commands", "a list"),
        ("spec: {handler: main:handler, build: {commands: [1]}}", "spec.build.commands[0]", "a string"),
        ("spec: {handler: main:handler, build: 1}", "spec.build", "a mapping"),
        ("spec: {handler: main:handler, minReplicas: '2'}", "spec.minReplicas", "an integer"),
        ("spec: {handler: main:handler, maxReplicas: true}", "spec.maxReplicas", "an integer"),
        ("spec: {handler: main:handler, maxReplicas: 1.5}", "spec.maxReplicas", "an integer"),
        ("spec: {handler: main:handler, description: 3}", "spec.description", "a string"),
        ("spec: {handler: main:handler, maxConcurrency: x}", "spec.maxConcurrency", "an integer"),
        ("spec: {handler: main:handler, private: 'yes'}", "spec.private", "true or false"),
        ("spec: {handler: main:handler, private: 1}", "spec.private", "true or false"),
        ("spec: {handler: main:handler, allowCallsFrom: friend}", "spec.allowCallsFrom", "a list of function names"),
        ("spec: {handler: main:handler, allowCallsFrom: {friend: 1}}", "spec.allowCallsFrom",
         "a list of function names"),
        ("spec: {handler: main:handler, allowCallsFrom: [3]}", "spec.allowCallsFrom[0]", 'a function name or "*"'),
        ("spec: {handler: main:handler, allowCallsFrom: [ok, [x]]}", "spec.allowCallsFrom[1]",
         'a function name or "*"'),
        ("spec: {handler: main:handler, resources: []}", "spec.resources", "a mapping"),
        ("spec: {handler: main:handler, resources: {limits: 1}}", "spec.resources.limits", "a mapping"),
        ("spec: {handler: main:handler, triggers: 3}", "spec.triggers", "a mapping"),
        ("spec: {handler: main:handler, triggers: {t: 3}}", "spec.triggers.t", "a mapping"),
        ("spec: {handler: main:handler, scaleToZero: 3}", "spec.scaleToZero", "a mapping"),
        ("spec: {handler: main:handler, runtime: 3}", "spec.runtime", "a string"),
    ],
)
def test_wrong_types_name_the_field_and_expected_type(body: str, field: str, expected: str) -> None:
    message = yaml_error(body)
    assert message.startswith(f"function.yaml: {field} ")
    assert expected in message


@pytest.mark.parametrize("handler", ["main", "main:", ":handler", "main:handler:x", "a-b:handler", "a..b:f",
                                     "main:class", "main:1x", "main/x:handler"])
def test_malformed_handler_is_refused(handler: str) -> None:
    message = yaml_error(f"spec: {{handler: '{handler}'}}")
    assert message == (
        f"function.yaml: spec.handler {handler!r} is not a handler; use 'module:function', e.g. 'main:handler'"
    )


@pytest.mark.parametrize("runtime", ["python", "python:3", f"python:{HOST}", f"python{HOST}", "Python:3", "python3"])
def test_host_runtime_spellings_normalise(runtime: str) -> None:
    spec, _ = parse_yaml(f"spec: {{handler: main:handler, runtime: '{runtime}'}}")
    assert spec.runtime == f"python:{HOST}"


@pytest.mark.parametrize("runtime", ["golang", "nodejs:18", "python:"])
def test_other_runtimes_are_refused_with_the_host_version(runtime: str) -> None:
    message = yaml_error(f"spec: {{handler: main:handler, runtime: '{runtime}'}}")
    assert message == f"function.yaml: spec.runtime {runtime!r} is not available here; use 'python' or 'python:{HOST}'"


@pytest.mark.parametrize("runtime,parsed", [("python:3.9", "python:3.9"), ("python3.99", "python:3.99"),
                                            ("Python:3.012", "python:3.12")])
def test_any_python_3_is_taken_the_deployer_decides_where_it_runs(runtime: str, parsed: str) -> None:
    from shared.spec import other_python

    spec, _ = parse_yaml(f"spec: {{handler: main:handler, runtime: '{runtime}'}}")
    assert spec.runtime == parsed and other_python(spec.runtime) == parsed.partition(":")[2]
    assert other_python(f"python:{HOST}") is None and other_python("myruntime") is None


def test_python_2_is_refused() -> None:
    assert "Python 2 reached its end of life" in yaml_error("spec: {handler: main:handler, runtime: 'python:2.7'}")


def test_env_as_mapping_and_duplicates() -> None:
    spec, warnings = parse_yaml("spec:\n  handler: main:handler\n  env: {A: 1, B: x, C: 1.5, D: false}\n")
    assert spec.env == {"A": "1", "B": "x", "C": "1.5", "D": "false"}
    spec, warnings = parse_yaml("spec:\n  handler: main:handler\n  env:\n  - {name: A, value: 1}\n  - {name: A, value: 2}\n")
    assert spec.env == {"A": "2"}
    assert any("'A' twice" in warning for warning in warnings)


@pytest.mark.parametrize("name, field", [("1ABC", "spec.env[0].name"), ("A-B", "spec.env[0].name")])
def test_invalid_env_names(name: str, field: str) -> None:
    message = yaml_error(f"spec:\n  handler: main:handler\n  env:\n  - {{name: '{name}', value: x}}\n")
    assert message.startswith(f"function.yaml: {field} {name!r} is not a valid variable name")


def test_env_name_read_as_bool_suggests_quoting() -> None:
    message = yaml_error("spec:\n  handler: main:handler\n  env: {yes: 1}\n")
    assert "spec.env.True" in message and "quote" in message


@pytest.mark.parametrize("name", ["NUCLIDE_TOKEN", "nuclide_x"])
def test_reserved_env_prefix_is_refused(name: str) -> None:
    message = yaml_error(f"spec:\n  handler: main:handler\n  env: {{{name}: x}}\n")
    assert f"spec.env.{name} {name!r} is reserved" in message


def test_replicas() -> None:
    spec, _ = parse_yaml("spec: {handler: main:handler, replicas: 3}")
    assert (spec.min_replicas, spec.max_replicas) == (3, 3)
    spec, _ = parse_yaml("spec: {handler: main:handler, minReplicas: 0}")
    assert (spec.min_replicas, spec.max_replicas) == (0, 1)
    spec, _ = parse_yaml("spec: {handler: main:handler, minReplicas: 5}")
    assert (spec.min_replicas, spec.max_replicas) == (5, 5)
    spec, warnings = parse_yaml("spec: {handler: main:handler, replicas: 3, maxReplicas: 2}")
    assert (spec.min_replicas, spec.max_replicas) == (1, 2)
    assert any("spec.replicas is ignored" in warning for warning in warnings)


@pytest.mark.parametrize(
    "body, field",
    [
        ("minReplicas: 65", "spec.minReplicas"),
        ("minReplicas: -1", "spec.minReplicas"),
        ("maxReplicas: 0", "spec.maxReplicas"),
        ("replicas: 100", "spec.replicas"),
        ("minReplicas: 3, maxReplicas: 2", "spec.minReplicas"),
        ("maxConcurrency: 0", "spec.maxConcurrency"),
        ("maxConcurrency: 1025", "spec.maxConcurrency"),
        ("targetConcurrency: 0", "spec.targetConcurrency"),
        ("targetConcurrency: 1025", "spec.targetConcurrency"),
    ],
)
def test_out_of_range_numbers_name_the_field(body: str, field: str) -> None:
    assert yaml_error(f"spec: {{handler: main:handler, {body}}}").startswith(f"function.yaml: {field} ")


@pytest.mark.parametrize(
    "value, seconds",
    [("30s", 30.0), ("2m", 120.0), ("500ms", 0.5), ("1m30s", 90.0), ("1h", 3600.0), (45, 45.0), (2.5, 2.5), ("'90'", 90.0)],
)
def test_timeout_values(value: object, seconds: float) -> None:
    spec, _ = parse_yaml(f"spec: {{handler: main:handler, timeout: {value}}}")
    assert spec.timeout_s == seconds


def test_timeout_aliases() -> None:
    spec, _ = parse_yaml("spec: {handler: main:handler, timeoutSeconds: 12}")
    assert spec.timeout_s == 12.0
    spec, warnings = parse_yaml("spec: {handler: main:handler, eventTimeout: 5s, timeout: 7s}")
    assert spec.timeout_s == 7.0
    assert "function.yaml: spec.eventTimeout is ignored because spec.timeout is set" in warnings


@pytest.mark.parametrize("value", ["0", "3601", "2h", "abc", "5 parsecs", "-1s", "true"])
def test_bad_timeouts_name_the_field(value: str) -> None:
    assert yaml_error(f"spec: {{handler: main:handler, timeout: {value}}}").startswith("function.yaml: spec.timeout ")


def test_idle_timeout_both_spellings() -> None:
    spec, _ = parse_yaml("spec: {handler: main:handler, idleTimeout: 90s}")
    assert spec.idle_timeout_s == 90.0
    spec, _ = parse_yaml("spec: {handler: main:handler, scaleToZero: {idleTimeout: 1m}, idleTimeout: 2m}")
    assert spec.idle_timeout_s == 60.0
    assert "spec.idleTimeout" in yaml_error("spec: {handler: main:handler, idleTimeout: 0}")


@pytest.mark.parametrize(
    "value, n_bytes",
    [("128Mi", 128 << 20), ("1Gi", 1 << 30), ("512M", 512_000_000), ("20000000", 20_000_000), ("16777216", 16 << 20),
     ("0.5Gi", 1 << 29), ("1e9", 1_000_000_000)],
)
def test_memory_quantities(value: str, n_bytes: int) -> None:
    spec, _ = parse_yaml(f"spec: {{handler: main:handler, resources: {{limits: {{memory: {value}}}}}}}")
    assert spec.memory_bytes == n_bytes


@pytest.mark.parametrize("value", ["1Mi", "15Mi", "lots", "12Xi", "-1Gi", "true"])
def test_bad_memory_names_the_field(value: str) -> None:
    message = yaml_error(f"spec: {{handler: main:handler, resources: {{limits: {{memory: {value}}}}}}}")
    assert message.startswith("function.yaml: spec.resources.limits.memory ")


@pytest.mark.parametrize("value, cpu", [("500m", 0.5), ("'1'", 1.0), ("2", 2.0), ("0.25", 0.25)])
def test_cpu_values(value: str, cpu: float) -> None:
    spec, _ = parse_yaml(f"spec: {{handler: main:handler, resources: {{limits: {{cpu: {value}}}}}}}")
    assert spec.cpu == cpu


@pytest.mark.parametrize("value", ["0", "-1", "abc", "true", "xm"])
def test_bad_cpu_names_the_field(value: str) -> None:
    message = yaml_error(f"spec: {{handler: main:handler, resources: {{limits: {{cpu: {value}}}}}}}")
    assert message.startswith("function.yaml: spec.resources.limits.cpu ")


def test_triggers_as_list() -> None:
    spec, _ = parse_yaml(
        """
        spec:
          handler: main:handler
          triggers:
            - {name: web, kind: http, attributes: {port: 80}}
            - {name: queue, kind: kafka-cluster, when: 2024-01-02}
        """
    )
    assert spec.triggers == (
        {"name": "web", "kind": "http", "attributes": {"port": 80}},
        {"name": "queue", "kind": "kafka-cluster", "when": "2024-01-02"},
    )


@pytest.mark.parametrize(
    "triggers, field",
    [
        ("[{kind: http}]", "spec.triggers[0].name"),
        ("{web: {attributes: {}}}", "spec.triggers.web.kind"),
        ("[{name: a, kind: http}, {name: a, kind: cron}]", "spec.triggers[1]"),
    ],
)
def test_bad_triggers_name_the_field(triggers: str, field: str) -> None:
    assert yaml_error(f"spec: {{handler: main:handler, triggers: {triggers}}}").startswith(f"function.yaml: {field} ")


def test_yaml_alias_bomb_in_triggers_is_bounded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    text = "\n".join(lines) + "\nspec:\n  handler: main:handler\n  triggers: {t: {kind: http, attributes: *a8}}\n"
    assert "more than 64 YAML aliases" in yaml_error(text)
    # as large without aliases: the trigger's own budget refuses it
    flat = "spec:\n  handler: main:handler\n  triggers: {t: {kind: http, attributes: [" + "x, " * 20_000 + "x]}}\n"
    message = yaml_error(flat)
    assert "spec.triggers.t" in message and "too large" in message


# --- requirements.txt ------------------------------------------------------------------------


def test_requirements_text_is_kept() -> None:
    text = "# deps\nrequests>=2 --hash=sha256:abc\nnumpy ; python_version >= '3.8'\n--prefer-binary\n"
    spec, _ = parse_function(archive_with(files={"requirements.txt": text}))
    assert spec.requirements == text


@pytest.mark.parametrize(
    "line",
    [
        "-e git+https://evil/x.git#egg=x",
        "-egit+https://evil/x.git",
        "--editable .",
        "--index-url https://evil/simple",
        "--index-url=https://evil/simple",
        "-i https://evil/simple",
        "--extra-index-url https://evil/simple",
        "--trusted-host evil",
        "-f https://evil/links",
        "--find-links=https://evil",
        "--ind https://evil/simple",
        "-r other.txt",
        "-c constraints.txt",
        "requests --index-url https://evil/simple",
    ],
)
def test_requirements_options_that_redirect_the_index_are_refused(line: str) -> None:
    text = f"requests\n# comment\n{line}\n"
    with pytest.raises(InvalidRequest) as exc_info:
        parse_function(archive_with(files={"requirements.txt": text}))
    message = exc_info.value.message
    assert message.startswith("requirements.txt line 3: ")
    assert line[:40] in message and "package index" in message


@pytest.mark.parametrize("line", [
    "pkg @ http://evil.example/pkg.tar.gz", "pkg@https://evil.example/pkg.whl", "pkg[extra] @ file:///etc/x",
    "https://evil.example/pkg-1.0-py3-none-any.whl", "git+https://evil.example/x.git#egg=x", "hg+ssh://h/x",
    "./vendored/pkg", "/abs/path/pkg.whl", "~/pkg", "file:///tmp/pkg", "svn+http://h/x",
])
def test_requirements_direct_urls_and_paths_are_refused(line: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        parse_function(archive_with(files={"requirements.txt": f"requests\n{line}\n"}))
    message = exc_info.value.message
    assert message.startswith("requirements.txt line 2: ") and "package index only" in message, message


@pytest.mark.parametrize("line", ["numpy ; python_version >= '3.8'", "pkg[a,b]>=1.0,<2", "requests --hash=sha256:ab12",
                                  "name.with.dots==1.0", "x~=1.4"])
def test_plain_requirements_with_markers_hashes_and_extras_pass(line: str) -> None:
    spec, _ = parse_function(archive_with(files={"requirements.txt": line + "\n"}))
    assert line in spec.requirements


def test_requirements_option_hidden_on_a_continuation_line_is_refused() -> None:
    text = "requests \\\n  --index-url https://evil/simple\n"
    with pytest.raises(InvalidRequest) as exc_info:
        parse_function(archive_with(files={"requirements.txt": text}))
    assert exc_info.value.message.startswith("requirements.txt line 1: ")


def test_requirements_comment_mentioning_an_option_is_fine() -> None:
    spec, _ = parse_function(archive_with(files={"requirements.txt": "requests  # not --index-url\n"}))
    assert "requests" in spec.requirements


def test_requirements_must_be_small_utf8() -> None:
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        parse_function(archive_with(files={"requirements.txt": b"\xff\xfe\x00r"}))
    with pytest.raises(InvalidRequest, match="over the 65536 limit"):
        parse_function(archive_with(files={"requirements.txt": "a\n" * 40000}))


# --- handler inference -----------------------------------------------------------------------


def test_inference_finds_the_single_handler_file() -> None:
    archive = Archive({"app.py": b"import os\nasync def handle(context, event):\n    pass\n", "util.py": b"x = 1\n"})
    spec, warnings = parse_function(archive)
    assert spec.handler == "app:handle" and warnings == []


def test_inference_prefers_handler_over_handle() -> None:
    archive = Archive({"app.py": b"def handle(c, e): pass\ndef handler(c, e): pass\n"})
    assert parse_function(archive)[0].handler == "app:handler"


def test_inference_ignores_nested_and_subfolder_definitions() -> None:
    archive = Archive({"main.py": b"class X:\n    def handler(self): pass\n", "lib/h.py": MAIN})
    with pytest.raises(InvalidRequest) as exc_info:
        parse_function(archive)
    message = exc_info.value.message
    assert "no handler found" in message and "function.yaml with spec.handler" in message


def test_inference_with_several_candidates_lists_them() -> None:
    archive = Archive({"a.py": MAIN, "b.py": b"def handle(c, e): pass\n"})
    with pytest.raises(InvalidRequest) as exc_info:
        parse_function(archive)
    message = exc_info.value.message
    assert "a:handler" in message and "b:handle" in message and "spec.handler" in message


def test_inference_mentions_files_that_do_not_parse() -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        parse_function(Archive({"main.py": b"def handler(:\n"}))
    assert "main.py could not be parsed" in exc_info.value.message


def test_fallback_module_is_used_without_function_yaml() -> None:
    archive = Archive({"a.py": MAIN, "b.py": b"def handle(c, e): pass\n"})
    assert parse_function(archive, fallback_handler_module="b")[0].handler == "b:handle"
    assert parse_function(archive, fallback_handler_module="c")[0].handler == "c:handler"
    with pytest.raises(InvalidRequest, match="is not a handler"):
        parse_function(archive, fallback_handler_module="my-module")


def test_yaml_without_handler_infers_and_warns() -> None:
    spec, warnings = parse_yaml("metadata: {name: fn}\nspec: {runtime: python}\n")
    assert spec.handler == "main:handler"
    assert "function.yaml: spec.handler missing; using 'main:handler'" in warnings


def test_yaml_without_handler_and_nothing_to_infer() -> None:
    message = yaml_error("spec: {}\n", {"main.py": b"x = 1\n"})
    assert message == "function.yaml: spec.handler is required, e.g. 'main:handler'"


def test_empty_yaml_means_defaults() -> None:
    spec, warnings = parse_yaml("")
    assert spec.handler == "main:handler"
    assert warnings == ["function.yaml: spec.handler missing; using 'main:handler'"]


def test_invalid_metadata_name_is_refused() -> None:
    message = yaml_error("metadata: {name: docs}\nspec: {handler: main:handler}\n")
    assert message.startswith("function.yaml: metadata.name: function name 'docs' is reserved")


# --- check_handler ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "def handler(c, e): pass\n",
        "async def handler(c, e): pass\n",
        "handler = lambda c, e: None\n",
        "handler: object = print\n",
        "a, (b, handler) = 1, (2, 3)\n",
        "from os.path import join as handler\n",
        "import handler\n",
        "class handler:\n    pass\n",
        "from somewhere import *\n",
        "try:\n    from fast import handler\nexcept ImportError:\n    def handler(c, e): pass\n",
        "if True:\n    handler = print\n",
        "with open('x') as handler:\n    pass\n",
    ],
)
def test_check_handler_accepts_top_level_bindings(source: str) -> None:
    check_handler(Archive({"main.py": source.encode()}), "main:handler")


@pytest.mark.parametrize(
    "source",
    [
        "def handle(c, e): pass\n",
        "def outer():\n    def handler(c, e): pass\n",
        "class X:\n    handler = 1\n",
        "handler: object\n",
        "import os.handler\n",
    ],
)
def test_check_handler_refuses_missing_function(source: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        check_handler(Archive({"main.py": source.encode()}), "main:handler")
    assert exc_info.value.message.startswith("handler 'main:handler' not found in main.py")


def test_check_handler_finds_dotted_modules_and_packages() -> None:
    archive = Archive({"a/b.py": MAIN, "pkg/__init__.py": MAIN})
    check_handler(archive, "a.b:handler")
    check_handler(archive, "pkg:handler")


def test_check_handler_missing_module() -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        check_handler(Archive({"main.py": MAIN}), "a.b:handler")
    assert exc_info.value.message.startswith("handler module 'a.b' not found: no a/b.py in the archive")


def test_check_handler_syntax_error_names_file_and_line() -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        check_handler(Archive({"main.py": b"x = 1\n\ndef handler(:\n"}), "main:handler")
    assert exc_info.value.message.startswith("main.py line 3: invalid syntax (")


def test_check_handler_refuses_malformed_handler() -> None:
    with pytest.raises(InvalidRequest, match="is not a handler"):
        check_handler(Archive({"main.py": MAIN}), "../etc:passwd")


def test_check_handler_refuses_nul_bytes() -> None:
    with pytest.raises(InvalidRequest, match=r"^main\.py: invalid syntax \(.*null bytes"):
        check_handler(Archive({"main.py": b"x = 1\x00\n"}), "main:handler")


# --- public helpers --------------------------------------------------------------------------


def test_parse_duration_s() -> None:
    assert parse_duration_s("1.5s", "f") == 1.5
    assert parse_duration_s("250us", "f") == pytest.approx(0.00025)
    assert parse_duration_s(0, "f") == 0.0
    for bad in ("", "1d", "s", True, None, [1], "nan", "inf", "1s2"):
        with pytest.raises(InvalidRequest) as exc_info:
            parse_duration_s(bad, "spec.x")
        assert exc_info.value.message.startswith("spec.x ")


def test_parse_memory_bytes() -> None:
    assert parse_memory_bytes(1024, "f") == 1024
    assert parse_memory_bytes("2Ki", "f") == 2048
    assert parse_memory_bytes("1k", "f") == 1000
    for bad in (0, -5, "", "Mi", True, 1.5, None, "1 Gi"):
        with pytest.raises(InvalidRequest) as exc_info:
            parse_memory_bytes(bad, "spec.mem")
        assert exc_info.value.message.startswith("spec.mem ")


def test_retry_settings_and_their_errors() -> None:
    spec, _ = parse_yaml(
        """
        spec:
          handler: main:handler
          retry:
            maxAttempts: 5
            backoff: {initial: 500ms, max: 10s, multiplier: 3}
            maxEventAge: 1h
        """
    )
    assert spec.retry == {"max_attempts": 5, "backoff_initial_s": 0.5, "backoff_max_s": 10.0,
                          "backoff_multiplier": 3.0, "max_event_age_s": 3600.0}
    for bad, needle in [("maxAttempts: 0", "spec.retry.maxAttempts"), ("maxAttempts: lots", "spec.retry.maxAttempts"),
                        ("backoff: {multiplier: 50}", "spec.retry.backoff.multiplier"),
                        ("backoff: {initial: 1m, max: 1s}", "spec.retry.backoff.initial"),
                        ("retries: 3", "spec.retry.retries")]:
        with pytest.raises(InvalidRequest) as info:
            parse_yaml(f"spec:\n  handler: main:handler\n  retry:\n    {bad}\n")
        assert needle in str(info.value), bad


@pytest.mark.parametrize("trigger,needle", [
    ("{kind: cron, attributes: {schedule: '61 * * * *'}}", "out of range"),
    ("{kind: cron, attributes: {schedule: 'every day'}}", "5 fields"),
    ("{kind: cron, attributes: {}}", "interval"),
    ("{kind: cron, attributes: {interval: soon}}", "interval"),
    ("{kind: topic, attributes: {}}", "attributes.topic"),
    ("{kind: http, attributes: {maxRequestBodySize: -1}}", "maxRequestBodySize must be a positive integer"),
    ("{kind: http, attributes: {maxRequestBodySize: 8Mi}}", "maxRequestBodySize must be a positive integer"),
])
def test_bad_triggers_fail_the_deploy_naming_the_field(trigger: str, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_yaml(f"spec:\n  handler: main:handler\n  triggers:\n    tick: {trigger}\n")
    assert needle in str(info.value) and "tick" in str(info.value)


def test_max_request_body_size_up_to_the_ceiling() -> None:
    from shared.triggers import max_body_bytes, validate_triggers

    text = "spec:\n  handler: main:handler\n  triggers:\n    web: {kind: http, attributes: {maxRequestBodySize: 9000}}\n"
    spec, _ = parse_function(archive_with(text), max_body_ceiling=9000)
    assert max_body_bytes(validate_triggers(spec.triggers)) == (9000, "web")
    with pytest.raises(InvalidRequest) as info:
        parse_function(archive_with(text), max_body_ceiling=8999)
    assert "spec.triggers.web.attributes.maxRequestBodySize (9000 bytes) is over the platform's ceiling of 8999" \
        in str(info.value)
    assert max_body_bytes(validate_triggers(parse_yaml("spec:\n  handler: main:handler\n")[0].triggers)) is None


def test_lambda_event_shape() -> None:
    assert parse_yaml("spec:\n  handler: main:handler\n")[0].lambda_event == "auto"
    assert parse_yaml("spec:\n  handler: main:handler\n  lambdaEvent: apigateway\n")[0].lambda_event == "apigateway"
    message = yaml_error("spec:\n  handler: main:handler\n  lambdaEvent: v1\n")
    assert "spec.lambdaEvent must be one of auto, payload, apigateway" in message


# --- hostile specs: bounded in time and memory ------------------------------------------------


def alias_bomb(levels: int, width: int = 9) -> str:
    """A billion-laughs document: each level lists the previous one ``width`` times by alias."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"spec:\n  handler: main:handler\n  minReplicas: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_with_many_aliases_is_refused_before_expanding() -> None:
    message = yaml_error(alias_bomb(9))  # 72 aliases, 387 million values once expanded
    assert "more than 64 YAML aliases" in message and "write the values out" in message


def test_alias_bomb_under_the_alias_cap_is_refused_by_its_expanded_size() -> None:
    message = yaml_error(alias_bomb(7))  # 54 aliases, 4.8 million values
    assert "expands to more than 100000 values" in message


def test_a_few_aliases_still_work() -> None:
    spec, _ = parse_yaml("""
        defaults: &limits {memory: 64Mi}
        spec:
          handler: main:handler
          resources: {limits: *limits}
    """)
    assert spec.memory_bytes == 64 * 1024 * 1024


def test_type_errors_quote_a_bounded_excerpt_of_a_huge_value() -> None:
    message = yaml_error(alias_bomb(4).replace("minReplicas", "handler2: 1\n  replicas"))
    assert "spec.replicas must be an integer, got list" in message and len(message) < 300, message


def test_oversized_function_yaml_is_refused_before_parsing() -> None:
    text = "spec:\n  handler: main:handler\n  description: " + "x" * (300 * 1024) + "\n"
    message = yaml_error(text)
    assert f"function.yaml is {len(text)} bytes, over the 262144 byte limit" in message


def test_sandbox_limits_and_network() -> None:
    spec, warnings = parse_yaml("""
        spec:
          handler: main:handler
          network: host
          resources: {limits: {pids: 64, ephemeral-storage: 32Mi}}
    """)
    assert (spec.pids, spec.scratch_bytes, spec.network, warnings) == (64, 32 << 20, "host", [])
    default, _ = parse_yaml("spec: {handler: main:handler}")
    assert (default.pids, default.scratch_bytes, default.network) == (None, None, "isolated")


@pytest.mark.parametrize("limits, field", [
    ("{pids: 8}", "spec.resources.limits.pids"), ("{pids: many}", "spec.resources.limits.pids"),
    ("{pids: 100000}", "spec.resources.limits.pids"),
    ("{ephemeral-storage: 1Ki}", "spec.resources.limits.ephemeral-storage"),
    ("{ephemeral-storage: lots}", "spec.resources.limits.ephemeral-storage"),
])
def test_bad_sandbox_limits_name_the_field(limits: str, field: str) -> None:
    assert field in yaml_error(f"spec: {{handler: main:handler, resources: {{limits: {limits}}}}}")


def test_an_unknown_network_is_refused_with_the_choices() -> None:
    message = yaml_error("spec: {handler: main:handler, network: bridge}")
    assert "spec.network" in message and "isolated" in message and "host" in message


def test_allow_calls_from_keeps_names_once_and_takes_a_star() -> None:
    spec, warnings = parse_yaml("spec: {handler: main:handler, private: true, allowCallsFrom: [b, a, b, '*']}")
    assert (spec.private, spec.allow_calls_from, warnings) == (True, ("b", "a", "*"), [])
    assert FunctionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("name, says", [
    ("bad name!", "use 1-63 letters, digits, '-' or '_'"), ("functions", "reserved for the API; choose another name"),
    ("x" * 64, "use 1-63 letters"), ("", "use 1-63 letters"),
])
def test_allow_calls_from_refuses_what_is_not_a_function_name(name: str, says: str) -> None:
    message = yaml_error(f"spec: {{handler: main:handler, private: true, allowCallsFrom: [ok, '{name}']}}")
    assert message.startswith("function.yaml: spec.allowCallsFrom[1] is not a function name: "), message
    assert says in message


def test_allow_calls_from_has_a_limit_and_says_to_use_the_star() -> None:
    names = ", ".join(f"f{i}" for i in range(257))
    message = yaml_error(f"spec: {{handler: main:handler, private: true, allowCallsFrom: [{names}]}}")
    assert "spec.allowCallsFrom names 257 functions, over the limit of 256" in message and '["*"]' in message


def test_allow_calls_from_on_a_public_function_is_warned_about() -> None:
    spec, warnings = parse_yaml("spec: {handler: main:handler, allowCallsFrom: [friend]}")
    assert spec.allow_calls_from == ("friend",)
    assert warnings == ["spec.allowCallsFrom has no effect: the function is not private, so any function may call"
                        " it; set spec.private: true to limit its callers"]
