"""An SSH key pair kept as a Prefect block: the VM's login key."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    import fabric
    import paramiko


def fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (``SHA256:…``)."""
    parts = public_key.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def write_private(path: Path, data: str) -> Path:
    """Write a secret file created 0600 from the start (never briefly readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


class PublicKey:
    """The public half alone (what the cloud's keypair holds): enough to check that keypair,
    never enough to log in. The VM's own deployments use this; the private key stays with the
    operator."""

    def __init__(self, public_key: str):
        self.public_key = public_key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


class SSHKeyPair(CredentialsBlock):
    """The key pair the VM is created with, and that the flows log in with.

    Generate and store a new key::

        SSHKeyPair.generate(comment="alma-sails").save("sails-vm-key")

    Open a fabric connection without writing the key anywhere::

        conn = SSHKeyPair.load("sails-vm-key").connect("203.0.113.7")
    """

    _block_type_name = "SSH Key Pair"
    _block_type_slug = "ssh-key-pair"
    _description = "An SSH key pair: the OpenStack keypair of the VM and its login key."
    _logo_url = None

    username: str = Field(default="ubuntu", description="User to log in as.")
    private_key: SecretStr = Field(description="Private key in OpenSSH PEM format.")
    public_key: str = Field(description="Public key line ('ssh-ed25519 AAAA… comment').")
    passphrase: SecretStr | None = Field(default=None, description="Passphrase, if any.")

    @classmethod
    def generate(
        cls,
        kind: Literal["ed25519", "rsa"] = "ed25519",
        *,
        bits: int = 4096,
        comment: str = "sails-bootstrap",
        username: str = "ubuntu",
    ) -> SSHKeyPair:
        """A new key pair (ed25519 by default; RSA 4096 where ed25519 is not accepted)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        key = (
            ed25519.Ed25519PrivateKey.generate()
            if kind == "ed25519"
            else (rsa.generate_private_key(public_exponent=65537, key_size=bits))
        )
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        return cls(
            username=username,
            private_key=SecretStr(private),
            public_key=f"{public} {comment}".strip(),
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def pkey(self) -> paramiko.PKey:
        """The private key as a paramiko key object (in memory)."""
        import paramiko

        password = self.passphrase.get_secret_value() if self.passphrase else None
        text = self.private_key.get_secret_value()
        key_classes: tuple[type[paramiko.PKey], ...] = (
            paramiko.Ed25519Key,
            paramiko.RSAKey,
            paramiko.ECDSAKey,
        )
        for key_class in key_classes:
            try:
                return key_class.from_private_key(io.StringIO(text), password=password)
            except paramiko.SSHException:
                continue
        raise ValueError("the private key is not an ed25519, RSA or ECDSA key paramiko can read")

    def connect(self, host: str, port: int = 22, **kwargs: Any) -> fabric.Connection:
        """A fabric Connection logged in with this key (host key policy is the caller's)."""
        import fabric

        connect_kwargs = {"pkey": self.pkey(), "look_for_keys": False, "allow_agent": False}
        connect_kwargs.update(kwargs.pop("connect_kwargs", {}))
        return fabric.Connection(
            host, user=self.username, port=port, connect_kwargs=connect_kwargs, **kwargs
        )

    def get_client(self, *args: Any, **kwargs: Any) -> fabric.Connection:
        return self.connect(*args, **kwargs)

    def write_private_key(self, path: str | Path) -> Path:
        """Write the private key to a 0600 file, for tools that need a path (ssh, sshfs)."""
        return write_private(Path(path).expanduser(), self.private_key.get_secret_value())

    @contextlib.contextmanager
    def private_key_file(self) -> Iterator[Path]:
        """A 0600 temporary copy of the private key, removed on exit."""
        with tempfile.TemporaryDirectory(prefix="sails-key-") as tmp:
            yield self.write_private_key(Path(tmp) / "id")
