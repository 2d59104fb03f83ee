"""The systemd units: `systemd-analyze security` and `verify` on them, and the daemon at
work under the service's own sandbox (systemd/sandbox.py: its syscall filter, no
capabilities, no_new_privs, memory-deny-write-execute, a read-only file system, another
user), as far as a machine without a booted systemd can show it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import httpx2
import pytest
import trio

import failoverd as fo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = os.path.join(ROOT, "systemd", "failoverd.service")
SOCKET = os.path.join(ROOT, "systemd", "failoverd.socket")
SANDBOX = os.path.join(ROOT, "systemd", "sandbox.py")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(Debian: apt-get install systemd)")


def systemd_version() -> int:
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


@needs_analyze
def test_the_service_scores_at_most_2_on_systemd_analyze_security():
    done = subprocess.run([ANALYZE, "security", "--offline=yes", SERVICE],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for failoverd\.service: (\d+\.\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.0, done.stdout


def installed_units(tmp_path) -> str:
    """The units as installed, ExecStart= naming the failoverd of this interpreter
    (verify checks that the binary exists; /usr/local/bin/failoverd may not, here)."""
    binary = os.path.join(os.path.dirname(sys.executable), "failoverd")
    assert os.access(binary, os.X_OK), binary
    with open(SERVICE) as f:
        unit = f.read()
    rewritten = unit.replace("ExecStart=/usr/local/bin/failoverd ", f"ExecStart={binary} ")
    assert [a for a, b in zip(unit.splitlines(), rewritten.splitlines(), strict=True)
            if a != b] == ["ExecStart=/usr/local/bin/failoverd serve --config "
                           "/etc/failoverd/failoverd.toml"]
    (tmp_path / "failoverd.service").write_text(rewritten)
    shutil.copy(SOCKET, tmp_path / "failoverd.socket")
    return str(tmp_path)


@needs_analyze
def test_the_units_pass_systemd_analyze_verify(tmp_path):
    units = installed_units(tmp_path)

    done = subprocess.run([ANALYZE, "verify", f"{units}/failoverd.service",
                           f"{units}/failoverd.socket"], capture_output=True, text=True,
                          timeout=60)

    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@needs_analyze
def test_the_notify_reload_drop_in_passes_verify_on_systemd_253_and_later(tmp_path):
    if systemd_version() < 253:
        pytest.skip(f"Type=notify-reload needs systemd 253; this is {systemd_version()} (the "
                    "main unit's Type=notify serves it, as tested above)")
    units = installed_units(tmp_path)
    os.mkdir(f"{units}/failoverd.service.d")
    shutil.copy(os.path.join(ROOT, "systemd", "notify-reload.conf"),
                f"{units}/failoverd.service.d/")
    done = subprocess.run([ANALYZE, "verify", f"{units}/failoverd.service"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# -- the daemon inside the service's sandbox ------------------------------------------------


def sandbox_missing() -> str | None:
    if os.geteuid() != 0:
        return "the sandbox needs root (a mount namespace, then setpriv to another user)"
    for tool in ("systemd-analyze", "setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        import ctypes.util
        if ctypes.util.find_library("seccomp") is None:
            return "libseccomp is not installed"
    except ImportError:
        return "ctypes is missing"
    return None


NOBODY = 65534


def under_homes() -> list[str]:
    """This interpreter, its venv and the source tree, where ProtectHome= would hide them
    (pyenv lives in /root here; a host install under /opt/failoverd needs none)."""
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, ROOT)}
    return sorted(p for p in paths if p.startswith(("/root/", "/home/")))


def sandbox_config(run: str, state: str, base_url: str) -> str:
    confdir = tempfile.mkdtemp(dir="/tmp")
    os.chmod(confdir, 0o755)
    path = os.path.join(confdir, "failoverd.toml")
    with open(path, "w") as f:
        f.write(f'[daemon]\nsocket = "{run}/failoverd.sock"\nledger = "{state}/ledger.jsonl"\n'
                "shed_lag_s = 0\n"
                "[breakers]\nconsecutive_failures = 1\n"
                f'alert_command = ["/bin/sh", "-c", "cat >> {state}/alerts.jsonl"]\n'
                f'[providers.up]\nbase_url = "{base_url}"\n'
                f'[providers.bad]\nbase_url = "{base_url}"\n'
                '[providers.tls]\nbase_url = "https://127.0.0.1:9/v1"\n'  # loads the CA bundle
                '[routes.r]\nchain = ["up/m"]\n'
                '[routes.flaky]\nchain = ["bad/x", "up/m"]\n')
    os.chmod(path, 0o644)
    return path


def writable_by_nobody() -> str:
    directory = tempfile.mkdtemp(dir="/tmp")
    os.chown(directory, NOBODY, NOBODY)
    return directory


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:  # noqa: ASYNC230 -- called from sync code only
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def until_healthy(client: httpx2.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
    while True:
        assert proc.poll() is None, proc.communicate()[1].decode()
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        await trio.sleep(0.1)


def nonempty(path: str) -> bool:
    return os.path.exists(path) and os.path.getsize(path) > 0


async def until_file(path: str) -> None:
    while not nonempty(path):  # noqa: ASYNC110 -- another process writes it
        await trio.sleep(0.1)


def sandboxed(run: str, state: str, config: str) -> subprocess.Popen[bytes]:
    """`failoverd serve` as the unit would run it, through systemd/sandbox.py; --kill: a
    call the filter denies kills the daemon instead of failing with EPERM."""
    return subprocess.Popen(
        [sys.executable, SANDBOX, "--unit", SERVICE, "--kill", f"--user={NOBODY}",
         f"--rw={run}", f"--rw={state}", *(f"--expose={p}" for p in under_homes()), "--",
         sys.executable, "-m", "failoverd", "serve", "--config", config],
        stderr=subprocess.PIPE)


@pytest.mark.skipif(sandbox_missing() is not None, reason=str(sandbox_missing()))
async def test_the_daemon_serves_inside_the_units_sandbox(nursery):
    def script(model, body, n):
        return [("respond", 500, {}, b'{"error": {"message": "down"}}')] if model == "x" \
            else fo.token_script(["sand", "boxed"])

    upstream = fo.FakeUpstream(script)
    await nursery.start(upstream.serve)
    run, state = writable_by_nobody(), writable_by_nobody()
    config = sandbox_config(run, state, upstream.base_url)
    proc = sandboxed(run, state, config)
    transport = httpx2.AsyncHTTPTransport(uds=f"{run}/failoverd.sock")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    try:
        with trio.fail_after(60):
            async with httpx2.AsyncClient(transport=transport, base_url="http://fo") as client:
                await until_healthy(client, proc)
                status = proc_status(proc.pid)
                streamed = await client.post("/v1/chat/completions",
                                             json={**body, "model": "r", "stream": True})
                flaky = await client.post("/v1/chat/completions", json={**body, "model": "flaky"})
                await until_file(f"{state}/alerts.jsonl")  # alert_command ran, sandboxed too
                proc.send_signal(signal.SIGHUP)  # reload
                await trio.sleep(0.5)
                after = (await client.get("/status")).json()
            proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(proc.wait)
    finally:
        proc.kill()
        stderr = proc.communicate()[1].decode()
    assert code == 0, stderr  # a call the filter denies would have killed it (SIGSYS: -31)
    assert (status["Uid"].split()[0], status["Seccomp"], status["NoNewPrivs"],
            status["CapEff"], status["CapBnd"]) == (str(NOBODY), "2", "1", "0" * 16, "0" * 16)
    assert streamed.status_code == 200
    assert b'"sand"' in streamed.content
    assert flaky.json()["choices"][0]["message"]["content"] == "sandboxed"
    assert "config reloaded" in stderr
    assert after["draining"] is False
    with open(f"{state}/alerts.jsonl") as f:  # noqa: ASYNC230 -- after the daemon stopped
        assert '"to":"open"' in f.read()
    assert sorted(os.listdir(state)) == ["alerts.jsonl", "ledger.jsonl", "state.json"]


# What the sandbox refuses, so that a daemon passing through it shows something.
REFUSALS = [
    pytest.param("import mmap; mmap.mmap(-1, 4096, prot=7)", "PermissionError", id="W+X memory"),
    pytest.param("import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)",
                 "Address family not supported", id="an address family not listed"),
    pytest.param("open('/etc/failoverd-sandbox-test', 'w')", "Read-only file system",
                 id="writing outside --rw"),
]


@pytest.mark.skipif(sandbox_missing() is not None, reason=str(sandbox_missing()))
@pytest.mark.parametrize(("code", "error"), REFUSALS)
def test_the_sandbox_refuses_what_the_unit_forbids(code, error):
    done = subprocess.run(
        [sys.executable, SANDBOX, "--unit", SERVICE, f"--user={NOBODY}",
         *(f"--expose={p}" for p in under_homes()), "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert error in done.stderr


@pytest.mark.skipif(sandbox_missing() is not None, reason=str(sandbox_missing()))
def test_the_sandbox_kills_at_a_filtered_call_with_kill():
    done = subprocess.run(
        [sys.executable, SANDBOX, "--unit", SERVICE, "--kill", f"--user={NOBODY}",
         *(f"--expose={p}" for p in under_homes()), "--", sys.executable, "-c",
         "import os; print('before', flush=True); os.sched_setaffinity(0, {0})"],  # @resources
        capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (-signal.SIGSYS, "before\n")
