"""A real, throw-away Slurm cluster on this one machine, for tests.

``SlurmCluster`` starts munged, slurmctld and one slurmd per "node" (``n1``, ``n2``, ...) on this host:

* every node is a separate ``slurmd -N nK`` on its own port; ``nK`` is mapped to a loopback alias
  (``127.0.0.2``, ``127.0.0.3``, ...) in /etc/hosts, so ``scontrol show hostnames`` -> head address resolves and a
  rendezvous server binds per node;
* config, state, spool, logs and a private munge socket/key live in a temporary folder; every command and daemon is
  pointed at it with ``SLURM_CONF`` (plus ``-f`` for the daemons), so /etc/slurm and the system munge are untouched;
* /etc/hosts is restored byte-for-byte on ``stop()`` (also via ``atexit`` and after a crashed earlier run);
* a crashed earlier run is cleaned up first: its processes are found by the ``SLURM_CONF`` path in their
  environment (daemons, slurmstepd, job processes) and killed by pid.

Usage::

    with SlurmCluster() as c:
        jid = c.sbatch("#!/bin/bash\\nsrun hostname\\n", "--nodes=2", "-o", "/tmp/out")
        assert c.wait(jid, timeout=30) == "COMPLETED"

Needs root (it writes /etc/hosts and runs the daemons as root); installs Debian's ``slurmctld slurmd slurm-client
munge`` with apt-get when ``slurmctld`` is missing. ``SlurmUnavailable`` is raised when that is not possible, so a
fixture can turn it into a skip.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["SlurmCluster", "SlurmUnavailable", "SlurmError", "TERMINAL_STATES", "ensure_slurm_installed"]

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARKER = "# rm_scale-slurm-test-cluster"
# Where a running cluster records what it started, so that the next run can clean up after a crash.
STATE_FILE = Path(tempfile.gettempdir()) / "rm_scale_slurm_cluster.state.json"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or run here (not root, apt failed, ...): callers should skip."""


class SlurmError(RuntimeError):
    """The cluster misbehaved (a daemon died, a command failed, a wait timed out)."""


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_slurm_installed(timeout: float = 600) -> None:
    """Install Debian's Slurm + munge packages when ``slurmctld`` is missing (root only)."""
    if all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if not _is_root():
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {e}") from e
        if p.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed (rc={p.returncode}): {(p.stdout + p.stderr)[-2000:]}")


def _which(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise SlurmUnavailable(f"{name} not found")
    return path


def _free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _pids_with_env(key: str, value: str) -> list[int]:
    """Pids whose initial environment has ``key=value`` (our daemons, slurmstepds and job processes)."""
    needle = f"{key}={value}".encode()
    skip, found = _ancestors(), []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in skip:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(d))
        except OSError:
            continue
    return found


def _kill_pids(pids, grace: float = 5.0) -> None:
    pids = [p for p in set(pids) if p > 1 and p not in _ancestors()]
    for sig in (_signal.SIGTERM, _signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == _signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _strip_marker_lines(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if HOSTS_MARKER not in line)


def parse_scontrol_oneliner(line: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` line (``Key=value Key2=v a l u e ...``) into a dict."""
    out: dict[str, str] = {}
    # A key starts a token: a letter, then letters/digits/_/:/ (e.g. "Socks/Node", "ReqB:S:C:T"), then "=".
    parts = re.split(r"\s+(?=[A-Za-z][\w/:]*=)", line.strip())
    for part in parts:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v.strip()
    return out


class SlurmCluster:
    """A real single-host Slurm cluster: munged + slurmctld + one slurmd per node (n1..nN on 127.0.0.2..)."""

    def __init__(
        self,
        num_nodes: int = 2,
        cpus_per_node: int = 2,
        base_dir: str | os.PathLike | None = None,
        cred_expire: int = 10,
        keep_dir: bool | None = None,
        install: bool = True,
        start_timeout: float = 30.0,
        grace_time: int = 60,
    ):
        if not 1 <= num_nodes <= 200:
            raise ValueError("num_nodes must be in 1..200")
        if cred_expire < 5:
            # Measured on 22.05.8: AuthInfo=cred_expire=2 is not honoured and a requeued job then waits ~120 s.
            raise ValueError("cred_expire must be >= 5 (Slurm ignores smaller values)")
        self.num_nodes = num_nodes
        self.cpus_per_node = cpus_per_node
        self.cred_expire = cred_expire
        self.install = install
        self.start_timeout = start_timeout
        self.grace_time = grace_time
        self.keep_dir = bool(os.environ.get("RM_SCALE_KEEP_SLURM_DIR")) if keep_dir is None else keep_dir
        self._base_arg = Path(base_dir) if base_dir else None
        self.nodes = [f"n{i}" for i in range(1, num_nodes + 1)]
        self.node_addrs = {n: f"127.0.0.{i + 1}" for i, n in enumerate(self.nodes, start=1)}
        self.hostname = socket.gethostname().split(".")[0]
        self.base: Path | None = None
        self.conf_path: Path | None = None
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._hosts_original: str | None = None
        self._started = False
        self._atexit_registered = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SlurmCluster":
        if self._started:
            return self
        if not _is_root():
            raise SlurmUnavailable("a local Slurm cluster needs root (it edits /etc/hosts and runs the daemons)")
        if self.install:
            ensure_slurm_installed()
        for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel", "sinfo"):
            _which(b)
        cleanup_stale_run()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._started = True  # from here on, stop() has something to undo
        try:
            self._setup_dirs()
            self._write_state()
            self._patch_hosts()
            self._write_state()
            self._start_munge()
            self._write_conf()
            self._start_slurm()
            self._write_state()
            self._wait_nodes_idle(self.start_timeout)
        except BaseException as e:
            logs = self.log_tail()
            try:
                self.stop()
            except Exception:
                pass
            if isinstance(e, (SlurmUnavailable, KeyboardInterrupt, SystemExit)):
                raise
            raise SlurmError(f"starting the Slurm cluster failed: {e}\n{logs}") from e
        return self

    def stop(self) -> None:
        """Cancel jobs, shut the daemons down, kill leftovers, restore /etc/hosts. Idempotent."""
        if not self._started:
            return
        errors = []
        try:
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                try:
                    self._cancel_all_jobs(timeout=30)
                except Exception as e:  # keep going: the daemons must go away regardless
                    errors.append(f"cancel jobs: {e}")
                try:
                    self.run("scontrol", "shutdown", check=False, timeout=10)
                except Exception as e:
                    errors.append(f"scontrol shutdown: {e}")
            # Slurm daemons first (they exit on `scontrol shutdown`; SIGTERM if not), munged last.
            for name in sorted(self._procs, key=lambda n: n == "munged"):
                p = self._procs[name]
                try:
                    p.wait(timeout=10 if name != "munged" else 0.1)
                except subprocess.TimeoutExpired:
                    _kill_pids([p.pid])
                    try:
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        errors.append(f"{name} (pid {p.pid}) did not exit")
            munge_pid = self._munge_pid()
            if munge_pid:
                _kill_pids([munge_pid])
            if self.conf_path is not None:
                # slurmstepds / job processes that outlived their slurmd (should be none after the cancel).
                _kill_pids(_pids_with_env("SLURM_CONF", str(self.conf_path)))
                left = [p for p in _pids_with_env("SLURM_CONF", str(self.conf_path)) if _pid_alive(p)]
                left += [p.pid for p in self._procs.values() if _pid_alive(p.pid)]
                if munge_pid and _pid_alive(munge_pid):
                    left.append(munge_pid)
                if left:
                    errors.append(f"processes still alive after stop: {sorted(set(left))}")
        finally:
            self._procs.clear()
            self._restore_hosts()
            if self.base is not None and not self.keep_dir and self._base_arg is None:
                shutil.rmtree(self.base, ignore_errors=True)
            try:
                STATE_FILE.unlink()
            except FileNotFoundError:
                pass
            self._started = False
        if errors:
            raise SlurmError("; ".join(errors))

    # ------------------------------------------------------------------ public API
    def run(self, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None,
            env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (``SLURM_CONF`` set)."""
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        p = subprocess.run(list(cmd), env=full_env, cwd=cwd, input=input, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed (rc={p.returncode}): {p.stdout}{p.stderr}")
        return p

    def sbatch(self, script: str | os.PathLike, *args: str, env: dict | None = None, cwd=None,
               script_args: tuple | list = ()) -> int:
        """Submit a batch job; returns its id.

        ``script`` is either the text of a script (contains a newline or starts with ``#!``) or a path to one.
        ``args`` are sbatch options placed before the script (e.g. ``"--nodes=2", "-o", path``);
        ``script_args`` go after it. ``env`` is added to the submission environment (sbatch exports it to the job).
        ``cwd`` is the job's working directory (default: the cluster's temporary folder, not the caller's cwd).
        """
        text = str(script)
        cmd = ["sbatch", "--parsable", *map(str, args)]
        stdin = None
        if isinstance(script, str) and ("\n" in script or script.startswith("#!")):
            if script_args:
                # sbatch takes arguments only after a file name: write the text to a file.
                fd, path = tempfile.mkstemp(prefix="job_", suffix=".sh", dir=self.base)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                cmd += [path, *map(str, script_args)]
            else:
                stdin = text
        else:
            cmd += [text, *map(str, script_args)]
        # The job's working directory (and default slurm-%j.out) is sbatch's cwd: default to the cluster folder.
        p = self.run(*cmd, env=env, cwd=cwd if cwd is not None else self.base, input=stdin)
        out = p.stdout.strip().splitlines()
        if not out:
            raise SlurmError(f"sbatch printed no job id: {p.stderr}")
        return int(out[-1].split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o JOBID`` parsed into a dict (JobState, RestartCnt, NodeList, ...)."""
        p = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if p.returncode != 0 or not p.stdout.strip():
            raise SlurmError(f"scontrol show job {job_id}: {p.stdout}{p.stderr}".strip())
        return parse_scontrol_oneliner(p.stdout.strip().splitlines()[0])

    def state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float = 60, poll: float = 0.25,
             states: frozenset | set | None = None) -> str:
        """Poll ``scontrol show job`` until the job reaches a final state; return it.

        Requeue passes through REQUEUED/PENDING/CONFIGURING/RUNNING/COMPLETING: those keep polling. Raises
        ``SlurmError`` on timeout (with the last job record and log tails). ``states`` overrides the set of states
        that end the wait (e.g. ``{"RUNNING"}``).
        """
        until = TERMINAL_STATES if states is None else frozenset(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            st = info.get("JobState", "")
            if st in until:
                return st
            self._check_daemons()
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still {st} after {timeout:.0f}s: {info}\n{self.log_tail()}")
            time.sleep(poll)

    def signal(self, job_id: int, sig: str | int = "USR1", batch: bool = True) -> None:
        """Send ``sig`` now: to the batch shell (``batch=True``, ``scancel --batch``) or to the job's steps."""
        if isinstance(sig, int):
            name = _signal.Signals(sig).name
        else:
            name = sig.upper()
        name = name[3:] if name.startswith("SIG") else name
        cmd = ["scancel", f"--signal={name}"]
        if batch:
            cmd.append("--batch")
        self.run(*cmd, str(job_id))

    def requeue(self, job_id: int) -> None:
        self.run("scontrol", "requeue", str(job_id))

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id))

    def squeue(self) -> list[int]:
        p = self.run("squeue", "-h", "-o", "%i")
        return [int(x.split("_")[0]) for x in p.stdout.split()]

    def node_states(self) -> dict[str, str]:
        p = self.run("sinfo", "-h", "-N", "-o", "%N %t")
        return dict(line.split()[:2] for line in p.stdout.splitlines() if line.strip())

    def log_tail(self, n: int = 20) -> str:
        if self.base is None:
            return ""
        chunks = []
        for f in sorted((self.base / "log").glob("*.log")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            chunks.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(chunks)

    # ------------------------------------------------------------------ internals
    def _setup_dirs(self) -> None:
        if self._base_arg is not None:
            self.base = self._base_arg
            self.base.mkdir(parents=True, exist_ok=True)
        else:
            self.base = Path(tempfile.mkdtemp(prefix="rm_scale_slurm_"))
        os.chmod(self.base, 0o755)  # munged (user munge) must traverse it
        for d in ("etc", "state", "log", "run", "spool"):
            (self.base / d).mkdir(exist_ok=True)
        for n in self.nodes:
            (self.base / "spool" / n).mkdir(exist_ok=True)
        self.conf_path = self.base / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf_path))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[k]  # a surrounding allocation must not leak into this cluster's commands

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "base": str(self.base) if self.base else None,
            "conf": str(self.conf_path) if self.conf_path else None,
            "daemons": {k: p.pid for k, p in self._procs.items()},
            "munged_pidfile": str(self.base / "munge" / "munged.pid") if self.base else None,
            "hosts_original": self._hosts_original,
            "remove_base": self._base_arg is None and not self.keep_dir,
        }
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, STATE_FILE)

    def _patch_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        original = _strip_marker_lines(text)  # a crashed run may have left its lines
        self._hosts_original = original
        lines = original if original.endswith("\n") or not original else original + "\n"
        lines += "".join(f"{addr} {n} {HOSTS_MARKER}\n" for n, addr in self.node_addrs.items())
        # Write in place (no rename): /etc/hosts is often a bind mount.
        with open(HOSTS_FILE, "w") as f:
            f.write(lines)

    def _restore_hosts(self) -> None:
        if self._hosts_original is None:
            return
        try:
            current = HOSTS_FILE.read_text()
        except OSError:
            current = None
        if current != self._hosts_original:
            with open(HOSTS_FILE, "w") as f:
                f.write(self._hosts_original)
        self._hosts_original = None

    def _start_munge(self) -> None:
        """A private munged (own key and socket) so the system's munge, if any, is untouched."""
        import pwd

        d = self.base / "munge"
        d.mkdir(exist_ok=True)
        pw = pwd.getpwnam("munge")
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (d, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o755)  # clients (root, job steps) reach the socket
        os.chmod(key, 0o400)
        self.munge_socket = d / "munge.socket"
        log = open(self.base / "log" / "munged.log", "ab")
        self._procs["munged"] = subprocess.Popen(
            [_which("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=d,
        )
        log.close()
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start:\n{self._read(self.base / 'log' / 'munged.log')}"
                                 f"{self._read(d / 'munged.log')}")
            time.sleep(0.05)

    def _munge_pid(self) -> int | None:
        if self.base is None:
            return None
        try:
            return int((self.base / "munge" / "munged.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _read(p: Path) -> str:
        try:
            return p.read_text(errors="replace")
        except OSError:
            return ""

    def _pick_ports(self) -> tuple[int, int]:
        """slurmctld port and the first of num_nodes consecutive slurmd ports (defaults 16817 and 17001)."""
        ctld = 16817 if _port_free(16817) else _free_port()
        for first in [17001, *range(17101, 30000, 100)]:
            if all(_port_free(first + i) for i in range(self.num_nodes)) and not (first <= ctld < first + self.num_nodes):
                return ctld, first
        raise SlurmError("no free port range for the slurmd daemons")

    def _write_conf(self) -> None:
        b = self.base
        ctld_port, node_port = self._pick_ports()
        self.ctld_port, self.node_ports = ctld_port, {n: node_port + i for i, n in enumerate(self.nodes)}
        last = self.num_nodes
        nodes = f"n[1-{last}]" if last > 1 else "n1"
        ports = f"[{node_port}-{node_port + last - 1}]" if last > 1 else str(node_port)
        conf = f"""\
# Written by tests/slurm_cluster.py: a throw-away single-host cluster.
ClusterName=rmscaletest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
KillWait=3
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MessageTimeout=10
NodeName={nodes} NodeAddr={nodes} NodeHostname={self.hostname} Port={ports} CPUs={self.cpus_per_node} State=UNKNOWN
# Preemption as on shared clusters: a job in `urgent` preempts jobs of `debug` (the default partition), which get
# SIGTERM, GraceTime seconds to wrap up, then SIGKILL, and are requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime={self.grace_time}
PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF
"""
        self.conf_path.write_text(conf)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.stdout.log", "ab")
        self._procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base)
        log.close()

    def _start_slurm(self) -> None:
        conf = str(self.conf_path)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", conf])
        self._write_state()
        # slurmd registers with slurmctld; starting them right away is fine (they retry).
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", conf])
            self._write_state()

    def _check_daemons(self) -> None:
        dead = {k: p.returncode for k, p in self._procs.items() if p.poll() is not None}
        if dead:
            raise SlurmError(f"daemon(s) exited: {dead}\n{self.log_tail()}")

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_daemons()
            p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            if p.returncode == 0:
                states = dict(line.split()[:2] for line in p.stdout.splitlines() if line.strip())
                if all(states.get(n) == "idle" for n in self.nodes):
                    return
            time.sleep(0.1)
        raise SlurmError(f"nodes not idle after {timeout}s: {states}")

    def _cancel_all_jobs(self, timeout: float) -> None:
        jobs = self.squeue()
        if jobs:
            self.run("scancel", *map(str, jobs), check=False)
        deadline = time.monotonic() + timeout
        while self.squeue():
            if time.monotonic() > deadline:
                raise SlurmError(f"jobs still queued after scancel: {self.squeue()}")
            time.sleep(0.2)


def cleanup_stale_run() -> None:
    """Undo what a crashed earlier SlurmCluster left: its processes (by pid), its /etc/hosts lines, its folder."""
    state: dict = {}
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        pass
    owner = state.get("pid")
    if owner and owner != os.getpid() and _pid_alive(owner):
        try:
            cmdline = Path(f"/proc/{owner}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"python" in cmdline or b"pytest" in cmdline:
            raise SlurmError(f"another SlurmCluster (pid {owner}) is running; state file {STATE_FILE}")
    pids: list[int] = []
    conf = state.get("conf")
    if conf:
        pids += _pids_with_env("SLURM_CONF", conf)  # daemons, slurmstepds, job processes of that run
    base = state.get("base")
    for name, pid in (state.get("daemons") or {}).items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if base and base.encode() in cmdline:
            pids.append(pid)
    pidfile = state.get("munged_pidfile")
    if pidfile:
        try:
            mpid = int(Path(pidfile).read_text().strip())
            if base and base.encode() in Path(f"/proc/{mpid}/cmdline").read_bytes():
                pids.append(mpid)
        except (OSError, ValueError):
            pass
    if pids:
        _kill_pids(pids, grace=1.0)  # a job's bash defers SIGTERM until its foreground child exits: don't wait long
    # /etc/hosts: drop our marked lines (that is exactly what we added).
    try:
        text = HOSTS_FILE.read_text()
        if HOSTS_MARKER in text:
            with open(HOSTS_FILE, "w") as f:
                f.write(_strip_marker_lines(text))
    except OSError:
        pass
    if base and state.get("remove_base") and Path(base).name.startswith("rm_scale_slurm_"):
        shutil.rmtree(base, ignore_errors=True)
    try:
        STATE_FILE.unlink()
    except FileNotFoundError:
        pass
