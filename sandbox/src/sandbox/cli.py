"""``sails-sandbox``: the sandbox's own command.

sails-sandbox install                 Debian packages, services venv, guest image (cached)
sails-sandbox up | down | status      start (idempotent), stop (volumes stay), say what runs
sails-sandbox env                     export lines: eval "$(sails-sandbox env)"
sails-sandbox blocks --config FILE    save the blocks an operator would save for this cloud
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

EPILOG = 'Use it with: eval "$(sails-sandbox env)"'


def _require_root() -> None:
    if os.geteuid() != 0:
        sys.exit(
            "error: the sandbox needs root: it installs Debian packages, creates network "
            "namespaces, bridges, loop devices and mounts. Run it with sudo (or as root in a "
            "container)."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sails-sandbox",
        description="The local sandbox: an OpenStack cloud and CANFAR stand-ins on this machine.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("install", help="install what the sandbox needs (cached)")
    commands.add_parser("up", help="install what is missing and start the sandbox (idempotent)")
    commands.add_parser("down", help="stop every sandbox process (volumes and databases stay)")
    commands.add_parser("status", help="say what runs")
    commands.add_parser("env", help='print export lines for: eval "$(sails-sandbox env)"')
    blocks = commands.add_parser(
        "blocks",
        help="save the CANFAR account (and the /arc key CANFAR trusts) as the config's blocks",
    )
    blocks.add_argument("--config", required=True, help="the bootstrap config file")
    args = parser.parse_args(argv)

    _require_root()
    from sandbox import manager

    if args.command == "install":
        manager.install()
        print("sandbox installed")
    elif args.command == "up":
        info = manager.up()
        print("sandbox is up")
        for key, value in (info or {}).items():
            print(f"  {key}: {value}")
        print(EPILOG)
    elif args.command == "down":
        manager.down()
        print("sandbox is down")
    elif args.command == "status":
        for key, value in manager.status().items():
            print(f"{key}: {value}")
    elif args.command == "env":
        for key, value in manager.env().items():
            print(f"export {key}={shlex.quote(str(value))}")
    elif args.command == "blocks":
        from sandbox import operator

        for line in operator.save_blocks_from_file(args.config):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
