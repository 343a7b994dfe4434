"""Pure parts of the process backend's sandbox: instance uids, the view's directories, the seccomp program."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.deployer.sandbox import INSTANCE_UID_BASE, INSTANCE_UID_SPAN, _parents, instance_uid, problem
from shared.config import ConfigError, Settings


def test_instance_uids_are_stable_distinct_and_out_of_the_login_range() -> None:
    uids = {instance_uid(f"g-f-v1-{i:06x}") for i in range(2000)}
    assert len(uids) == 2000
    assert all(INSTANCE_UID_BASE <= u < INSTANCE_UID_BASE + INSTANCE_UID_SPAN for u in uids)
    assert instance_uid("g-a-v1-abc") == instance_uid("g-a-v1-abc")


def test_the_views_parent_directories_are_made_traversable_once_and_not_over_mounts() -> None:
    cmd = _parents([Path("/root/.pyenv/versions/3.11"), Path("/work/wt/x"), Path("/work/wt/x/.venv"),
                    Path("/etc/ssl/certs"), Path("/usr/lib/python3")])
    made = [cmd[i + 3] for i in range(0, len(cmd), 4)]
    assert cmd[:3] == ["--perms", "0755", "--dir"]
    assert made == ["/root", "/root/.pyenv", "/root/.pyenv/versions", "/work", "/work/wt", "/etc", "/etc/ssl"]


def test_sandbox_none_has_no_problem_and_a_warning() -> None:
    settings = Settings(sandbox="none")
    assert problem(settings) is None
    assert "unsandboxed" in (settings.sandbox_warning() or "")
    assert Settings().sandbox_warning() is None


def test_without_the_tools_the_problem_names_them_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    message = problem(Settings()) or ""
    assert "bwrap and slirp4netns" in message and "apt-get install bubblewrap slirp4netns" in message
    assert "NUCLIDE_SANDBOX=none" in message


def test_a_state_directory_too_deep_for_the_instances_socket_is_refused() -> None:
    with pytest.raises(ConfigError, match="var_dir .* too deep"):
        Settings(var_dir=Path("/tmp/" + "d" * 100)).validate()


def test_the_seccomp_program_is_bpf_for_this_machine() -> None:
    pytest.importorskip("pyseccomp")
    from shared.seccomp import BPF_INSTRUCTION_BYTES, compile_filter

    program = compile_filter()
    assert program and len(program) % BPF_INSTRUCTION_BYTES == 0
    assert len(program) // BPF_INSTRUCTION_BYTES > 40, "one check at least per denied call"


def test_the_operators_wheel_directories_and_ca_bundle_are_in_the_view(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from services.deployer.sandbox import OPERATOR_PATH_KEYS, operator_paths

    for key in OPERATOR_PATH_KEYS:
        monkeypatch.delenv(key, raising=False)
    wheels, more, bundle = tmp_path / "wheels", tmp_path / "more", tmp_path / "ca.pem"
    wheels.mkdir()
    more.mkdir()
    bundle.write_text("pem")
    monkeypatch.setenv("PIP_FIND_LINKS", f"{wheels} file://{more} https://mirror.invalid/simple relative/dir")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")  # in the view already
    assert operator_paths() == [bundle, wheels, more]
