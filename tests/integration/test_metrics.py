"""GET /metrics against a real stack: OpenFaaS's families and nuclide's per function, and the scrape-only token."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.stack import Stack, function_yaml, parse_metrics, wait_for

pytestmark = pytest.mark.integration

FLAKY = ("def handler(context, event):\n"
         "    if event.body == b'fail':\n"
         "        raise RuntimeError('asked to fail')\n"
         "    return 'ok'\n")
CALLER = "def handler(context, event):\n    return context.call('mt-fn', b'ok')\n"
RETRY = {"maxAttempts": 2, "backoff": {"initial": "100ms", "max": "200ms", "multiplier": 2}}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose /metrics also takes a scrape-only token."""
    s = Stack(tmp_path_factory.mktemp("metrics") / "var", {"NUCLIDE_METRICS_TOKEN": "scrape-" + os.urandom(6).hex()})
    try:
        yield s.start()
    finally:
        s.stop()


def scrape_token(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.env['NUCLIDE_METRICS_TOKEN']}"}


def family_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if k.split("{")[0] == name and all(w in k.partition("{")[2].rstrip("}").split(",") for w in want))


def test_labelled_families_count_each_call_by_function_and_code(scraped: Stack) -> None:
    scraped.deploy("mt-fn", {"function.yaml": function_yaml("mt-fn", retry=RETRY), "main.py": FLAKY})
    for body in (b"a", b"fail", b"b", b"fail", b"c"):
        scraped.invoke("mt-fn", body)
    m = scraped.metrics()  # parsed by prometheus_client.parser.text_string_to_metric_families
    fn = 'function_name="mt-fn"'
    assert m[f'gateway_function_invocation_total{{code="200",{fn}}}'] == 3
    assert m[f'gateway_function_invocation_total{{code="500",{fn}}}'] == 2
    assert m[f"gateway_function_invocation_started{{{fn}}}"] == 5
    # one histogram per code; its count is the number of calls answered with it, +Inf holds them all
    for code, calls in (("200", 3), ("500", 2)):
        assert m[f'gateway_functions_seconds_count{{code="{code}",{fn}}}'] == calls
        assert m[f'gateway_functions_seconds_bucket{{code="{code}",{fn},le="+Inf"}}'] == calls
        buckets = [v for k, v in m.items() if k.startswith(f'gateway_functions_seconds_bucket{{code="{code}",{fn}')]
        assert buckets == sorted(buckets) and len(buckets) > 10
    ready = scraped.client.get("/functions/mt-fn").json()["replicas"]["ready"]
    assert ready >= 1 and m[f"gateway_service_count{{{fn}}}"] == ready
    assert m[f"nuclide_function_queue_depth{{{fn}}}"] == 0
    assert m[f'nuclide_function_deploy_seconds_count{{{fn},outcome="ok"}}'] == 1
    assert family_sum(m, "gateway_function_invocation_total") == family_sum(m, "gateway_functions_seconds_count")
    # a name no function has never becomes a label: the series stay bounded by the catalogue
    assert scraped.anon.post("/mt-nothing-here").status_code == 404
    assert "mt-nothing-here" not in scraped.client.get("/metrics").text


def test_async_calls_retries_and_dead_letters_are_labelled(scraped: Stack) -> None:
    scraped.deploy("mt-fn", {"function.yaml": function_yaml("mt-fn", retry=RETRY), "main.py": FLAKY})
    before = scraped.metrics()
    fn = 'function_name="mt-fn"'
    for body in (b"ok", b"fail"):
        assert scraped.anon.post("/mt-fn", content=body, headers={"X-Nuclide-Async": "true"}).status_code == 202
    key = f"nuclide_function_dead_letters_total{{{fn}}}"
    after = wait_for(lambda: (m := scraped.metrics()).get(key, 0) > before.get(key, 0) and m, 30,
                     what="the failing async call dead-lettered")

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew(f'nuclide_function_async_calls_total{{{fn},status="DONE"}}') == 1
    assert grew(f'nuclide_function_async_calls_total{{{fn},status="DEAD"}}') == 1
    assert grew(key) == 1
    assert grew(f"nuclide_function_retries_total{{{fn}}}") == 1  # maxAttempts 2: one retry
    # every attempt is an invocation: one success, two failures
    assert grew(f'gateway_function_invocation_total{{code="200",{fn}}}') == 1
    assert grew(f'gateway_function_invocation_total{{code="500",{fn}}}') == 2


def test_remote_task_calls_are_counted_from_the_call_graph(scraped: Stack) -> None:
    scraped.deploy("mt-fn", {"function.yaml": function_yaml("mt-fn", retry=RETRY), "main.py": FLAKY})
    scraped.deploy("mt-caller", {"function.yaml": function_yaml("mt-caller"), "main.py": CALLER})
    key = 'nuclide_task_calls_total{caller="mt-caller",function_name="mt-fn",mode="remote"}'
    before = scraped.metrics().get(key, 0)
    for _ in range(2):
        assert scraped.invoke("mt-caller").text == "ok"
    wait_for(lambda: scraped.metrics().get(key, 0) == before + 2, 10, what="two remote task calls in /metrics")


# ----- who may scrape ------------------------------------------------------------------------------------------


def test_the_scrape_token_reads_metrics_and_nothing_else(scraped: Stack, stack: Stack) -> None:
    scraped.deploy("mt-private", {"function.yaml": function_yaml("mt-private", private=True), "main.py": FLAKY})
    headers = scrape_token(scraped)
    r = scraped.anon.get("/metrics", headers=headers)
    assert r.status_code == 200 and parse_metrics(r)["nuclide_instances"] >= 1
    assert scraped.client.get("/metrics").status_code == 200  # the API token still reads it
    refused = {
        ("GET", "/functions"), ("GET", "/functions/mt-private"), ("GET", "/calls"), ("GET", "/groups"),
        ("GET", "/runtimes"), ("DELETE", "/mt-private"), ("PUT", "/mt-other"), ("POST", "/mt-private"),
        ("POST", "/functions/mt-private/invoke"), ("GET", "/functions/mt-private/logs"),
    }
    answers = {(method, path): scraped.anon.request(method, path, headers=headers).status_code
               for method, path in sorted(refused)}
    assert answers == {k: 401 for k in refused}
    assert scraped.client.get("/functions/mt-private").status_code == 200  # nothing was deleted
    r = scraped.anon.get("/metrics", headers={"Authorization": "Bearer scrape-wrong"})
    assert r.status_code == 401 and "token" in r.json()["error"]["message"]
    # a gateway without metrics_token: /metrics takes the API token only
    assert stack.anon.get("/metrics").status_code == 401
    assert stack.anon.get("/metrics", headers={"Authorization": "Bearer"}).status_code == 401  # an empty token
    assert stack.anon.get("/metrics", headers=headers).status_code == 401
    assert stack.client.get("/metrics").status_code == 200
