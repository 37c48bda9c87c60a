"""Security groups as the sandbox cloud enforces them, and what the product makes of a missing rule.

One provisioned VM serves every test here. It sits, as every environment's server does, in a
shared group (here one made by the test, empty, so that whatever rules the project's `default`
holds admit nothing) and in a group of its own that the product keeps equal to the config's
ingress rules, so removing its port-22 rule locks no other test's VM out.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.utilities.collections import deep_merge

from core.config import BootstrapConfig, dump_config, parse_config
from tests.fixtures.bootstrap import ssh_alias, start_cli

pytestmark = [pytest.mark.sandbox]


@dataclass
class SecuredVM:
    config: BootstrapConfig
    config_file: Path
    group_id: str
    server_id: str
    address: str
    shared_id: str  # the shared group the server also joins

    @property
    def guest(self) -> str:
        from sandbox.guests import firewall

        return firewall.guest_of_server(self.server_id)


@pytest.fixture(scope="module")
def secured_vm(
    sandbox_cloud: dict[str, str], prefect_server: Any, user_conn: Any, tmp_path_factory: Any
) -> Iterator[SecuredVM]:
    from flows.provision import provision
    from flows.teardown import teardown
    from sandbox import manager

    manager.up()
    env = f"t-sg-{uuid.uuid4().hex[:4]}"
    shared = user_conn.network.create_security_group(name=f"{env}-shared", description="test")
    home = tmp_path_factory.mktemp("secgroups")
    cfg = parse_config(
        {
            "environment": env,
            "ssh": {
                "key_block": f"{env}-key",
                "config_dir": str(home / "ssh"),
                "connect_timeout": 120,
            },
            "arc": {"enabled": False},
            "canfar": {"smoke_test": {"enabled": False}},
            "server": {
                "build_timeout": 180,
                "flavor": "p1-1.5gb",
                "security_group": f"{env}-shared",
            },
            "volume": {"size_gb": 1, "timeout": 120},
            "prefect": {"auth_block": f"{env}-prefect-auth"},
        },
        f"test config {env}",
    )
    cfg_file = home / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    try:
        result = provision(cfg)
        assert result.server and result.server.id and result.address
        group = next(r for r in result.records if r.kind == "security group")
        assert group.name == f"{env}-access" and group.id and group.action == "create"
        yield SecuredVM(cfg, cfg_file, group.id, result.server.id, result.address, shared.id)
    finally:
        with contextlib.suppress(Exception):
            teardown(cfg, delete_data_volume=True)
        user_conn.compute.delete_keypair(cfg.keypair_name, ignore_missing=True)
        user_conn.network.delete_security_group(shared.id, ignore_missing=True)
        # teardown took the environment's group with it
        assert list(user_conn.network.security_groups(name=f"{env}-access")) == []


def _rules(conn: Any, vm: SecuredVM, **match: Any) -> list[Any]:
    rules = conn.network.security_group_rules(security_group_id=vm.group_id, direction="ingress")
    return [r for r in rules if all(r[k] == v for k, v in match.items())]


def _ssh(vm: SecuredVM, command: str = "true") -> subprocess.CompletedProcess[str]:
    return ssh_alias(vm.config, command, "ConnectTimeout=4", "ConnectionAttempts=1", timeout=30)


def _tcp_answers(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex((address, port)) == 0


def _ping(address: str, wait: float = 2.0) -> bool:
    """One ICMP echo request (a raw socket: root, no ping binary needed); True on its reply."""
    # a fresh identifier each time: a reused one would match the last echo's conntrack entry
    ident, seq = random.getrandbits(16), random.getrandbits(16)
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    payload = b"sails-secgroups"
    data = header + payload + b"\0" * (len(payload) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    packet = struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                reply, (source, _) = s.recvfrom(1024)
            except TimeoutError:
                return False
            icmp = reply[(reply[0] & 0x0F) * 4 :]
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if source == address and kind == 0 and (rid, rseq) == (ident, seq):
                return True
    return False


def test_removed_port22_rule_cuts_ssh_health_names_it_provision_restores(
    secured_vm: SecuredVM, user_conn: Any, prefect_server: Any
) -> None:
    vm = secured_vm
    assert _ssh(vm).returncode == 0
    (rule,) = _rules(user_conn, vm, protocol="tcp", port_range_min=22)
    user_conn.network.delete_security_group_rule(rule.id)

    # The guest's namespace drops new connections as soon as Neutron answered the delete.
    assert not _tcp_answers(vm.address, 22)
    refused = _ssh(vm)
    assert refused.returncode == 255, refused.stdout
    assert "timed out" in refused.stderr, refused.stderr

    from flows.operate import health_check

    state = health_check(vm.config, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"security-group: security group {vm.config.security_group_name} lacks " in message
    assert "ingress tcp 22 from 0.0.0.0/0" in message, message
    assert "ingress tcp 4200" not in message and "ingress icmp" not in message, message

    proc = start_cli("provision", "--config", str(vm.config_file), env=prefect_server.env())
    assert proc.wait(timeout=600) == 0
    (restored,) = _rules(user_conn, vm, protocol="tcp", port_range_min=22)
    assert restored.remote_ip_prefix == "0.0.0.0/0" and restored.id != rule.id
    back = _ssh(vm, "whoami")
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == "ubuntu"


def test_guest_ruleset_follows_the_icmp_rule(secured_vm: SecuredVM, user_conn: Any) -> None:
    from sandbox.guests import firewall

    vm = secured_vm
    table = firewall.ruleset(vm.guest)
    assert "policy drop" in table and "tcp dport 22 accept" in table, table
    # the Prefect API port is not opened: the server is reached through SSH only
    assert "tcp dport 4200" not in table and "icmp accept" in table, table
    assert _ping(vm.address)

    (icmp,) = _rules(user_conn, vm, protocol="icmp")
    user_conn.network.delete_security_group_rule(icmp.id)
    try:
        table = firewall.ruleset(vm.guest)
        assert "icmp accept" not in table and "tcp dport 22 accept" in table, table
        assert not _ping(vm.address)
    finally:
        user_conn.network.create_security_group_rule(
            security_group_id=vm.group_id,
            direction="ingress",
            ethertype="IPv4",
            protocol="icmp",
            remote_ip_prefix="0.0.0.0/0",
        )
    assert "icmp accept" in firewall.ruleset(vm.guest)
    assert _ping(vm.address)


def test_a_narrowed_rule_replaces_the_wide_one(
    secured_vm: SecuredVM, user_conn: Any, prefect_server: Any, tmp_path: Path
) -> None:
    """Rules are reconciled both ways: narrowing a CIDR in the config removes the wide rule
    (so the narrowing takes effect), the project's shared group is left as it was, and
    widening it again restores the rule."""
    vm = secured_vm
    shared_rules = sorted(
        r["id"] for r in user_conn.network.get_security_group(vm.shared_id).security_group_rules
    )
    narrowed_rules = [
        {**r.model_dump(mode="json"), "cidr": "192.0.2.0/24"}
        if r.protocol == "icmp"
        else r.model_dump(mode="json")
        for r in vm.config.server.ingress
    ]
    narrowed = parse_config(
        deep_merge(vm.config.model_dump(mode="json"), {"server": {"ingress": narrowed_rules}}),
        "narrowed",
    )
    narrowed_file = tmp_path / "narrowed.yaml"
    narrowed_file.write_text(dump_config(narrowed))
    assert _ping(vm.address)

    from flows.provision import provision

    planned = provision(narrowed, plan=True)
    (group,) = [r for r in planned.records if r.kind == "security group"]
    assert group.action == "change" and not group.applied, group
    assert group.removed == ["icmp from 0.0.0.0/0"] and group.added == ["icmp from 192.0.2.0/24"]
    assert len(_rules(user_conn, vm, protocol="icmp")) == 1  # a plan changes nothing

    proc = start_cli("provision", "--config", str(narrowed_file), env=prefect_server.env())
    assert proc.wait(timeout=600) == 0
    (icmp,) = _rules(user_conn, vm, protocol="icmp")
    assert icmp.remote_ip_prefix == "192.0.2.0/24"
    assert not _ping(vm.address)  # the host is not in 192.0.2.0/24
    again = user_conn.network.get_security_group(vm.shared_id)
    assert sorted(r["id"] for r in again.security_group_rules) == shared_rules

    # A wide rule in the shared group is not ours to remove, but it is named: the config's
    # narrowing cannot take effect while it is there.
    wide = user_conn.network.create_security_group_rule(
        security_group_id=vm.shared_id,
        direction="ingress",
        ethertype="IPv4",
        protocol="icmp",
        remote_ip_prefix="0.0.0.0/0",
    )
    try:
        (group,) = [r for r in provision(narrowed, plan=True).records if r.kind == "security group"]
        assert "also admits icmp from 0.0.0.0/0" in group.reason, group.reason
    finally:
        user_conn.network.delete_security_group_rule(wide.id)

    proc = start_cli("provision", "--config", str(vm.config_file), env=prefect_server.env())
    assert proc.wait(timeout=600) == 0
    (icmp,) = _rules(user_conn, vm, protocol="icmp")
    assert icmp.remote_ip_prefix == "0.0.0.0/0"
    assert _ping(vm.address)


def test_dropped_ssh_connection_ends_the_command_in_flight(secured_vm: SecuredVM) -> None:
    from sandbox.guests import firewall

    vm = secured_vm
    ssh_config = Path(vm.config.ssh.config_dir) / "config"
    proc = subprocess.Popen(
        ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", vm.config.ssh.alias,
         "echo started; sleep 120; echo finished"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        assert firewall.drop_ssh_connections(vm.guest) >= 1
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 255, (out, err)
    assert "finished" not in out
    # ssh words it by where the reset caught it: "Connection reset", "closed", "Broken pipe"
    assert any(word in err.lower() for word in ("reset", "closed", "broken pipe")), err
    # The next connection works: only the sessions were dropped.
    again = _ssh(vm)
    assert again.returncode == 0, again.stderr


def test_host_keys_fail_closed_and_known_hosts_outlive_the_console(secured_vm: SecuredVM) -> None:
    """With the console's fingerprints scrolled away, commands still work against the known_hosts
    verified at provisioning. Host keys regenerated behind our back: fabric and OpenSSH refuse
    before sending anything, and provision names the key to check; trusting that fingerprint
    explicitly (--trust-host-key) makes it verified again."""
    from core.errors import HostKeyError
    from flows.provision import provision
    from sails_bootstrap.options import with_trusted
    from tasks.access import vm_for
    from tasks.cloud import open_connection
    from tasks.cloud.console import console_fingerprints
    from tasks.cloud.locate import locate_vm
    from tasks.local_ssh import scan_host_keys

    cfg, vm = secured_vm.config, secured_vm
    conn = open_connection(cfg)
    filler = _ssh(vm, "sudo sh -c 'yes console-filler | head -c 150000 > /dev/console'")
    assert filler.returncode == 0, filler.stderr
    deadline = time.monotonic() + 30
    while console_fingerprints(conn, vm.server_id, wait=0):
        assert time.monotonic() < deadline, "the fingerprints did not scroll off the console"
        time.sleep(0.5)
    target = locate_vm(conn, cfg)
    assert target.host_keys == []
    host = vm_for(cfg, target)
    try:
        assert host.run("echo verified").stdout == "verified\n"
    finally:
        host.close()

    regen = _ssh(
        vm,
        "sudo sh -c 'rm -f /etc/ssh/ssh_host_*_key* && ssh-keygen -A >/dev/null && "
        "(systemctl restart ssh || systemctl restart sshd)'",
    )
    assert regen.returncode == 0, regen.stderr
    new = sorted(fp_of(k) for k in scan_host_keys(vm.address))
    host = vm_for(cfg, target)
    with pytest.raises(HostKeyError) as refused:
        host.run("touch /tmp/should-not-exist")
    host.close()
    assert any(fp in str(refused.value) for fp in new), refused.value
    assert "--trust-host-key" in str(refused.value)
    alias = _ssh(vm, "touch /tmp/should-not-exist")
    assert alias.returncode == 255 and "IDENTIFICATION HAS CHANGED" in alias.stderr, alias.stderr
    # The server is past its boot: the console is read once, not waited on for the boot bound.
    settled = parse_config(
        deep_merge(cfg.model_dump(mode="json"), {"server": {"boot_timeout": 30}}), "settled"
    )
    with pytest.raises(HostKeyError, match="no fingerprints"):
        provision(settled)

    trusted = with_trusted(settled, new)
    again = provision(trusted)
    assert again.local_ssh and again.local_ssh.host_key_check == "trusted", again.local_ssh
    assert _ssh(vm, "test ! -e /tmp/should-not-exist").returncode == 0  # nothing ran before
    host = vm_for(trusted, locate_vm(conn, trusted))
    try:
        assert host.run("echo verified").stdout == "verified\n"
    finally:
        host.close()


def fp_of(key_line: str) -> str:
    from blocks.ssh import fingerprint

    return fingerprint(key_line)
