"""The sandbox's signing key (made once, kept in the cache) and the repository's signatures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from sandbox.mirror.common import GNUPG_HOME, KEY_UID, KEYRING, _lock, _run


def _gpg(*args: str) -> subprocess.CompletedProcess[str]:
    return _run(["gpg", "--homedir", str(GNUPG_HOME), "--batch", "--no-tty", *args])


def _stop_agent() -> None:
    """gpg starts an agent for the key; it is not needed between builds."""
    subprocess.run(["gpgconf", "--homedir", str(GNUPG_HOME), "--kill", "all"], capture_output=True)


def fingerprint() -> str | None:
    if not GNUPG_HOME.exists():
        return None
    out = subprocess.run(
        ["gpg", "--homedir", str(GNUPG_HOME), "--batch", "--with-colons", "--list-keys"],
        capture_output=True,
        text=True,
    ).stdout
    fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
    return fprs[0] if fprs else None


def ensure_key() -> Path:
    """The sandbox's signing key (made once, kept in the cache) and its public keyring, which
    guests get as the source's ``Signed-By``. Returns the keyring path."""
    with _lock(".key.lock"):
        if fingerprint() is None:
            shutil.rmtree(GNUPG_HOME, ignore_errors=True)
            GNUPG_HOME.mkdir(parents=True, mode=0o700)
            try:
                _gpg("--passphrase", "", "--quick-gen-key", KEY_UID, "ed25519", "sign", "never")
            finally:
                _stop_agent()
            KEYRING.unlink(missing_ok=True)
        fpr = fingerprint()
        stamp = KEYRING.with_suffix(".fpr")
        if not KEYRING.exists() or not stamp.exists() or stamp.read_text().strip() != fpr:
            exported = subprocess.run(
                ["gpg", "--homedir", str(GNUPG_HOME), "--batch", "--export", str(fpr)],
                capture_output=True,
                check=True,
            ).stdout
            tmp = KEYRING.with_name(f".{KEYRING.name}.{os.getpid()}")
            tmp.write_bytes(exported)
            tmp.chmod(0o644)
            tmp.replace(KEYRING)
            stamp.write_text(f"{fpr}\n")
    return KEYRING


def _sign(dist: Path, fpr: str) -> None:
    try:
        common = ["--pinentry-mode", "loopback", "--passphrase", "", "--local-user", fpr, "--yes"]
        _gpg(*common, "--digest-algo", "SHA512", "--clearsign", "-o", str(dist / "InRelease"),
             str(dist / "Release"))  # fmt: skip
        _gpg(*common, "--digest-algo", "SHA512", "--armor", "--detach-sign",
             "-o", str(dist / "Release.gpg"), str(dist / "Release"))  # fmt: skip
    finally:
        _stop_agent()
