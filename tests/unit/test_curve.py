"""CURVE keys: files and their modes, bad settings, instance keys bound to an instance, the ZAP decision."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

from shared.linkkeys import link_route
import zmq.utils.z85

from shared.config import ConfigError, Settings, load_settings
from shared.curve import (
    GROUP_WIDE, INSTANCE_DOMAIN, SERVICE_DOMAIN, KeyProblem, Keys, ZapHandler, load_or_create_keypair, memory_keys,
)


def test_a_services_keypair_is_made_once_private_and_its_public_half_readable(tmp_path: Path) -> None:
    keys = Keys.load(Settings(var_dir=tmp_path), "store")
    key_file = tmp_path / "keys" / "store.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "store.pub").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "keys" / "store.pub").read_bytes().strip() == keys.own.public
    assert keys.own.secret not in (tmp_path / "keys" / "store.pub").read_bytes()
    assert Keys.load(Settings(var_dir=tmp_path), "store").own == keys.own, "the same key on every start"
    assert "secret='***'" in repr(keys.own) and keys.own.secret.decode() not in repr(keys.own)
    gateway = Keys.load(Settings(var_dir=tmp_path), "gateway")
    seed = tmp_path / "keys" / "instance-seed"
    assert seed.stat().st_mode & 0o777 == 0o600 and gateway.seed
    assert gateway.public("store") == keys.own.public, "a service on the same machine reads the others' .pub"


def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    Keys.load(Settings(var_dir=tmp_path), "store")
    key_file = tmp_path / "keys" / "store.key"
    key_file.chmod(0o644)
    with pytest.raises(KeyProblem, match=r"readable by others \(mode 644\); make it private with `chmod 600 "):
        Keys.load(Settings(var_dir=tmp_path), "store")


def test_a_damaged_key_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "deployer.key"
    load_or_create_keypair(path)
    path.write_text("public = nonsense\nsecret = nonsense\n")
    with pytest.raises(KeyProblem, match="is damaged .*delete it to get a new key"):
        load_or_create_keypair(path)


def test_rotation_is_deleting_the_key_file(tmp_path: Path) -> None:
    old = Keys.load(Settings(var_dir=tmp_path), "store").own
    (tmp_path / "keys" / "store.key").unlink()
    new = Keys.load(Settings(var_dir=tmp_path), "store").own
    assert new.public != old.public
    assert (tmp_path / "keys" / "store.pub").read_bytes().strip() == new.public, "the .pub follows the new key"


@pytest.mark.parametrize("env,needle", [
    ({"NUCLIDE_INSTANCE_KEY_SEED": "not hex"}, "instance_key_seed must be at least 16 bytes in hex"),
    ({"NUCLIDE_INSTANCE_KEY_SEED": "abcd"}, "instance_key_seed must be at least 16 bytes in hex"),
])
def test_a_bad_seed_setting_is_refused_naming_it(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings("gateway", environ=env)


def test_a_bad_public_key_setting_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(KeyProblem, match="setting store_public_key is not a CURVE public key"):
        Keys.load(Settings(var_dir=tmp_path, store_public_key="short"), "gateway")
    other = zmq.curve_keypair()[0].decode()
    with pytest.raises(KeyProblem, match="setting store_public_key does not match this store's key file"):
        Keys.load(Settings(var_dir=tmp_path, store_public_key=other), "store")


def test_a_seed_from_settings_is_used_and_kept_out_of_files(tmp_path: Path) -> None:
    seed = os.urandom(32).hex()
    a = Keys.load(load_settings("gateway", environ={"NUCLIDE_VAR_DIR": str(tmp_path / "a"),
                                                    "NUCLIDE_INSTANCE_KEY_SEED": seed}), "gateway")
    b = Keys.load(load_settings("deployer", environ={"NUCLIDE_VAR_DIR": str(tmp_path / "b"),
                                                     "NUCLIDE_INSTANCE_KEY_SEED": seed}), "deployer")
    assert a.instance("i1", "g", 1) == b.instance("i1", "g", 1), "gateways on other machines derive the same keys"
    assert not (tmp_path / "a" / "keys" / "instance-seed").exists()


def test_an_instance_key_is_bound_to_its_instance_group_and_version() -> None:
    keys = memory_keys()
    pair = keys.instance("g-a-v1-000001", "g-a", 1)
    issued, route = pair.public.decode(), link_route(pair.secret, "g-a-v1-000001")
    assert keys.issued(issued, route, "g-a-v1-000001", "g-a", 1)
    assert not keys.issued(issued, route, "g-a-v1-000002", "g-a", 1), "another instance's identity"
    assert not keys.issued(issued, route, "g-a-v1-000001", "g-b", 1), "another group"
    assert not keys.issued(issued, route, "g-a-v1-000001", "g-a", 2), "another version"
    assert not keys.issued(zmq.curve_keypair()[0].decode(), route, "g-a-v1-000001", "g-a", 1), "a made-up key"
    assert not memory_keys().issued(issued, route, "g-a-v1-000001", "g-a", 1), "another stack's seed"
    assert not keys.issued(issued, b"g-a-v1-000001", "g-a-v1-000001", "g-a", 1), "the instance id as routing id"
    assert not keys.issued(None, route, "g-a-v1-000001", "g-a", 1), "no key at all"
    shared = keys.instance(GROUP_WIDE, "g-a", 1)  # Swarm's tasks of one group version
    task_route = link_route(shared.secret, "any-task-id")
    assert keys.issued(shared.public.decode(), task_route, "any-task-id", "g-a", 1)
    assert not keys.issued(shared.public.decode(), task_route, "any-task-id", "g-a", 2)
    assert not keys.issued(shared.public.decode(), task_route, "another-task", "g-a", 1), "a sibling's routing id"


def test_a_routing_id_needs_the_secret_key_and_is_one_libzmq_accepts() -> None:
    keys = memory_keys()
    pair = keys.instance("i", "g", 1)
    route = link_route(pair.secret, "i")
    assert route[:1] == b"r" and len(route) == 17, "libzmq keeps routing ids that start with a zero byte"
    assert route == link_route(pair.secret, "i") != link_route(pair.secret, "j")
    assert route != link_route(keys.instance("i", "g", 2).secret, "i"), "another key, another routing id"
    assert pair.public not in route and b"i" != route


def zap_request(domain: str, mechanism: bytes = b"CURVE", key: bytes | None = None) -> list[bytes]:
    frames = [b"1.0", b"7", domain.encode(), b"127.0.0.1", b"", mechanism]
    return frames + ([key] if key is not None else [])


def test_zap_admits_service_keys_only_on_service_sockets() -> None:
    ctx = zmq.Context()
    keys = memory_keys()
    zap = ZapHandler(ctx, keys)
    try:
        service = zmq.utils.z85.decode(keys.own.public)
        stranger = zmq.utils.z85.decode(zmq.curve_keypair()[0])
        ok = zap.decide(zap_request(SERVICE_DOMAIN, key=service))
        assert ok[2] == b"200" and ok[4] == keys.own.public, "the User-Id is the peer's public key"
        assert zap.decide(zap_request(SERVICE_DOMAIN, key=stranger))[2] == b"400"
        assert zap.decide(zap_request(SERVICE_DOMAIN, b"NULL"))[2] == b"400", "a plain peer"
        assert zap.decide(zap_request("no.such.domain", key=service))[2] == b"400"
        assert zap.decide([b"1.0"])[2] == b"400", "a malformed request"
        # the instance socket takes any CURVE key; the broker judges each message by it (test_broker_keys.py)
        assert zap.decide(zap_request(INSTANCE_DOMAIN, key=stranger))[2] == b"200"
        assert zap.decide(zap_request(INSTANCE_DOMAIN, b"NULL"))[2] == b"400"
    finally:
        zap.close()
        ctx.term()
