"""examples/install.sh into a temporary root (DESTDIR): the files it writes, their modes,
and the commands it leaves to root (user, venv, group, systemctl), printed in order."""

from __future__ import annotations

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "install.sh")


def install(destdir, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "DESTDIR": str(destdir),
                               "SYSTEMD_VERSION": "252", **env})


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def read(path) -> str:
    with open(path) as f:
        return f.read()


def test_install_writes_the_units_config_keys_directory_link_and_logrotate(tmp_path):
    done = install(tmp_path, AGENTS="alice bob")

    assert done.returncode == 0, done.stderr
    etc = tmp_path / "etc"
    for unit in ("failoverd.service", "failoverd.socket"):
        assert read(etc / "systemd/system" / unit) == read(os.path.join(ROOT, "systemd", unit))
        assert mode(etc / "systemd/system" / unit) == 0o644
    assert not (etc / "systemd/system/failoverd.service.d").exists()  # systemd 252
    assert read(etc / "failoverd/failoverd.toml") == read(
        os.path.join(ROOT, "examples", "failoverd.toml"))
    assert mode(etc / "failoverd/keys") == 0o700
    assert os.readlink(tmp_path / "usr/local/bin/failoverd") == "/opt/failoverd/bin/failoverd"
    rotate = read(etc / "logrotate.d/failoverd")
    assert "/var/lib/failoverd/ledger.jsonl {" in rotate
    assert "systemctl reload failoverd.service" in rotate
    assert "key needed: /etc/failoverd/keys/xai (root:root, 0600)" in done.stdout
    assert "key needed: /etc/failoverd/keys/openrouter (root:root, 0600)" in done.stdout


def test_install_prints_what_root_runs_in_order(tmp_path):
    done = install(tmp_path, AGENTS="alice bob")

    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert commands == [
        "useradd --system --user-group --home-dir /var/lib/failoverd --no-create-home "
        "--shell /usr/sbin/nologin failoverd",
        "python3 -m venv /opt/failoverd",
        f"/opt/failoverd/bin/pip install --quiet --upgrade {ROOT}",
        "usermod --append --groups failoverd alice",
        "usermod --append --groups failoverd bob",
        "systemctl daemon-reload",
        "env CREDENTIALS_DIRECTORY=/etc/failoverd/keys /usr/local/bin/failoverd check "
        "--config /etc/failoverd/failoverd.toml",
        "systemctl enable --now failoverd.socket",
    ]


def test_install_on_systemd_253_adds_the_notify_reload_drop_in(tmp_path):
    done = install(tmp_path, SYSTEMD_VERSION="255", PREFIX="/srv/fo")

    assert done.returncode == 0, done.stderr
    drop_in = tmp_path / "etc/systemd/system/failoverd.service.d/notify-reload.conf"
    assert "Type=notify-reload" in read(drop_in)
    assert os.readlink(tmp_path / "usr/local/bin/failoverd") == "/srv/fo/bin/failoverd"


def test_a_second_install_keeps_the_operators_config_and_keys(tmp_path):
    install(tmp_path)
    (tmp_path / "etc/failoverd/failoverd.toml").write_text("# mine\n")
    (tmp_path / "etc/failoverd/keys/xai").write_text("sk-xai")

    done = install(tmp_path)

    assert done.returncode == 0, done.stderr
    assert "kept /etc/failoverd/failoverd.toml" in done.stdout
    assert read(tmp_path / "etc/failoverd/failoverd.toml") == "# mine\n"
    assert read(tmp_path / "etc/failoverd/keys/xai") == "sk-xai"


def test_install_warns_about_a_credential_the_unit_does_not_load(tmp_path):
    config = tmp_path / "etc/failoverd/failoverd.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[providers.groq]\nbase_url = "https://api.groq.com/openai/v1"\n'
                      'credential = "groq"\n')

    done = install(tmp_path)

    assert "add LoadCredential=groq:/etc/failoverd/keys/groq to a drop-in" in done.stderr
    assert "key needed: /etc/failoverd/keys/groq" in done.stdout

