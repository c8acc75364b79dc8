"""pgfix.py - a throwaway PostgreSQL cluster for integration tests.

    from pgfix import PgCluster
    pg = PgCluster()          # initdb into a temp dir (nothing runs yet)
    pg.start()                # pg_ctl start -w; creates database zm_test once
    pg.url                    # postgresql://zm@127.0.0.1:PORT/zm_test
    pg.restart()              # pg_ctl restart -m fast
    pg.stop()                 # pg_ctl stop -m fast (start() again later)
    pg.kill()                 # SIGKILL the postmaster (crash; start() recovers)
    pg.destroy()              # stop and remove the directory

It is also a context manager (destroy on exit). Same rules as
test/pg/with-pg.sh: trust authentication on 127.0.0.1 only, a free port, and
when running as root the cluster belongs to the `postgres` system user and
every PostgreSQL binary runs through `runuser -u postgres --` (initdb refuses
root). PG_BIN overrides the binary directory (default: the newest
/usr/lib/postgresql/*/bin). Raises RuntimeError when PostgreSQL is missing.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["PgCluster"]


def _find_bin():
    b = os.environ.get("PG_BIN")
    if b:
        return b

    def ver(p):
        m = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/bin$", p)
        return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=ver)
    return found[-1] if found else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, dbname="zm_test", user="zm"):
        self.bin = _find_bin()
        if not self.bin or not os.access(os.path.join(self.bin, "initdb"), os.X_OK):
            raise RuntimeError("PostgreSQL server binaries not found "
                               "(install postgresql, or set PG_BIN)")
        self._as = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
        self.dir = tempfile.mkdtemp(prefix="zm-pg.")
        os.chmod(self.dir, 0o755)
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.port = _free_port()
        self.dbname = dbname
        self.user = user
        self.url = "postgresql://%s@127.0.0.1:%d/%s" % (user, self.port, dbname)
        self._created = False
        self._run("initdb", "-D", self.data, "-U", user, "--auth=trust",
                  "--encoding=UTF8", "--locale=C")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("listen_addresses = '127.0.0.1'\nport = %d\n"
                    "unix_socket_directories = '%s'\nfsync = off\n"
                    "max_connections = 100\n" % (self.port, self.dir))

    def _run(self, prog, *args, check=True):
        cmd = self._as + [os.path.join(self.bin, prog)] + list(args)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (prog, r.returncode, r.stdout))
        return r

    def _ctl(self, *args, check=True):
        return self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w",
                         "-t", "60", *args, check=check)

    def start(self):
        self._ctl("start")
        if not self._created:
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port),
                      "-U", self.user, self.dbname)
            self._created = True

    def stop(self):
        self._ctl("stop", "-m", "fast", check=False)

    def restart(self):
        self._ctl("restart", "-m", "fast")

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def kill(self):
        """SIGKILL the postmaster (a crash). Its backends exit on their own
        once they notice; start() runs crash recovery."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # Orphaned backends notice the postmaster's death and exit on their
        # own; start() waits for the shared memory they hold (pg_ctl -w).
        time.sleep(0.2)

    def destroy(self):
        if os.path.isdir(self.data):
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w",
                      "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False
