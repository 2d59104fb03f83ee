#!/usr/bin/env python3
"""Run a command under failoverd.service's sandbox, without systemd (as root).

    python3 systemd/sandbox.py [--unit systemd/failoverd.service] --user 65534 \\
        --rw DIR [--rw DIR ...] [--kill] -- failoverd serve --config ...

What the unit's lines mean, done by hand: a private mount namespace where every mount is
read-only except the --rw directories (ProtectSystem=strict with StateDirectory= and
RuntimeDirectory=; /tmp too is read-only, stricter than PrivateTmp=) and /root and /home
empty (ProtectHome=, but for --expose directories), then setpriv to the
user with no capabilities at all and no_new_privs (User=, CapabilityBoundingSet=,
NoNewPrivileges=), then the kernel's memory-deny-write-execute (MemoryDenyWriteExecute=,
prctl PR_SET_MDWE, Linux 6.3) and a seccomp filter built from the unit's own
SystemCallFilter= lines, expanded by `systemd-analyze syscall-filter`, and its
RestrictAddressFamilies= (SystemCallArchitectures=native: libseccomp's filter admits
the native ABI only). A filtered call fails with the unit's SystemCallErrorNumber=, or
with --kill kills the process, so that a test sees any call the filter would deny.

Not reproduced (they need a booted systemd): ProtectKernel*/ProtectProc=/ProcSubset=
mounts, RestrictNamespaces=, LockPersonality=, LoadCredential=, the watchdog.
Stdlib only; needs util-linux (unshare, setpriv, mount) and libseccomp.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import re
import socket
import subprocess
import sys
import tempfile

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}
AF_MAX = 46  # Linux's address families run from 0 to 45


def scmp_act_errno(n: int) -> int:
    return 0x00050000 | (n & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def unit_settings(path: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^(\w+)=(.*)$", line.strip())
            if m:
                settings.setdefault(m.group(1), []).append(m.group(2).strip())
    return settings


def expand(names: list[str], seen: set[str] | None = None) -> set[str]:
    """Syscall names and @groups (as systemd-analyze lists them) to syscall names."""
    seen = set() if seen is None else seen
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        out = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True,
                             capture_output=True, text=True).stdout
        members = [w for line in out.splitlines()[1:] if not line.strip().startswith("#")
                   for w in line.split()]
        calls |= expand(members, seen)
    return calls


def syscall_sets(settings: dict[str, list[str]]) -> tuple[set[str], set[str]]:
    """The unit's SystemCallFilter= lines: (allowed, then denied) syscall names."""
    allow: set[str] = set()
    deny: set[str] = set()
    for value in settings.get("SystemCallFilter", []):
        if value.startswith("~"):
            deny |= expand(value[1:].split())
        else:
            allow |= expand(value.split())
    return allow - deny, deny


def apply_filter(settings: dict[str, list[str]], kill: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if settings.get("MemoryDenyWriteExecute") == ["yes"] and \
            libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE): Linux 6.3 or later needed")
    code = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    denied = SCMP_ACT_KILL_PROCESS if kill else scmp_act_errno(getattr(errno, code))
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    ctx = ctypes.c_void_p(seccomp.seccomp_init(denied))
    allow, _ = syscall_sets(settings)
    families = " ".join(settings.get("RestrictAddressFamilies", [])).split()
    for name in sorted(allow - {"socket"} if families else allow):
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # names of other architectures or newer kernels do not resolve
            seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
    if families:  # systemd answers a family not listed with EAFNOSUPPORT
        nr = seccomp.seccomp_syscall_resolve_name(b"socket")
        allowed = {FAMILIES[f] for f in families}
        for family in range(AF_MAX):
            action = SCMP_ACT_ALLOW if family in allowed else scmp_act_errno(errno.EAFNOSUPPORT)
            cmp = ArgCmp(0, SCMP_CMP_EQ, family, 0)
            seccomp.seccomp_rule_add_array(ctx, action, nr, 1, ctypes.byref(cmp))
    if seccomp.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load failed")


def hide_homes(exposed: list[str]) -> None:
    """ProtectHome=yes: /root and /home empty, but for the --expose directories (an
    interpreter installed under /root, as pyenv does; a host install under /opt needs none)."""
    staged = []
    for directory in exposed:
        stage = tempfile.mkdtemp()
        subprocess.run(["mount", "--bind", directory, stage], check=True)
        staged.append((directory, stage))
    for home in ("/root", "/home"):
        if os.path.isdir(home):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", home], check=True)
    for directory, stage in staged:
        os.makedirs(directory, exist_ok=True)
        subprocess.run(["mount", "--move", stage, directory], check=True)


def read_only_mounts(writable: list[str]) -> None:
    """Every mount read-only (as ProtectSystem=strict), the --rw directories writable."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted(set(points), key=len):
        if point.startswith(("/proc", "/sys", "/dev")):
            continue
        subprocess.run(["mount", "-o", "remount,bind,ro", point], capture_output=True)
    for directory in writable:
        subprocess.run(["mount", "--bind", directory, directory], check=True)
        subprocess.run(["mount", "-o", "remount,bind,rw", directory], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unit", default=os.path.join(os.path.dirname(__file__),
                                                   "failoverd.service"))
    ap.add_argument("--user", default="65534", help="uid (its gid is the same number)")
    ap.add_argument("--rw", action="append", default=[], help="a directory left writable")
    ap.add_argument("--expose", action="append", default=[],
                    help="a directory under /root or /home left visible (read-only)")
    ap.add_argument("--kill", action="store_true",
                    help="kill the process at a filtered call instead of failing the call")
    ap.add_argument("--stage", choices=["mounts", "filter"], help=argparse.SUPPRESS)
    ap.add_argument("command", nargs="+")
    args = ap.parse_args()
    this = [sys.executable, os.path.abspath(__file__), "--unit", args.unit]
    if args.kill:
        this.append("--kill")
    if args.stage is None:  # root: a mount namespace of our own
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", *this,
                              "--user", args.user, *(f"--rw={d}" for d in args.rw),
                              *(f"--expose={d}" for d in args.expose),
                              "--stage=mounts", "--", *args.command])
    if args.stage == "mounts":
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        hide_homes(args.expose)
        read_only_mounts(args.rw)
        os.execvp("setpriv", ["setpriv", f"--reuid={args.user}", f"--regid={args.user}",
                              "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                              "--no-new-privs", "--", *this, "--stage=filter", "--",
                              *args.command])
    apply_filter(unit_settings(args.unit), args.kill)
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    main()
