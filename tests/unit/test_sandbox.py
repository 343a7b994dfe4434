"""The sandbox command lines the deployer runs user code under (builds, instances, zygotes), without running them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.deployer import sandbox
from services.deployer.sandbox import ZYGOTE_CAPS, Mounts, base_env, wrap, zygote_argv
from shared.config import Settings

BWRAP = "/usr/bin/bwrap"


@pytest.fixture
def with_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: BWRAP if name == "bwrap" else None)
    monkeypatch.setattr(sandbox, "install_paths", lambda: (Path("/opt/py"),))
    # the host's part of the view, pinned: /usr (a directory everywhere) and two files of /etc
    monkeypatch.setattr(sandbox, "SYSTEM_DIRS", ("usr",))
    monkeypatch.setattr(sandbox, "ETC_FILES", ("hosts", "ssl/certs"))
    for key in sandbox.OPERATOR_PATH_KEYS:
        monkeypatch.delenv(key, raising=False)


def _pairs(cmd: list[str], option: str) -> list[tuple[str, str]]:
    return [(cmd[i + 1], cmd[i + 2]) for i, arg in enumerate(cmd) if arg == option]


def test_wrap_hides_state_binds_back_the_function_and_drops_privileges(tmp_path: Path, with_bwrap: None) -> None:
    var = tmp_path / "var"
    code, deps, secret = var / "functions" / "f" / "code", var / "envs" / "e", tmp_path / "cfg"
    secret.mkdir()
    cmd = wrap(Settings(var_dir=var), ["python", "-m", "services.runtime", "cfg.json"],
               Mounts(writable=(code,), readonly=(deps,), hidden=(secret, tmp_path / "absent")), code)
    assert cmd[0] == BWRAP and cmd[-5:] == ["--", "python", "-m", "services.runtime", "cfg.json"]
    binds = [src for src, _ in _pairs(cmd, "--ro-bind")]
    assert "/" not in binds and "/etc" not in binds and "/usr" in binds, "a minimal view, not the host's /"
    tmpfs = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--tmpfs"]
    assert tmpfs == ["/tmp", str(var.resolve())], "a secret outside every bound directory is simply not there"
    assert ("/opt/py", "/opt/py") in _pairs(cmd, "--ro-bind") and (str(deps), str(deps)) in _pairs(cmd, "--ro-bind")
    assert _pairs(cmd, "--bind") == [(str(code), str(code))]
    # order matters: the state directory is hidden first, then its allowed parts are bound back over it
    assert cmd.index(str(var.resolve())) < cmd.index("--bind") and cmd.index("/tmp") < cmd.index("/opt/py")
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--new-session"):
        assert flag in cmd
    assert cmd[cmd.index("--cap-drop") + 1] == "ALL" and "--cap-add" not in cmd
    assert cmd[cmd.index("--chdir") + 1] == str(code) and cmd.index("--chdir") < cmd.index("--")
    assert cmd.count("--") == 1


def test_sandbox_none_runs_the_argv_as_is_and_without_bwrap_nothing_runs(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["python", "x.py"]
    assert wrap(Settings(var_dir=tmp_path, sandbox="none"), argv, Mounts(), tmp_path) == argv
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    for mode in ("auto", "bwrap"):  # no silent fallback: auto needs bwrap too
        with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap slirp4netns"):
            wrap(Settings(var_dir=tmp_path, sandbox=mode), argv, Mounts(), tmp_path)


def test_zygote_keeps_only_the_capabilities_it_needs(tmp_path: Path, with_bwrap: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    var = tmp_path / "var"
    cmd = zygote_argv(Settings(var_dir=var), ["python", "-m", "services.runtime.zygote"])
    assert cmd is not None and cmd[-4:] == ["--", "python", "-m", "services.runtime.zygote"]
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--cap-add"] == list(ZYGOTE_CAPS)
    assert cmd[cmd.index("--cap-drop") + 1] == "ALL" and cmd.index("--cap-drop") < cmd.index("--cap-add")
    assert "--die-with-parent" in cmd and "--unshare-pid" not in cmd  # it makes PID namespaces for its children
    functions, envs = var.resolve() / "functions", var.resolve() / "envs"
    assert _pairs(cmd, "--bind") == [(str(functions), str(functions))] and (str(envs), str(envs)) in _pairs(cmd, "--ro-bind")
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    assert zygote_argv(Settings(var_dir=var), ["python"]) is None, "without root bwrap cannot hand it capabilities"


def test_user_code_gets_a_small_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUCLIDE_TOKEN", "secret")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = base_env(home="/work")
    assert env["HOME"] == "/work" and env["PATH"] == "/usr/bin:/bin" and env["PYTHONUNBUFFERED"] == "1"
    assert not [k for k in env if k.startswith("NUCLIDE_")] and "secret" not in env.values()
    # what builds need to reach a package index (a CA bundle, a proxy, a mirror) is passed through, nothing else
    passed = {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
              "PIP_CONSTRAINT", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy"}
    assert set(env) - passed == {"PATH", "HOME", "LANG", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "MALLOC_ARENA_MAX"}
    monkeypatch.setenv("PIP_FIND_LINKS", "/var/tmp/wheels")
    assert base_env()["PIP_FIND_LINKS"] == "/var/tmp/wheels" and base_env()["HOME"] == "/tmp"
    assert os.environ["NUCLIDE_TOKEN"] == "secret"


# --- the whole command lines, as golden lists (found by mutation testing: every flag and value counts) ------

PASSED_THROUGH = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                  "PIP_CONSTRAINT", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CONFIG_HOME with a nuclide folder in it (the CLI's token file lives there)."""
    (tmp_path / "cfg" / "nuclide").mkdir(parents=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    return tmp_path / "cfg"


def _view(var: Path) -> list[str]:
    """The minimal view of the with_bwrap fixture's host, for a state directory ``var`` (below /tmp); what is
    bound below ``var`` needs no parents made (the zygote and builds pass them as uid 0)."""
    var = var.resolve()
    cmd = [BWRAP, "--ro-bind", "/usr", "/usr", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    made = [Path("/etc"), Path("/etc/ssl"), Path("/opt")]
    made += [p for p in reversed(var.parents) if p not in (Path("/"), Path("/tmp"))]
    for path in made:
        cmd += ["--perms", "0755", "--dir", str(path)]
    for path in ("/etc/hosts", "/etc/ssl/certs", "/opt/py"):
        cmd += ["--ro-bind", path, path]
    return cmd + ["--tmpfs", str(var)]


def test_wrap_golden(tmp_path: Path, with_bwrap: None, config_home: Path) -> None:
    var = tmp_path / "var"
    code, deps = var / "functions" / "f" / "code", var / "envs" / "e"
    cmd = wrap(Settings(var_dir=var), ["python", "main.py"], Mounts((code,), (deps,), sandbox.hidden_paths()), code)
    assert cmd == _view(var) + [
        "--ro-bind", str(deps), str(deps), "--bind", str(code), str(code),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL", "--new-session",
        "--chdir", str(code), "--", "python", "main.py"]


def test_zygote_argv_golden(tmp_path: Path, with_bwrap: None, config_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    var = tmp_path / "var"
    functions, envs = var.resolve() / "functions", var.resolve() / "envs"
    link = var.resolve() / "run" / "link"
    caps = [arg for cap in ZYGOTE_CAPS for arg in ("--cap-add", cap)]
    expected = _view(var) + [
        "--ro-bind", str(envs), str(envs), "--ro-bind", str(link), str(link), "--bind", str(functions), str(functions),
        "--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL", *caps,
        "--new-session", "--die-with-parent", "--chdir", "/", "--", "python", "-m", "z"]
    assert zygote_argv(Settings(var_dir=var), ["python", "-m", "z"]) == expected
    assert functions.is_dir() and envs.is_dir()
    assert zygote_argv(Settings(var_dir=var), ["python", "-m", "z"]) == expected, "a second start finds them made"


def test_hidden_paths_default_to_the_users_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sandbox.hidden_paths() == (tmp_path / ".config" / "nuclide",)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "x"))
    assert sandbox.hidden_paths() == (tmp_path / "x" / "nuclide",)


def test_base_env_golden(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PATH", "LANG", *PASSED_THROUGH):
        monkeypatch.delenv(key, raising=False)
    fixed = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2"}
    assert base_env() == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", **fixed}
    monkeypatch.setenv("PATH", "/p")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    for key in PASSED_THROUGH:
        monkeypatch.setenv(key, f"v-{key}")
    assert base_env("/h") == {"PATH": "/p", "HOME": "/h", "LANG": "de_DE.UTF-8", **fixed,
                              **{key: f"v-{key}" for key in PASSED_THROUGH}}


def test_bwrap_required_but_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxUnavailable) as info:
        sandbox.bwrap_path(Settings(var_dir=tmp_path, sandbox="bwrap"))
    assert str(info.value) == ("the process backend's sandbox needs bubblewrap, which is not installed: "
                               + sandbox.INSTALL_HOW)


def test_install_paths_are_the_interpreter_and_the_checkout() -> None:
    import sys

    import services

    paths = sandbox.install_paths()
    assert paths == tuple(sorted({Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                                  Path(services.__file__).resolve().parent.parent}))
    assert Path("/") not in paths


def test_an_interpreter_installed_at_the_root_binds_nothing_over_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import services

    monkeypatch.setattr(sandbox, "sys", SimpleNamespace(prefix="/", base_prefix="/"))
    assert sandbox.install_paths() == (Path(services.__file__).resolve().parent.parent,)


def test_a_secret_inside_a_bound_directory_is_covered(tmp_path: Path, with_bwrap: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a home below the interpreter's prefix (an unusual layout): its config folder is covered by a tmpfs
    monkeypatch.setattr(sandbox, "install_paths", lambda: (tmp_path,))
    secret = tmp_path / "home" / ".config" / "nuclide"
    secret.mkdir(parents=True)
    cmd = wrap(Settings(var_dir=tmp_path / "var"), ["true"], Mounts(hidden=(secret,)), tmp_path)
    assert [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--tmpfs"][-1] == str(secret)
