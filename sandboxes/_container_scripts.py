"""Python programs that run inside the sandbox containers (passed with `python3 -I -S -c`, so the
image needs nothing of ours and a root file system that stays read-only).

Users inside a container:
  INIT_UID (65534): PID 1, the container's init. Runs cannot signal or trace it (another uid and no
      capabilities), so it outlives every run.
  RUN_UID (10001): the runner (one long-lived process per container) and every run it starts.

The runner and the runs share a uid, so the runner makes itself non-dumpable: a run can then
neither trace it nor open its /proc entries (memory, file descriptors), and so can neither read
another run's request nor forge a reply. A run can still kill it; the host then sees the stream end
without a report and replaces the container.
"""

INIT_UID = 65534
RUN_UID = 10001

# The runner's replies on its stdout: frames of (kind, length) + payload. The program's output
# reaches the host only inside OUTPUT frames, so a program cannot forge the others.
FRAME_FORMAT = ">BI"
FRAME_REPORT = 0  # JSON: the state after a cleanup, and for a run its exit status
FRAME_STDOUT = 1
FRAME_STDERR = 2
FRAME_STARTED = 3  # sent just before the fork: the program's clock starts here

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


# The long-lived runner, started once per container with `docker exec`. On its stdin it reads
# requests, one JSON line each: {"op": "run", ...} followed by the files' bytes and the stdin bytes,
# or {"op": "kill"} (stop the current run now; ignored between runs). For each run it writes the
# files into a fresh /scratch/run-<random> directory, starts the command there with its stdin from
# an unlinked file, forwards its output, and afterwards kills every process of the run user, wipes
# every place a run can write to, and reports the exit status, leftovers and whether the kernel
# OOM-killed anything. It sends one such report (without an exit status) right after it starts.
RUNNER = (
    f"FRAME_FORMAT = {FRAME_FORMAT!r}\n"
    f"REPORT, STDOUT, STDERR, STARTED = {FRAME_REPORT}, {FRAME_STDOUT}, {FRAME_STDERR}, {FRAME_STARTED}\n"
    + r"""
import ctypes, json, os, resource, select, shutil, signal, stat, struct, time
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
FRAME = struct.Struct(FRAME_FORMAT)

def emit(kind, data=b""):
    view = memoryview(FRAME.pack(kind, len(data)) + data)
    while view:
        view = view[os.write(1, view):]

inbox = bytearray()

def receive(timeout):
    ready, _, _ = select.select([0], [], [], timeout)
    if ready:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            raise SystemExit(0)
        inbox.extend(chunk)

def take_line():
    while b"\n" not in inbox:
        receive(None)
    nl = inbox.index(b"\n")
    line = bytes(inbox[:nl])
    del inbox[:nl + 1]
    return line

def take(size):
    while len(inbox) < size:
        receive(None)
    data = bytes(inbox[:size])
    del inbox[:size]
    return data

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
        time.sleep(0.001)

def _fix(func, path, _exc):
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass

def wipe():
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
    return leftover

def oom_kills():
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None

def cleanup(**extra):
    killed = killall(3.0)
    report = dict(extra, killed=killed, leftover=wipe())
    emit(REPORT, json.dumps(report).encode())

# SIGCHLD wakes the select loop through this pipe when the program ends.
wake_r, wake_w = os.pipe()
os.set_blocking(wake_r, False)
os.set_blocking(wake_w, False)
signal.signal(signal.SIGCHLD, lambda *_: None)
signal.set_wakeup_fd(wake_w)

def run(spec):
    blob = memoryview(take(sum(size for _, size in spec["files"]) + spec["stdin"]))
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
    view = blob[offset:]
    while view:
        view = view[os.write(stdin_fd, view):]
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    del blob, view
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    env = dict(spec["env"], HOME=rundir)
    command = spec["command"]
    oom_before = oom_kills()
    emit(STARTED)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(stdin_fd, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.chdir(rundir)
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")  # under memory pressure the kernel picks the program, not the runner
            except OSError:
                pass
            for name, value in spec["rlimits"]:
                resource.setrlimit(getattr(resource, name), (value, value))
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            os.execvpe(command[0], command, env)
        except BaseException as exc:
            try:
                os.write(2, ("sandbox: cannot run %r: %s\n" % (command[0], exc)).encode())
            finally:
                os._exit(127)
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    streams = {out_r: STDOUT, err_r: STDERR}
    status = None
    drain_until = None
    while streams or status is None:
        timeout = 0.5 if status is None else max(0.0, drain_until - time.monotonic())
        try:
            ready, _, _ = select.select([0, wake_r, *streams], [], [], timeout)
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        if 0 in ready:
            receive(0)
            if b"\n" in inbox:  # the host's kill: the only message sent while a run is on
                take_line()
                killall(2.0)
        if status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
                killall(2.0)  # what the program left running dies with it
                drain_until = time.monotonic() + 2.0
        for fd in [fd for fd in ready if fd in streams]:
            data = os.read(fd, 1 << 16)
            if data:
                emit(streams[fd], data)
            else:
                os.close(fd)
                del streams[fd]
        if status is not None and streams and time.monotonic() > drain_until:
            break
    for fd in streams:
        os.close(fd)
    code = os.waitstatus_to_exitcode(status)
    oom_after = oom_kills()
    oom_killed = oom_before is not None and oom_after is not None and oom_after > oom_before
    cleanup(exit_code=128 - code if code < 0 else code, oom_killed=oom_killed)

cleanup()
while True:
    spec = json.loads(take_line())
    if spec.get("op") == "run":
        run(spec)
"""
)
