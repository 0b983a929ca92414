"""A private sshd on loopback for the launcher test: its own host key, config and authorized keys in a
temporary folder, stopped by PID. It never reads or writes the user's ~/.ssh or the system's sshd config.

Logins get ``HOME`` set to a folder of the test's (``SetEnv``), so what Ray's launcher writes to the
head's home (``~/ray_bootstrap_config.yaml``, ``~/.ray/auth_token``) stays in the test's folder too.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.helpers import system_tool


@dataclass
class PrivateSshd:
    port: int
    user: str
    client_key: Path
    remote_home: Path

    @property
    def proxy_command(self) -> str:
        """What Ray's ``auth.ssh_proxy_command`` runs to reach this port (ssh has no port option there)."""
        return f"{system_tool('nc')} 127.0.0.1 {self.port}"


def _keygen(path: Path) -> None:
    subprocess.run([system_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _listening(address: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((address, port)) == 0


@contextmanager
def private_sshd(
    folder: Path,
    remote_home: Path,
    bashrc: str,
    address: str = "127.0.0.1",
    port: int | None = None,
    inside: list[str] | None = None,
    keys_from: Path | None = None,
) -> Iterator[PrivateSshd]:
    """sshd on ``address`` (loopback) at ``port`` (a free one); ``bashrc`` is the login's ~/.bashrc (Ray's launcher
    sources it). ``inside`` prefixes its command (``ip netns exec NS``: a node of a namespace cluster);
    ``keys_from`` is another private sshd's folder whose host and client keys this one shares."""
    sshd = system_tool("sshd")  # Debian's openssh-server, which .ci/run installs
    folder.mkdir(parents=True, exist_ok=True)
    remote_home.mkdir(parents=True, exist_ok=True)
    (remote_home / ".bashrc").write_text(bashrc)
    if keys_from is None:
        _keygen(folder / "host_key")
        _keygen(folder / "client_key")
    else:
        for name in ("host_key", "host_key.pub", "client_key", "client_key.pub"):
            shutil.copy(keys_from / name, folder / name)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = port or free_port()
    (folder / "sshd_config").write_text(
        f"ListenAddress {address}:{port}\n"
        f"HostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\n"
        # The test's folders are not the user's home: their modes are not what StrictModes expects.
        "StrictModes no\n"
        f"SetEnv HOME={remote_home}\n"
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory (no service made it)
    log = open(folder / "sshd.log", "w")  # noqa: SIM115 - closed below
    command = [*(inside or []), sshd, "-D", "-e", "-f", str(folder / "sshd_config")]
    process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not _listening(address, port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(folder / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield PrivateSshd(port, getpass.getuser(), folder / "client_key", remote_home)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
