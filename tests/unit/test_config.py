from __future__ import annotations

from pathlib import Path

import pytest

from core.config import BootstrapConfig, ConfigError, load_config, parse_config
from core.settings import IngressRule

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_reproduce_the_seed() -> None:
    c = BootstrapConfig()
    assert c.server.image == "Ubuntu-24.04-Noble-x64-2024-06"
    assert c.server.flavor == "c1-7.5gb-36"
    assert [(r.protocol, r.port, r.cidr) for r in c.server.ingress] == [
        ("icmp", None, "0.0.0.0/0"),
        ("tcp", 22, "0.0.0.0/0"),
    ]  # the seed's TCP 4200 stays closed: the API is reached through SSH
    assert all(r.ethertype == "IPv4" for r in c.server.ingress)
    assert (c.volume.size_gb, c.volume.mount_point, c.volume.owner) == (50, "/mnt/pspace", "ubuntu")
    assert c.volume.device_hint == "/dev/vdc"
    assert c.ssh.alias == "prefect-vm"
    assert (c.arc.host, c.arc.port) == ("ws-uv.canfar.net", 64022)
    assert c.arc.options == ["reconnect", "ServerAliveInterval=15", "ServerAliveCountMax=10"]
    assert (c.arc.mount_point, c.arc.key_path) == ("~/canfar_arc", "~/.ssh/canfar_key")
    assert c.prefect.port == 4200
    assert c.prefect.home == "/mnt/pspace/prefect-data"
    assert c.prefect.venv == "/mnt/pspace/prefect-env"
    pools = {p.name: p.concurrency for p in c.prefect.work_pools}
    assert pools["vm-runs"] == 2 and pools["headless-runs"] == 12
    assert "pipeline-state-monitoring" in pools


def test_names_derive_from_the_environment() -> None:
    c = parse_config({"environment": "test-2"})
    assert (c.keypair_name, c.server_name, c.volume_name) == (
        "test-2-key",
        "test-2-vm",
        "test-2-pspace",
    )
    assert c.tag == "sails-bootstrap:test-2"


@pytest.mark.parametrize(
    ("data", "field", "fix"),
    [
        (
            {"server": {"ingress": [{"protocol": "tcp", "port": 22, "cidr": "10.0.0.1/33"}]}},
            "server.ingress.0.cidr",
            "CIDR notation",
        ),
        (
            {"server": {"ingress": [{"protocol": "tcp", "port": 22, "cidr": "10.0.0.1/24"}]}},
            "server.ingress.0.cidr",
            "no host bits",
        ),
        (
            {"server": {"ingress": [{"protocol": "tcp", "port": 70000}]}},
            "server.ingress.0.port",
            "less than or equal to 65535",
        ),
        ({"server": {"ingress": [{"protocol": "tcp"}]}}, "server.ingress.0", "needs a 'port'"),
        ({"server": {"ingress": [{"protocol": "icmp", "port": 8}]}}, "server.ingress.0", "no port"),
        ({"prefect": {"port": 0}}, "prefect.port", "greater than or equal to 1"),
        ({"volume": {"size_gb": 0}}, "volume.size_gb", "greater than or equal to 1"),
        ({"volume": {"mount_point": "pspace"}}, "volume.mount_point", "absolute path"),
        ({"environment": ""}, "environment", "lowercase letters"),
        ({"environment": "Alma_Sails"}, "environment", "lowercase letters"),
        ({"server": {"image": "  "}}, "server.image", "at least 1 character"),
        ({"sever": {}}, "sever", "unknown key"),
        ({"server": {"flavour": "x"}}, "server.flavour", "unknown key"),
        ({"ssh": {"operator_keys": ["not a key"]}}, "ssh.operator_keys", "public key"),
        ({"prefect": {"work_pools": [{"name": "a"}, {"name": "a"}]}}, "work_pools", "twice"),
        ({"prefect": {"work_pools": [{"name": "vm-runs"}]}}, "work_pools", "sails-bootstrap"),
        (
            {"arc": {"enabled": False}, "backup": {"destination": "arc"}},
            "backup.destination",
            "backup.destination: local",
        ),
        ({"backup": {"arc_dir": "/backups"}}, "backup.arc_dir", "below arc.mount_point"),
        ({"backup": {"keep": 0}}, "backup.keep", "greater than or equal to 1"),
        ({"prefect": {"user": "ubuntu"}}, "prefect.user", "the login user (server.user)"),
        ({"prefect": {"user": "root"}}, "prefect.user", "a user of its own"),
        (
            {"server": {"user": "debian"}, "prefect": {"user": "debian"}},
            "prefect.user",
            "who has sudo",
        ),
        ({"prefect": {"uid": 0}}, "prefect.uid", "greater than or equal to 1000"),
        (
            {"prefect": {"database": {"kind": "mysql"}}},
            "prefect.database.kind",
            "'sqlite' or 'postgresql'",
        ),
        (
            {"prefect": {"database": {"switch": True}}},
            "prefect.database.switch",
            "set prefect.database.kind: postgresql too",
        ),
        (
            {"prefect": {"database": {"kind": "postgresql", "data_directory": "/var/lib/pg"}}},
            "prefect.database.data_directory",
            "below volume.mount_point (/mnt/pspace), e.g. /mnt/pspace/postgres",
        ),
        (
            {"prefect": {"database": {"kind": "postgresql", "data_directory": "/mnt/pspace"}}},
            "prefect.database.data_directory",
            "not on the volume",
        ),
        (
            {
                "prefect": {
                    "database": {
                        "kind": "postgresql",
                        "data_directory": "/mnt/pspace/prefect-data/pg",
                    }
                }
            },
            "prefect.database.data_directory",
            "overlaps prefect.home",
        ),
        (
            {
                "prefect": {
                    "database": {
                        "kind": "postgresql",
                        "data_directory": "/mnt/pspace/sails-bootstrap",
                    }
                }
            },
            "prefect.database.data_directory",
            "overlaps this package's code",
        ),
        (
            {"prefect": {"database": {"kind": "postgresql", "port": 4200}}},
            "prefect.database.port",
            "is prefect.port",
        ),
        ({"prefect": {"database": {"port": 80}}}, "prefect.database.port", "1024"),
        ({"prefect": {"database": {"user": "prefect-db"}}}, "prefect.database.user", "no dashes"),
        ({"prefect": {"database": {"name": "Prefect"}}}, "prefect.database.name", "lowercase"),
        (
            {"prefect": {"database": {"password_block": "sails-prefect-auth"}}},
            "prefect.database.password_block",
            "name a block of its own",
        ),
    ],
)
def test_bad_input_names_field_and_fix(data: dict, field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    message = str(info.value)
    assert field in message, message
    assert fix in message, message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"volume": {"owner": "ubuntu\nExecStartPre=/bin/sh"}}, "volume.owner"),
        ({"server": {"user": "ubuntu; rm -rf /"}}, "server.user"),
        ({"prefect": {"user": "sails\nExecStartPre=/bin/sh"}}, "prefect.user"),
        ({"prefect": {"venv": "/mnt/pspace/$(reboot)"}}, "prefect.venv"),
        ({"prefect": {"home": "/mnt/pspace/../../etc"}}, "prefect.home"),
        ({"volume": {"mount_point": "/mnt/p space"}}, "volume.mount_point"),
        ({"arc": {"mount_point": "~/../../root"}}, "arc.mount_point"),
        ({"arc": {"key_path": "~/.ssh/key`id`"}}, "arc.key_path"),
        ({"arc": {"options": ["reconnect", "ProxyCommand=nc evil 22"]}}, "arc.options"),
        ({"arc": {"options": ["ServerAliveInterval=15,ProxyCommand=x"]}}, "arc.options"),
        ({"arc": {"options": ["reconnect=yes"]}}, "arc.options"),
        ({"arc": {"host": "host -oProxyCommand=x"}}, "arc.host"),
        ({"arc": {"user": "-oProxyCommand=x"}}, "arc.user"),
        ({"arc": {"remote_path": "/arc\nExecStart=/bin/sh"}}, "arc.remote_path"),
        ({"volume": {"device_hint": "/dev/vdc; reboot"}}, "volume.device_hint"),
        ({"prefect": {"version": "3.9.1 --index-url http://evil"}}, "prefect.version"),
        (
            {"prefect": {"package_index": "http://mirror/simple' ; reboot '"}},
            "prefect.package_index",
        ),
        ({"prefect": {"health_cron": "* * * * *\nx"}}, "prefect.health_cron"),
        ({"backup": {"cron": "30 2 * * *\nx"}}, "backup.cron"),
        (
            {"prefect": {"database": {"data_directory": "/mnt/pspace/pg\nExecStart=/bin/sh"}}},
            "prefect.database.data_directory",
        ),
        ({"prefect": {"database": {"user": "prefect'; DROP ROLE x; --"}}}, "prefect.database.user"),
        ({"backup": {"arc_dir": "backups/../../.ssh"}}, "backup.arc_dir"),
        ({"backup": {"arc_dir": "backups/$(reboot)"}}, "backup.arc_dir"),
        (
            {"ssh": {"operator_keys": ["ssh-ed25519 AAAA comment\nssh-rsa BBBB"]}},
            "ssh.operator_keys",
        ),
        ({"arc": {"host_keys": ["ssh-ed25519 AAAA\n[evil]:22 ssh-rsa BBBB"]}}, "arc.host_keys"),
        ({"arc": {"host_keys": ["ssh-ed25519 AAAA comment"]}}, "arc.host_keys"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_hostile_values_are_refused_naming_the_field(data: dict, field: str) -> None:
    """Values that would end a line, open a substitution, climb out of a directory or add an
    ssh option in a root shell, a unit file or sshfs's command line never validate."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    assert field in str(info.value), str(info.value)


def test_ordinary_values_still_validate() -> None:
    cfg = parse_config(
        {
            "volume": {"owner": "ubuntu", "mount_point": "/mnt/pspace", "device_hint": "/dev/vdc"},
            "arc": {
                "user": "samdf96",
                "host": "ws-uv.canfar.net",
                "mount_point": "~/canfar_arc",
                "options": ["reconnect", "ServerAliveInterval=15", "idmap=user", "allow_other"],
            },
            "prefect": {
                "venv": "/mnt/pspace/prefect-env",
                "version": "3.9.1",
                "package_index": "https://pypi.example.org/simple/",
                "health_cron": "*/15 * * * *",
            },
            "ssh": {
                "operator_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1x ops@team (laptop)"]
            },
        }
    )
    assert cfg.arc.options[-1] == "allow_other"


def test_an_open_api_port_is_refused_naming_the_ssh_forward() -> None:
    for cidr in ("0.0.0.0/0", "198.51.100.0/24"):
        with pytest.raises(ConfigError) as err:
            parse_config({"server": {"ingress": [{"protocol": "tcp", "port": 4200, "cidr": cidr}]}})
        message = str(err.value)
        assert "server.ingress" in message and "cleartext" in message, message
        assert "ssh -N prefect-vm" in message and "remove the rule" in message, message
    # another API port: that one is refused, 4200 is then an ordinary port
    moved = {"prefect": {"port": 4300}, "server": {"ingress": [{"protocol": "tcp", "port": 4300}]}}
    with pytest.raises(ConfigError, match="tcp 4300"):
        parse_config(moved)
    assert (
        parse_config(
            {"server": {"ingress": [{"protocol": "tcp", "port": 4200}]}, "prefect": {"port": 4300}}
        ).prefect.port
        == 4300
    )


def test_api_auth_off_warns() -> None:
    assert BootstrapConfig().warnings() == []
    (warning,) = parse_config({"prefect": {"api_auth": False}}).warnings()
    assert "api_auth" in warning and "secrets" in warning


def test_ipv6_rule_gets_ipv6_ethertype() -> None:
    assert IngressRule(protocol="tcp", port=22, cidr="::/0").ethertype == "IPv6"


def test_examples_are_valid() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        assert load_config(path).environment


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_config_is_a_flow_parameter_schema() -> None:
    from prefect import flow
    from prefect.utilities.callables import parameter_schema

    @flow
    def f(config: BootstrapConfig = BootstrapConfig()) -> None: ...

    schema = parameter_schema(f).model_dump()
    assert "BootstrapConfig" in str(schema["properties"]["config"])
    assert "ServerSettings" in schema["definitions"]


def test_pinned_arc_host_keys_are_the_only_ones_sshfs_accepts() -> None:
    from tasks.arc import ARC_KNOWN_HOSTS, known_hosts_text, unit_text

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMq6Q0mJq9aM1Yb3cVOYw5s0Qq1m2rQJYl3JlF3V1Kxz"
    pinned = parse_config({"arc": {"host_keys": [key], "port": 64022}}, "test.yaml")
    unit = unit_text(pinned, "sailsuser")
    assert f"UserKnownHostsFile={ARC_KNOWN_HOSTS}" in unit
    assert "StrictHostKeyChecking=yes" in unit and "accept-new" not in unit
    assert known_hosts_text(pinned).splitlines()[1:] == [f"[ws-uv.canfar.net]:64022 {key}"]
    unpinned = unit_text(parse_config({}, "test.yaml"), "sailsuser")
    assert "StrictHostKeyChecking=accept-new" in unpinned and "UserKnownHostsFile" not in unpinned


def test_the_database_is_sqlite_unless_asked() -> None:
    db = BootstrapConfig().prefect.database
    assert (db.kind, db.switch, db.data_directory) == ("sqlite", False, "/mnt/pspace/postgres")
    assert (db.name, db.user, db.port, db.password_block) == (
        "prefect",
        "prefect",
        5432,
        "sails-prefect-db",
    )
    moved = parse_config(
        {
            "volume": {"mount_point": "/data"},
            "prefect": {
                "home": "/data/prefect-data",
                "database": {
                    "kind": "postgresql",
                    "switch": True,
                    "data_directory": "/data/pg/",
                },
            },
        }
    ).prefect.database
    assert (moved.kind, moved.switch, moved.data_directory) == ("postgresql", True, "/data/pg")
    # SQLite never reads the PostgreSQL fields' placement: another mount point keeps validating
    assert parse_config({"volume": {"mount_point": "/data"}}).prefect.database.kind == "sqlite"
