"""An offline stand-in for ansible-test's get-pip bootstrap script.

ansible-test downloads https://ci-files.testing.ansible.com/ansible-test/get-pip-<version>.py to bootstrap
pip in its virtual environments; machines that only reach package registries cannot. This script does the
same job: it installs pip with the standard library's ``ensurepip``, then lets that pip install the packages
ansible-test asked for (``pip==<version>``, ...). get-pip's own ``--no-setuptools``/``--no-wheel`` flags mean
nothing to ``pip install`` and are dropped; the system CA bundle is passed with ``--cert`` so a proxy's or
the distribution's CAs are trusted. scripts/ansible-test-offline puts it in ansible-test's cache only when
the real script cannot be downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

GET_PIP_ONLY_FLAGS = frozenset({"--no-setuptools", "--no-wheel", "--no-pip"})
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def main(argv: list[str]) -> int:
    subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"], check=True)
    options = [arg for arg in argv if arg not in GET_PIP_ONLY_FLAGS]
    bundle = next((path for path in CA_BUNDLES if os.path.isfile(path)), None)
    cert = ["--cert", bundle] if bundle else []
    return subprocess.run([sys.executable, "-m", "pip", "install", *cert, *options], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
