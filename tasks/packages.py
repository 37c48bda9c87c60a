"""The Debian packages the configuration needs on the VM, installed with apt as on a fresh VM.

A stock Ubuntu cloud image lacks what the other steps use (sshfs for /arc, python3-venv for the
Prefect venv: without it ``python3 -m venv`` has no ensurepip). On a first boot the package
lists are stale or empty, unattended-upgrades holds the dpkg lock for minutes, and a mirror may
answer 5xx for a while. So: ``dpkg-query`` first (installed: nothing to do, a second run changes
nothing); the lists refreshed when missing, stale, or when apt cannot find a package; the dpkg
lock waited for with a bound (apt's own ``DPkg::Lock::Timeout``); transient failures retried
with backoff; anything else is an error with apt's own words.

apt writes to a file on the VM, not to the SSH channel: a dropped connection would otherwise kill
apt and the dpkg under it with SIGPIPE mid-unpack. An install that was cut off all the same (a
killed process, a reboot) is repaired as an operator would: ``dpkg --configure -a``, then
``apt-get -f install`` for what it unpacked without its dependencies.
"""

from __future__ import annotations

import shlex
import time
from enum import StrEnum

from pydantic import Field

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import Progress, logger
from core.records import Action
from tasks.vm import MANAGED, VM, Result, StepRecord

#: Package lists older than this are refreshed before installing.
LISTS_MAX_AGE = 24 * 3600
#: Attempts for a transient apt failure (mirror 5xx, timeouts, DNS, hash mismatch).
TRANSIENT_ATTEMPTS = 4
#: Seconds apt waits for the dpkg lock per attempt (attempts go on until the step's bound).
LOCK_SLICE = 60
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"


class PackagesRecord(StepRecord):
    wanted: list[str] = Field(default_factory=list)
    #: Not installed when the step started (what it installed, or in a plan would install).
    missing: list[str] = Field(default_factory=list)
    lists_refreshed: bool = False


def needed_packages(config: BootstrapConfig) -> list[str]:
    """What the configuration needs beyond the stock image, in install order."""
    # python3-venv brings ensurepip, so the venv bootstraps its own pip (no python3-pip).
    wanted = ["python3-venv"]
    if config.arc.enabled:
        wanted.append("sshfs")  # brings fuse3 (fusermount3, used by the unit)
    if config.prefect.database.kind == "postgresql":
        wanted.append("postgresql")  # the distribution's current server (tasks/postgres.py)
    return wanted


#: Debian's and Ubuntu's server package makes a cluster "main" in /var/lib/postgresql, on the
#: root disk and on port 5432, unless postgresql-common's settings say not to; the Prefect
#: server's cluster is made on the volume instead (tasks/postgres.py). The setting goes in a
#: file of its own in createcluster.d, which the shipped createcluster.conf includes (that file
#: stays as shipped, so the package's upgrades do not stop to ask about it); pg_conftool, which
#: the package's scripts ask, must then read it as off.
NO_MAIN_CLUSTER_FILE = "/etc/postgresql-common/createcluster.d/50-sails.conf"
NO_MAIN_CLUSTER = (
    f"f={NO_MAIN_CLUSTER_FILE}; "
    'mkdir -p "$(dirname "$f")" && '
    f"printf '%s\\n' '{MANAGED}' 'create_main_cluster = false' > \"$f.new\" && "
    'mv "$f.new" "$f" && '
    "{ ! command -v pg_conftool >/dev/null || "
    '[ "$(pg_conftool /etc/postgresql-common/createcluster.conf show -bs create_main_cluster)" '
    '= off ] || { echo "postgresql-common does not read $f (does createcluster.conf lack its '
    'include_dir?): set create_main_cluster = false there" >&2; exit 1; }; }'
)

#: Packages whose install is prepared: another package installed first, then a root command
#: (and what it does, for the plan).
PREPARED: dict[str, tuple[str, str, str]] = {
    "postgresql": ("postgresql-common", NO_MAIN_CLUSTER, "told to make no 'main' cluster"),
}


def install_stages(missing: list[str]) -> list[tuple[list[str], str | None]]:
    """The apt installs for ``missing``, in order, each with the root command run after it: the
    packages a prepared one needs first and its command, then all the rest."""
    first = {PREPARED[m][0]: PREPARED[m][1] for m in missing if m in PREPARED}
    stages: list[tuple[list[str], str | None]] = [([p], cmd) for p, cmd in first.items()]
    return [*stages, (missing, None)]


def parse_dpkg_status(output: str) -> dict[str, bool]:
    """``dpkg-query -W -f '${Package}\\t${db:Status-Abbrev}\\n'`` output → installed or not.
    Only 'ii' counts: removed ('rc'), half-installed or half-configured packages do not."""
    status: dict[str, bool] = {}
    for line in output.splitlines():
        name, _, abbrev = line.partition("\t")
        if name.strip():
            status[name.strip().split(":")[0]] = abbrev.startswith("ii")
    return status


def missing_packages(wanted: list[str], status: dict[str, bool]) -> list[str]:
    return [name for name in wanted if not status.get(name, False)]


def lists_stale(count: int, newest: int, now: int, max_age: float = LISTS_MAX_AGE) -> bool:
    """Package lists are missing (a fresh image ships none) or older than ``max_age``."""
    return count == 0 or now - newest > max_age


class AptOutcome(StrEnum):
    OK = "ok"
    LOCKED = "locked"  # another apt or dpkg (unattended-upgrades) holds the lock
    TRANSIENT = "transient"  # the mirror or the network failed this time
    STALE_LISTS = "stale-lists"  # the lists do not know the package or name a removed file
    INTERRUPTED = "interrupted"  # an earlier dpkg run was cut off: dpkg --configure -a
    BROKEN = "broken"  # unpacked packages miss dependencies: apt-get -f install
    FAILED = "failed"


_MARKERS: list[tuple[AptOutcome, tuple[str, ...]]] = [
    (AptOutcome.INTERRUPTED, ("dpkg was interrupted",)),
    (AptOutcome.BROKEN, ("--fix-broken install", "apt-get -f install")),
    (
        AptOutcome.LOCKED,
        (
            "could not get lock",
            "unable to acquire the dpkg frontend lock",
            "unable to lock the administration directory",
            "unable to lock directory",
            "is another process using it",
            "was locked by another process",  # dpkg's own
        ),
    ),
    (
        AptOutcome.STALE_LISTS,
        (
            "unable to locate package",
            "has no installation candidate",
            "404  not found",
            "404 not found",
            "unable to fetch some archives",
        ),
    ),
    (
        AptOutcome.TRANSIENT,
        (
            "temporary failure resolving",
            "could not resolve",
            "connection timed out",
            "connection failed",
            "could not connect to",
            "connection reset",
            "network is unreachable",
            "no route to host",
            "hash sum mismatch",
            "file has unexpected size",
            "some index files failed to download",
            "undetermined error",
            "500  internal server error",
            "502  bad gateway",
            "503  service unavailable",
            "504  gateway time-out",
            "500 internal server error",
            "502 bad gateway",
            "503 service unavailable",
            "504 gateway timeout",
            "429  too many requests",
            "failed to fetch",
        ),
    ),
]


def classify_apt(code: int, output: str) -> AptOutcome:
    """What an apt-get run's exit code and output (stdout + stderr) mean for the next step."""
    if code == 0:
        return AptOutcome.OK
    text = output.lower()
    for outcome, markers in _MARKERS:
        if any(marker in text for marker in markers):
            return outcome
    if code == 124:  # coreutils timeout / LocalHost's own: a hung mirror
        return AptOutcome.TRANSIENT
    return AptOutcome.FAILED


def _dpkg_status(vm: VM, wanted: list[str]) -> dict[str, bool]:
    names = " ".join(shlex.quote(n) for n in wanted)
    fmt = shlex.quote("${Package}\t${db:Status-Abbrev}\n")
    return parse_dpkg_status(vm.run(f"dpkg-query -W -f {fmt} {names}", check=False).stdout)


def _lists_stale(vm: VM) -> bool:
    out = vm.run(
        "find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -printf '%T@\\n' 2>/dev/null"
        " | sort -n | awk '{n++; t=$1} END {printf \"%d %d \", n, t}'; date +%s",
        check=False,
    ).stdout.split()
    try:
        count, newest, now = (int(float(x)) for x in out[:3])
    except ValueError:
        return True
    return lists_stale(count, newest, now)


def _tail(r: Result, n: int = 600) -> str:
    lines = [
        line
        for line in (r.stdout + "\n" + r.stderr).splitlines()
        if line.strip() and not line.startswith(("Reading ", "Building ", "Get:", "Hit:", "Ign:"))
    ]
    return " | ".join(lines)[-n:]


def off_the_channel(command: str) -> str:
    """``command`` with its output to a file on the VM, printed once it has ended: a dropped SSH
    connection leaves it running (it never writes to the closed channel, so no SIGPIPE), and the
    next run finds it holding the dpkg lock, or done."""
    return (
        "log=$(mktemp) || exit 1; "
        f'( {command} ) </dev/null >"$log" 2>&1; rc=$?; cat "$log"; rm -f "$log"; exit $rc'
    )


def _apt(vm: VM, args: str, deadline: float, what: str) -> Result:
    """One apt-get command, retried while the lock is held or the mirror fails, until
    ``deadline`` (monotonic). Returns the last result (OK, or STALE_LISTS / INTERRUPTED / BROKEN
    for the caller to handle); anything else past the bound is an error."""
    log = logger()
    progress = Progress(what)
    transient = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootstrapError(
                f"apt on {vm.host} did not finish {what} within the packages step's bound "
                "(server.apt_timeout); another apt or dpkg (unattended-upgrades) may still hold "
                "the lock: see `sudo lsof /var/lib/dpkg/lock-frontend` and "
                "/var/log/unattended-upgrades/ on the VM"
            )
        # apt waits for the lock itself; in slices, so the run log shows the wait going on.
        lock_wait = max(1, min(LOCK_SLICE, int(left)))
        r = vm.run(
            off_the_channel(f"{APT} -o DPkg::Lock::Timeout={lock_wait} {args}"),
            sudo=True,
            timeout=left + 120,
            check=False,
        )
        outcome = classify_apt(r.code, r.stdout + r.stderr)
        if outcome in (
            AptOutcome.OK,
            AptOutcome.STALE_LISTS,
            AptOutcome.INTERRUPTED,
            AptOutcome.BROKEN,
        ):
            return r
        if outcome == AptOutcome.LOCKED:
            progress.tick("the dpkg lock is held by another process (unattended-upgrades?)")
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            continue
        if outcome == AptOutcome.TRANSIENT and transient < TRANSIENT_ATTEMPTS - 1:
            transient += 1
            delay = min(5.0 * 2 ** (transient - 1), max(0.0, deadline - time.monotonic()))
            log.warning(
                "apt %s on %s failed (%s); retrying in %.0f s (%d/%d)",
                what,
                vm.host,
                _tail(r, 200),
                delay,
                transient,
                TRANSIENT_ATTEMPTS - 1,
            )
            time.sleep(delay)
            continue
        raise BootstrapError(
            f"apt on {vm.host} failed {what} (exit {r.code}"
            f"{', after retries' if outcome == AptOutcome.TRANSIENT else ''}): {_tail(r)}"
        )


def _repair(vm: VM, deadline: float, outcome: AptOutcome) -> None:
    """Finish an install that was cut off, as an operator would: ``dpkg --configure -a``
    configures what was unpacked (it may leave packages whose dependencies were not unpacked yet,
    and say so), then ``apt-get -f install`` fetches and installs those dependencies."""
    log = logger()
    progress = Progress("repairing an interrupted install")
    if outcome == AptOutcome.INTERRUPTED:
        log.warning("an earlier apt or dpkg run on %s was cut off: dpkg --configure -a", vm.host)
        while True:  # dpkg has no lock timeout of its own: wait as apt does
            left = deadline - time.monotonic()
            r = vm.run(
                off_the_channel(
                    "DEBIAN_FRONTEND=noninteractive dpkg --force-confdef --force-confold "
                    "--configure -a"
                ),
                sudo=True,
                timeout=max(left, 1) + 120,
                check=False,
            )
            locked = classify_apt(r.code, r.stdout + r.stderr) == AptOutcome.LOCKED
            if not locked or left <= 0:
                break
            progress.tick("the dpkg lock is held by another process")
            time.sleep(2.0)
        if r.code != 0:
            log.warning(
                "dpkg --configure -a on %s left packages unconfigured (%s): apt-get -f install",
                vm.host,
                _tail(r, 300),
            )
    else:
        log.warning("packages on %s miss dependencies: apt-get -f install", vm.host)
    fix = _apt(vm, "-f install", deadline, "repairing an interrupted install")
    if classify_apt(fix.code, fix.stdout + fix.stderr) != AptOutcome.OK:
        raise BootstrapError(
            f"apt on {vm.host} could not repair an interrupted install (`sudo dpkg --configure "
            f"-a` then `sudo apt-get -f install` there show why): {_tail(fix)}"
        )


def ensure_packages(vm: VM, config: BootstrapConfig, apply: bool = True) -> PackagesRecord:
    """Install what the configuration needs and the image lacks; keep what is there."""
    wanted = needed_packages(config)
    missing = missing_packages(wanted, _dpkg_status(vm, wanted))
    record = PackagesRecord(name="packages", wanted=wanted, missing=missing, applied=apply)
    if not missing:
        record.reason = f"installed: {', '.join(wanted)}"
        return record
    stale = _lists_stale(vm)
    record.action = Action.CHANGE
    if not apply:
        record.reason = f"pending: apt-get install {' '.join(missing)}" + (
            " (package lists refreshed first)" if stale else ""
        )
        for first, _, note in (PREPARED[m] for m in missing if m in PREPARED):
            record.reason += f" ({first} first, {note})"
        return record
    log = logger()
    start = time.monotonic()
    deadline = start + config.server.apt_timeout
    refreshed = repaired = False
    if stale:
        log.info("refreshing the package lists on %s (apt-get update)", vm.host)
        update = _apt(vm, "update", deadline, "refreshing the package lists")
        if classify_apt(update.code, update.stdout + update.stderr) != AptOutcome.OK:
            raise BootstrapError(f"apt-get update on {vm.host} failed: {_tail(update)}")
        refreshed = True
    for names, command in install_stages(missing):
        log.info("installing %s on %s with apt", ", ".join(names), vm.host)
        install = "install --no-install-recommends " + " ".join(shlex.quote(m) for m in names)
        while True:
            r = _apt(vm, install, deadline, f"installing {', '.join(names)}")
            outcome = classify_apt(r.code, r.stdout + r.stderr)
            if outcome == AptOutcome.OK:
                break
            if outcome == AptOutcome.STALE_LISTS and not refreshed:
                log.info("apt does not know %s yet: refreshing the package lists", " ".join(names))
                update = _apt(vm, "update", deadline, "refreshing the package lists")
                refreshed = True
                continue
            if outcome in (AptOutcome.INTERRUPTED, AptOutcome.BROKEN) and not repaired:
                _repair(vm, deadline, outcome)
                repaired = True
                continue
            hint = (
                "; the image's apt sources may not carry it (check /etc/apt/sources.list.d/)"
                if outcome == AptOutcome.STALE_LISTS
                else ""
            )
            raise BootstrapError(
                f"apt on {vm.host} could not install {' '.join(names)}: {_tail(r)}{hint}"
            )
        if command:
            vm.run(command, sudo=True)
    still = missing_packages(wanted, _dpkg_status(vm, wanted))
    if still:
        raise BootstrapError(
            f"apt on {vm.host} reported success but {' '.join(still)} is not installed"
        )
    record.lists_refreshed = refreshed
    record.reason = f"installed {', '.join(missing)}" + (
        " (package lists refreshed)" if refreshed else ""
    )
    log.info("packages on %s: %s (%.0f s)", vm.host, record.reason, time.monotonic() - start)
    return record
