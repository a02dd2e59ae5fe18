"""The sandbox worker: the first code the confined interpreter runs (``python -I -S -c <this>``).

It confines its own process, says it is ready on the channel (a socket the trainer holds the
other end of, outside the sandbox), then answers the trainer's requests one at a time:

- ``load``: run the program (``code``) as ``__main__`` in a fresh module; reply whether it ran to
  the end (``SystemExit`` with code 0 or None counts as the end, anything else does not);
- ``exec``: run test statements in the program's namespace; ok if they returned normally;
- ``eval``: evaluate an expression there and reply its value, encoded as plain data (the
  trainer, never this process, compares it with the expected value, which never enters here);
- ``exit``: end the process.

Nothing the program prints is read as a verdict: replies go only to the channel, each carrying
the request's id. Confinement, by mode (``rewards.sandbox_launch`` says who chose it):

- ``bwrap``: the namespaces, mounts and capabilities are bubblewrap's; as root the worker then
  drops to a throwaway uid (so ``RLIMIT_NPROC`` applies) before any program code runs.
- ``seatbelt``: macOS ``sandbox-exec`` enforces the profile; the worker sets the rlimits.
- ``weak`` (no sandboxing tool, accepted explicitly): a new network namespace where the kernel
  allows it, a throwaway uid as root, the rlimits, and an audit hook refusing writes outside the
  work dir, ``exec``/``spawn`` and ``ctypes``. The hook is in-process Python: a guard rail only.

The package never imports this module; ``rewards.sandbox`` sends its text to the interpreter.
"""

import json
import os
import resource
import sys


def _rlimits(limits):
    mb = 1024 * 1024
    for which, value in ((resource.RLIMIT_CPU, limits["cpu_s"]),
                         (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                         (resource.RLIMIT_NPROC, limits["max_procs"]),
                         (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        soft, hard = resource.getrlimit(which)
        # never raise a limit the caller already had (the current rlimits are kept)
        value = value if soft == resource.RLIM_INFINITY else min(value, soft)
        top = value + 1 if which == resource.RLIMIT_CPU else value
        hard = top if hard == resource.RLIM_INFINITY else min(top, hard)
        resource.setrlimit(which, (value, hard))


def _drop_uid(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        os._exit(97)  # refuse to run program code as root


def _confine_weak(limits, uid, workdir):
    """The fallback without a sandboxing tool; returns whether the network is cut by the kernel."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: die with the trainer
    root = os.geteuid() == 0
    flags = 0x40000000 if root else 0x10000000 | 0x40000000  # CLONE_NEWNET [| CLONE_NEWUSER]
    net_isolated = libc.unshare(flags) == 0
    if root:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setuid
        _drop_uid(uid)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        data = (Data * 2)()
        # CAP_DAC_READ_SEARCH only: the interpreter may live under an unreadable /root
        data[0].effective = data[0].permitted = 1 << 2
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
            os._exit(97)
    for name in ("ctypes", "ctypes._endian", "_ctypes"):
        sys.modules.pop(name, None)
    return net_isolated


def _audit_hook(workdir, net_isolated):
    """The weak mode's guard rail (state in this closure, not in a module the program sees)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
        "os.chmod": (0,), "os.chown": (0,), "os.symlink": (0, 1), "os.link": (0, 1),
        "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
        "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
    }
    blocked = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.", "ctypes.",
               "os.fork_exec", "_posixsubprocess", "sys.addaudithook")
    sockets = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname")
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(path):
        if isinstance(path, int):
            return True  # an open descriptor was checked when it was opened
        try:
            real = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == workdir or real.startswith(workdir + sep) or real == "/dev/null"

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & write_flags)
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing outside the work dir: {path!r}")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the work dir: {args[i]!r}")
        elif event.startswith(blocked) or (event == "import" and args[0] in (
                "ctypes", "_ctypes", "subprocess", "_posixsubprocess")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif not net_isolated and event in sockets:
            raise PermissionError(f"sandbox: network is not allowed ({event})")

    return hook


def _encoder():
    """``encode(value)``: plain data as JSON-able ``[tag, payload]`` trees (``rewards.code_tests``
    decodes them); built-in base methods are used so the program's overrides are not called."""
    import base64

    def encode(value, depth=0):
        if depth > 64:
            raise ValueError("nested too deeply")
        kind = type(value)
        if value is None or value is Ellipsis:
            return ["n" if value is None else "e", None]
        if kind is bool:
            return ["b", value]
        if isinstance(value, int):  # hex: no limit on the number of digits
            return ["i", int.__format__(int.__index__(value), "x")]
        if isinstance(value, float):
            return ["f", float.__repr__(float(float.__float__(value)))]
        if isinstance(value, complex):
            c = complex.__complex__(value)
            return ["c", [float.__repr__(c.real), float.__repr__(c.imag)]]
        if isinstance(value, str):
            return ["s", str.__str__(value)]
        if isinstance(value, (bytes, bytearray)):
            return ["y", base64.b64encode(bytes(value)).decode()]
        for base, tag in ((list, "l"), (tuple, "t")):
            if isinstance(value, base):
                n = base.__len__(value)
                return [tag, [encode(base.__getitem__(value, i), depth + 1) for i in range(n)]]
        for base, tag in ((frozenset, "F"), (set, "S")):
            if isinstance(value, base):
                return [tag, [encode(v, depth + 1) for v in base.__iter__(value)]]
        if isinstance(value, dict):
            return ["d", [[encode(k, depth + 1), encode(v, depth + 1)]
                          for k, v in dict.items(value)]]
        raise ValueError(f"a {kind.__name__} is not plain data")

    return encode


def _serve(fd, workdir, hook):
    """The request loop; everything it needs is bound here, before program code runs."""
    import builtins
    import traceback
    import types

    loads, dumps, write, read = json.loads, json.dumps, os.write, os.read
    encode, out, err, exit_now = _encoder(), sys.stdout, sys.stderr, os._exit
    buffered = b""
    namespace = {}
    me, getpid = os.getpid(), os.getpid

    def send(message):
        data = (dumps(message) + "\n").encode()
        while data:
            data = data[write(fd, data):]

    def receive():
        nonlocal buffered
        while b"\n" not in buffered:
            chunk = read(fd, 1 << 16)
            if not chunk:
                exit_now(3)
            buffered += chunk
        line, _, buffered = buffered.partition(b"\n")
        return loads(line)

    def flush():
        for stream in (out, err):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001, S110 - a closed or replaced stream
                pass

    def report(error):
        try:
            # without the worker's own frame: the program's traceback only
            traceback.print_exception(type(error), error, error.__traceback__.tb_next, file=err)
            return f"{type(error).__name__}: {error}"[:500]
        except BaseException:  # noqa: BLE001 - the program's own __str__ may fail
            return "error"

    while True:
        request = receive()
        op, reply = request["op"], {"id": request["id"], "ok": False}
        if op == "exit":
            flush()
            exit_now(0)
        try:
            if op == "load":
                module = types.ModuleType("__main__")
                module.__file__ = os.path.join(workdir, "main.py")
                module.__builtins__ = builtins
                with open(module.__file__, "w", encoding="utf-8") as f:
                    f.write(request["code"])
                namespace = module.__dict__
                sys.modules["__main__"] = module
                sys.argv[:] = ["main.py"]
                if hook is not None:
                    sys.addaudithook(hook)
                    hook = None
                code = compile(request["code"], module.__file__, "exec")
                try:
                    exec(code, namespace)  # noqa: S102 - running the program is the point
                    reply["ok"] = True
                except SystemExit as e:
                    reply["ok"] = e.code is None or e.code == 0
                    reply["error"] = f"SystemExit({e.code!r})"
            elif op == "exec":
                exec(compile(request["src"], "<test>", "exec"), namespace)  # noqa: S102
                reply["ok"] = True
            elif op == "eval":
                value = eval(compile(request["src"], "<test>", "eval"), namespace)
                reply["value"], reply["ok"] = encode(value), True
        except BaseException as e:  # noqa: BLE001 - the program's failure is the reply
            reply["error"] = report(e)
        flush()
        if getpid() != me:  # a process the program forked, returning here: it has no say
            exit_now(0)
        send(reply)


def _main():
    config = json.loads(sys.argv[1])
    limits, mode, fd = config["limits"], config["mode"], config["fd"]
    workdir = os.path.realpath(config["workdir"])
    hook = None
    if mode == "weak":
        net_isolated = _confine_weak(limits, config["uid"], workdir)
        hook = _audit_hook(workdir, net_isolated)
    elif config["uid"] is not None:
        _drop_uid(config["uid"])
        net_isolated = True
    else:
        net_isolated = True
    _rlimits(limits)
    os.chdir(workdir)
    sys.path[:0] = [workdir]
    os.write(fd, (json.dumps({"ready": config["nonce"], "net_isolated": net_isolated,
                              "uid": os.getuid()}) + "\n").encode())
    _serve(fd, workdir, hook)


if __name__ == "__main__":  # `python -c <source>` runs as __main__; importing this does nothing
    _main()
