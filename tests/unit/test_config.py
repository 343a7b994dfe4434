"""Settings: precedence, types, failing fast, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, Secret, load_settings


def test_defaults_are_local_and_safe() -> None:
    s = load_settings("gateway", environ={})
    assert s.http_host == "127.0.0.1" and s.http_port == 8000
    assert s.gateway_router == "tcp://127.0.0.1:5560" and s.store_rpc == "tcp://127.0.0.1:5550"
    assert s.backend == "process" and s.var_dir == Path("var")


def test_service_specific_env_wins_over_common_then_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http_port: 7000\nqueue_limit: 5\ngateway:\n  queue_limit: 6\n")
    env = {"NUCLIDE_CONFIG": str(cfg), "NUCLIDE_HTTP_PORT": "7100", "NUCLIDE_GATEWAY_HTTP_PORT": "7200"}
    assert load_settings("gateway", environ=env).http_port == 7200
    assert load_settings("store", environ=env).http_port == 7100
    assert load_settings("gateway", environ={"NUCLIDE_CONFIG": str(cfg)}).queue_limit == 6
    assert load_settings("store", environ={"NUCLIDE_CONFIG": str(cfg)}).queue_limit == 5


@pytest.mark.parametrize("env,needle", [
    ({"NUCLIDE_HTTP_PORT": "eighty"}, "NUCLIDE_HTTP_PORT"),
    ({"NUCLIDE_HTTP_PORT": "70000"}, "out of range"),
    ({"NUCLIDE_BACKEND": "kubernetes-maybe"}, "backend"),
    ({"NUCLIDE_STOP_INSTANCES_ON_EXIT": "perhaps"}, "NUCLIDE_STOP_INSTANCES_ON_EXIT"),
    ({"NUCLIDE_DOCKER_POOL_SIZE": "two"}, "NUCLIDE_DOCKER_POOL_SIZE"),
    ({"NUCLIDE_DOCKER_POOL_SIZE": "-1"}, "docker_pool_size -1 is out of range 0-64"),
    ({"NUCLIDE_DOCKER_POOL_SIZE": "1000"}, "0 disables the pool"),
    ({"NUCLIDE_MAX_BODY_CEILING_BYTES": "1024"}, "max_body_ceiling_bytes 1024 must be at least max_body_bytes"),
    ({"NUCLIDE_MAX_BODY_CEILING_BYTES": str(1 << 30)}, "half the largest message"),
    ({"NUCLIDE_FUSIONIZER_MODE": "true", "NUCLIDE_HTTP_HOST": "0.0.0.0"}, "must listen on loopback only"),
    ({"NUCLIDE_PORT_BASE": "9k"}, "setting NUCLIDE_PORT_BASE has an invalid value '9k'; expected a whole number"),
    ({"NUCLIDE_PORT_BASE": "65529"}, "port_base 65529 is out of range 1-65528: the stack takes ports 65529 to 65536;"
                                     " choose a base in range with NUCLIDE_PORT_BASE=N or `nuclide up --port-base N`"),
    ({"NUCLIDE_PORT_BASE": "-8"}, "port_base -8 is out of range 1-65528"),
    ({"NUCLIDE_TOKEN": "same", "NUCLIDE_METRICS_TOKEN": "same"}, "metrics_token is the API token"),
    ({"NUCLIDE_METRICS_TOKEN": "two words"}, "metrics_token has spaces in it"),
    ({"NUCLIDE_AUTOSCALE_PANIC_WINDOW_S": "90"}, "autoscale_panic_window_s (90) <= autoscale_stable_window_s (60)"),
    ({"NUCLIDE_AUTOSCALE_TICK_S": "0"}, "0 < autoscale_tick_s (0)"),
    ({"NUCLIDE_AUTOSCALE_STABLE_WINDOW_S": "a minute"}, "NUCLIDE_AUTOSCALE_STABLE_WINDOW_S"),
    ({"NUCLIDE_AUTOSCALE_PANIC_THRESHOLD": "0.5"}, "autoscale_panic_threshold 0.5 must be at least 1"),
])
def test_bad_values_fail_fast_naming_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings("gateway", environ=env)
    assert needle in str(info.value)


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("htp_port: 1\n")
    with pytest.raises(ConfigError, match="htp_port"):
        load_settings("gateway", environ={"NUCLIDE_CONFIG": str(cfg)})


def test_token_hides_itself() -> None:
    s = load_settings("gateway", environ={"NUCLIDE_TOKEN": "s3cret", "NUCLIDE_METRICS_TOKEN": "scr4pe"})
    assert isinstance(s.token, Secret) and s.token == "s3cret"
    assert isinstance(s.metrics_token, Secret) and s.metrics_token == "scr4pe"
    assert "s3cret" not in repr(s) and "scr4pe" not in repr(s)


def test_child_env_round_trips() -> None:
    s = load_settings("gateway", environ={"NUCLIDE_HTTP_PORT": "8123", "NUCLIDE_STOP_INSTANCES_ON_EXIT": "yes"})
    again = load_settings("gateway", environ=s.child_env())
    assert again == s


def test_fusionizer_mode_on_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert load_settings("gateway", environ={"NUCLIDE_FUSIONIZER_MODE": "1", "NUCLIDE_HTTP_HOST": host}).fusionizer_mode


def test_port_base_derives_every_port_and_a_port_set_on_its_own_wins(tmp_path: Path) -> None:
    s = load_settings("gateway", environ={"NUCLIDE_PORT_BASE": "9000"})
    assert [(key, port) for key, _host, port in s.ports()] == [
        ("http_port", 9000), ("store_rpc", 9001), ("store_pub", 9002), ("deployer_rpc", 9003),
        ("gateway_router", 9004), ("gateway_pull", 9005), ("gateway_sub", 9006), ("gateway_pub", 9007)]
    assert s.http_url == "http://127.0.0.1:9000" and s.store_rpc == "tcp://127.0.0.1:9001"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port_base: 9100\nstore_pub: tcp://127.0.0.1:7001\n")
    s = load_settings("gateway", environ={"NUCLIDE_CONFIG": str(cfg), "NUCLIDE_HTTP_PORT": "7000"})
    assert (s.http_port, s.store_pub, s.store_rpc, s.gateway_pub) == (
        7000, "tcp://127.0.0.1:7001", "tcp://127.0.0.1:9101", "tcp://127.0.0.1:9107")
    assert load_settings("gateway", environ={"NUCLIDE_PORT_BASE": "9000"}, port_base=9200).http_port == 9200
    assert load_settings("gateway", environ={"NUCLIDE_PORT_BASE": "0"}) == load_settings("gateway", environ={})


def test_port_base_round_trips_to_children() -> None:
    s = load_settings("up", environ={"NUCLIDE_PORT_BASE": "9000", "NUCLIDE_STORE_RPC": "tcp://127.0.0.1:7001"})
    assert load_settings("store", environ=s.child_env()) == s


def test_database_url_picks_the_database_and_never_shows_its_password() -> None:
    assert load_settings(environ={}).database_url == ""  # SQLite in var_dir, the embedded default
    url = "postgresql://nuclide:s3cret@db.example:5433/nuclide"
    settings = load_settings(environ={"NUCLIDE_DATABASE_URL": url})
    assert settings.database_url == url and "s3cret" not in repr(settings)
    assert settings.child_env()["NUCLIDE_DATABASE_URL"] == url
    with pytest.raises(ConfigError, match="database_url starts with 'mysql'.*postgresql://") as info:
        load_settings(environ={"NUCLIDE_DATABASE_URL": "mysql://root:s3cret@db/x"})
    assert "s3cret" not in str(info.value)
    from services.store.pg import describe_url

    assert describe_url(url) == "postgresql://nuclide@db.example:5433/nuclide"
