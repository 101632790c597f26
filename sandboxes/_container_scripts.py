"""Python programs that run inside the sandbox containers (passed with `python3 -I -S -c`, so the
image needs nothing of ours and a root file system that stays read-only).

Users inside a container:
  INIT_UID (65534): PID 1, the container's init. Runs cannot signal or trace it (another uid and no
      capabilities), so it outlives every run.
  RUN_UID (10001): every run, its helper programs and the cleanup between runs.
"""

INIT_UID = 65534
RUN_UID = 10001

# Written on stderr by the runner just before it forks the program: anything that comes later is
# the program's, and a run whose stderr does not start with it never started (a sandbox error).
START_MARKER = b"\x00k2rl-sandbox-start\x00\n"

# PID 1: reaps every orphan (killed runs leave zombies, which would count against the pids limit),
# and exits when its stdin reaches EOF. The host keeps that stdin open through an attached socket
# for as long as it lives, so a host process that dies, even by SIGKILL, takes its containers with
# it (they are created with auto-remove).
INIT = r"""
import os, select, signal
signal.signal(signal.SIGINT, signal.SIG_DFL)
r, w = os.pipe()
os.set_blocking(r, False)
os.set_blocking(w, False)
signal.signal(signal.SIGCHLD, lambda *_: None)
signal.set_wakeup_fd(w)

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

while True:
    reap()
    try:
        ready, _, _ = select.select([0, r], [], [], 2.0)
    except InterruptedError:
        continue
    if r in ready:
        try:
            os.read(r, 4096)
        except BlockingIOError:
            pass
    if 0 in ready and not os.read(0, 4096):
        os._exit(0)
"""

_KILLALL = r"""
def killall(seconds):
    # kill(-1) reaches every process this uid may signal except ourselves and PID 1; repeat until
    # none is left (ESRCH), which also covers processes forked while the first signal was sent.
    end = time.monotonic() + seconds
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
"""

# One run. Reads a header line (JSON) and the file contents from stdin, writes the files into a
# fresh directory under /scratch, and runs the command there with its stdin from an unlinked file.
# Exits with the program's exit status (128 + N for signal N) after killing what it left behind.
RUNNER = (
    r"""
import json, os, resource, signal, sys, time
"""
    + _KILLALL
    + r"""
killall(2.0)
data = sys.stdin.buffer.read()
nl = data.index(b"\n")
spec = json.loads(data[:nl])
blob = memoryview(data)[nl + 1:]
rundir = os.path.join("/scratch", "run-" + os.urandom(16).hex())
os.mkdir(rundir, 0o700)
offset = 0
for name, size in spec["files"]:
    path = os.path.join(rundir, name)
    parent = os.path.dirname(path)
    if parent != rundir:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob[offset:offset + size])
    os.chmod(path, 0o700)
    offset += size
stdin_fd = os.open("/scratch", os.O_TMPFILE | os.O_RDWR, 0o600)
view = blob[offset:offset + spec["stdin"]]
while view:
    view = view[os.write(stdin_fd, view):]
os.lseek(stdin_fd, 0, os.SEEK_SET)
del data, blob, view
env = dict(spec["env"], HOME=rundir)
command = spec["command"]
os.write(2, START_MARKER)
pid = os.fork()
if pid == 0:
    try:
        os.setsid()
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        os.chdir(rundir)
        for name, value in spec["rlimits"]:
            resource.setrlimit(getattr(resource, name), (value, value))
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        os.execvpe(command[0], command, env)
    except BaseException as exc:
        try:
            os.write(2, ("sandbox: cannot run %r: %s\n" % (command[0], exc)).encode())
        finally:
            os._exit(127)
os.close(stdin_fd)
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
killall(2.0)
code = os.waitstatus_to_exitcode(status)
os._exit(128 - code if code < 0 else code)
"""
).replace("START_MARKER", repr(START_MARKER))

# Between runs: kill every process of the run user, wipe every place a run can write to, report
# leftovers and the cgroup's OOM-kill counter as one JSON line. Nothing of the run is alive when
# the report is made, so a run cannot forge it.
CLEANUP = (
    r"""
import json, os, shutil, signal, stat, time
"""
    + _KILLALL
    + r"""
killed = killall(3.0)

def _fix(func, path, _exc):
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass

leftover = []
for top in ("/scratch", "/tmp", "/dev/shm", "/dev/mqueue"):
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        continue
    except OSError:
        leftover.append(top)
        continue
    for name in names:
        path = os.path.join(top, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.chmod(path, 0o700)
                shutil.rmtree(path, onerror=_fix)
            else:
                os.unlink(path)
        except OSError:
            pass
    try:
        if os.listdir(top):
            leftover.append(top)
    except OSError:
        leftover.append(top)

for kind in ("shm", "msg", "sem"):
    try:
        with open("/proc/sysvipc/" + kind) as f:
            if len(f.read().strip().splitlines()) > 1:
                leftover.append("sysv-" + kind)
    except OSError:
        pass

oom = None
for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    oom = int(value)
    except OSError:
        continue
    if oom is not None:
        break

print(json.dumps({"killed": killed, "leftover": leftover, "oom": oom}))
"""
)
