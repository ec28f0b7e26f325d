"""
Shared plumbing for every stage script: typed --key=value configs, device/dtype
choice, atomic writes, one-line user errors and run records.

Nothing here knows about models or data; it is imported by all the scripts so that
each of these concepts has exactly one home.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root (this file is prebias/common.py)
SEED = 1337  # every default seed (llama2.c's): the sample, the schedule, sampling, selection, the holdout
LEVEL = 0.95  # the level of every interval the toolkit reports (stats, bands, fits, bootstraps)


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


# the environment's faults a user fixes (errno -> what to do): one line, not a traceback
ENV_FAULTS = {errno.ENOSPC: "free some space (or write to another disk) and run the same command again",
              errno.EDQUOT: "free some of your disk quota (or write to another disk) and run the same command again",
              errno.EROFS: "give a writable output folder (or remount this one read-write) and run the same "
                           "command again",
              errno.EACCES: "give a folder this user may write (or change its permissions) and run the same "
                            "command again",
              errno.EPERM: "give a folder this user may write (or change its permissions) and run the same "
                           "command again"}


def env_fault_line(e: OSError) -> str:
    """The one line of an environment fault (ENV_FAULTS), naming the path when known.
    Nothing half-written is left (atomic_path removes its temp; a run resumes)."""
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write{where}: {e.strerror or os.strerror(e.errno)}; {ENV_FAULTS[e.errno]}"


def main_guard(fn):
    """Run fn(); turn UserError, and a full disk or a folder it may not write
    (ENV_FAULTS), into one line on stderr and exit code 1."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more, as cat does (before OSError: a subclass)
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        sys.exit(141)
    except OSError as e:
        if e.errno not in ENV_FAULTS:
            raise
        print(f"error: {env_fault_line(e)}", file=sys.stderr)
        sys.exit(1)


# -----------------------------------------------------------------------------
# JSON: one checked parse for every spec, config and record the stages read

def _unique_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:  # json keeps the last silently: two arms of one name, two values of one key
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def json_loads(text, unique: bool = True):
    """json.loads that refuses duplicate keys (unique) and says so for nesting too deep for
    the parser (RecursionError, at about 1,000 levels): both as ValueError, which every
    reader already turns into its one line naming the file."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique else None)
    except RecursionError:
        raise ValueError(f"nested deeper than {sys.getrecursionlimit()} levels") from None


# -----------------------------------------------------------------------------
# config: a dataclass is the schema; --key=value only for existing fields

def _convert(name, typ, raw):
    if typ is bool or typ == "bool":
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{name}={raw}: expected True or False")
    for t, tname in ((int, "int"), (float, "float")):
        if typ is t or typ == tname:
            try:
                return t(raw)
            except ValueError:
                raise UserError(f"--{name}={raw}: expected {tname}") from None
    return raw  # str


def config_help(cfg) -> str:
    lines = [f"options for {type(cfg).__name__} (--key=value):"]
    for f in dataclasses.fields(cfg):
        lines.append(f"  --{f.name}={getattr(cfg, f.name)!r}")
    return "\n".join(lines)


def parse_config(cfg, argv, choices=None):
    """Override fields of the dataclass instance cfg from argv ('--key=value' or a
    '.json' config file). Unknown keys, bad values, or values outside `choices`
    (field name -> allowed values) are a UserError naming the valid options."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    choices = choices or {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help(cfg))
            sys.exit(0)
        if arg.endswith(".json") and not arg.startswith("--"):
            try:
                obj = json_loads(Path(arg).read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"config file {arg}: {e}") from None
            if not isinstance(obj, dict):
                raise UserError(f"config file {arg} holds a JSON {type(obj).__name__}: it must be an object "
                                '{"key": value, ...} of the keys --help lists')
            items = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in obj.items()]
        elif arg.startswith("--") and "=" in arg:
            items = [arg[2:].split("=", 1)]
        else:
            raise UserError(f"bad argument {arg!r}: use --key=value (see --help)")
        for key, raw in items:
            if key not in fields:
                raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
            val = _convert(key, fields[key].type, str(raw))
            if isinstance(val, float) and not math.isfinite(val) and not (
                    math.isinf(val) and isinstance(fields[key].default, float) and fields[key].default == val):
                raise UserError(f"--{key}={raw}: expected a finite number")  # NaN fails every comparison, so range checks miss it
            if key in choices and val not in choices[key]:
                raise UserError(f"--{key}={val}: choose one of {', '.join(map(str, choices[key]))}")
            setattr(cfg, key, val)
    return cfg


def config_to_argv(settings: dict) -> list[str]:
    """{key: value} as train.py-style '--key=value' arguments (lists and dicts as JSON):
    how experiment.py and attribute.py hand settings to a stage they launch."""
    return [f"--{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in settings.items()]


# -----------------------------------------------------------------------------
# registries: one per extension point (schedule strategy, selection score, metric fast
# path, attribution estimator, launcher). A variant is one unit registered by name;
# the CLI choices, spec validation and the tests' lists are read from the registry.

class Registry(dict):
    """name -> unit. `@REG.register("name")` adds a class or function (and sets its
    .name); `REG.choices(pred)` is a live view of the names, so a unit registered later
    (a test, a user's plugin module) is a valid choice at once."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str):
        def deco(unit):
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            unit.name = name
            self[name] = unit
            return unit
        return deco

    def choices(self, pred=None, extra=()) -> "Choices":
        return Choices(self, pred, extra)

    def lookup(self, name: str, where: str):
        """The unit, or a UserError naming the valid choices."""
        if name not in self:
            raise UserError(f"{where}: unknown {self.what} {name!r}; choose one of {', '.join(self)}")
        return self[name]


class Choices:
    """The names of a registry's units that satisfy pred, plus fixed extra names, read
    afresh at every use (parse_config's `choices` takes it like a tuple)."""

    def __init__(self, reg: Registry, pred=None, extra=()):
        self.reg, self.pred, self.extra = reg, pred, tuple(extra)

    def __iter__(self):
        yield from self.extra
        yield from (k for k, u in self.reg.items() if self.pred is None or self.pred(u))

    def __contains__(self, name) -> bool:
        return name in list(self)

    def __repr__(self):
        return repr(tuple(self))


# -----------------------------------------------------------------------------
# device and dtype

def auto_device(device: str = "auto") -> str:
    """'auto' -> cuda where there is one, else cpu; a named device this torch build or
    machine does not have is one line (not a traceback from the first tensor moved)."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except Exception as e:  # RuntimeError (bad name, no such index), AssertionError (torch not compiled with CUDA)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--device={device}: not usable here ({why[:120]}); use --device=auto or --device=cpu") \
            from None
    return device


def auto_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on a CUDA device that supports it, float32 otherwise."""
    import torch
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def autocast_ctx(device: str, dtype: str):
    import torch
    if dtype == "float32":
        return contextlib.nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.amp.autocast(device_type=device.split(":")[0], dtype=ptdtype)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed blocks of up to `limit` bytes for reuse instead of
    returning them to the kernel (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). A CPU
    training step frees and allocates the same activations every step (the 15M shape's
    logits and their gradient are 32 MB each), and by default each comes back as fresh pages
    that the kernel faults in and zeroes: ~40,000 page faults a step at the 15M shape, about
    5% of the step's CPU time spent as system time (docs/results.md, training speed). The
    values computed are the same; the process keeps its peak memory, which a training
    process reaches every step anyway. True where set; a no-op (False) off glibc."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(limit)) and
                    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(limit)))
    except (OSError, AttributeError):  # musl and other libcs: no mallopt
        return False


# -----------------------------------------------------------------------------
# atomic writes: write to a temp file in the same folder, then rename

TMP_SUFFIX = ".prebias.tmp"  # atomic_path's temp files: .<name>.<8 random characters>.<writer's pid>.prebias.tmp
_TMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}(\.(?P<pid>\d+))?" + re.escape(TMP_SUFFIX))
_CLEANED = set()  # the targets whose stale temps this process has removed (atomic_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state, wall-clock start time) of process `pid` from Linux's /proc (10 ms ticks), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # fields 3 (state) and 22 (starttime)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _writer_gone(pid: int, tmp: Path) -> bool:
    """Whether the process that wrote `tmp` (pid from its name) is gone: no process has that
    pid; or it is a zombie (killed, not yet reaped: a killed pretokenize's workers are
    orphans that init reaps when it gets to them, and signal 0 still finds them); or the
    process that has that pid now started after `tmp` was last written (pids are reused:
    pid_max is 32,768 on many machines). make crash-test found a rerun of pretokenize keeping
    a killed worker's temp as a live writer's; the zombie check is what made it pass, and a
    reused pid is the same hazard."""
    if not _alive(pid):
        return True
    st = _proc_stat(pid)
    return st is not None and (st[0] in "ZX" or tmp.stat().st_mtime < st[1])


def _remove_dead_temps(path: Path):
    """Before the first write of `path` in this process: the temps of `path` that a killed
    writer left (_writer_gone), so a rerun of any stage leaves none. A live writer's temp (a
    concurrent command) stays."""
    if path in _CLEANED:
        return
    _CLEANED.add(path)
    for p in path.parent.glob(f".{glob_escape(path.name)}.*{TMP_SUFFIX}"):
        m = _TMP.fullmatch(p.name)
        if m and m.group("name") == path.name and p.is_file() and not p.is_symlink() and \
                (m.group("pid") is None or _writer_gone(int(m.group("pid")), p)):
            p.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove_stale_temps(folder, names: str):
    """Remove the temp files atomic_path left behind in folder when a kill interrupted a
    save, of the files whose names match the regex `names` only: nothing else there is
    touched (a user's own .notes.tmp stays)."""
    want = re.compile(names)
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        m = _TMP.fullmatch(p.name)
        if m and want.fullmatch(m.group("name")) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def fault_point(path):
    """The crash harness's hook (tests/test_crash.py), called just before every rename that
    publishes a file (atomic_path: every output of every stage goes through it): with
    PREBIAS_FAULT_COUNT=<file> each call appends the path to that file (so a test counts a
    stage's writes, over all its processes); with PREBIAS_FAULT_AT=N as well, the Nth call
    kills the command with SIGKILL, as `kill -9` would: its whole process group where the
    command leads its own session (the harness starts it so: workers die with it), else
    this process only; with PREBIAS_FAULT_ERRNO=ENOSPC (or EROFS, EACCES...) the Nth write
    fails with that error instead. Unset (always, outside the harness), it does nothing."""
    log = os.environ.get("PREBIAS_FAULT_COUNT")
    if not log:
        return
    with open(log, "a+") as f:  # one count over the command's processes (pretokenize's workers)
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{path}\n")
        f.flush()
        f.seek(0)
        n = sum(1 for _ in f)
    if os.environ.get("PREBIAS_FAULT_AT", "") != str(n):
        return
    fault = os.environ.get("PREBIAS_FAULT_ERRNO")  # e.g. ENOSPC: this write fails so, as on a full disk
    if fault:
        raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)), str(path))
    import signal
    if os.getpgid(0) == os.getsid(0):
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success rename it onto `path`, on error
    remove it, so readers never see a half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {path}: {next(p for p in path.parents if p.exists())} is a file where a folder "
                        "belongs; move it away (or choose another output folder)") from None
    if path.is_dir():
        raise UserError(f"cannot write {path}: a folder is in its place; move it away")
    _remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}{TMP_SUFFIX}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(tmp)
        fault_point(path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fault = _write_fault(e, path, tmp)
        if fault is not None:
            raise fault from None
        raise


def _write_fault(e: BaseException, path: Path, tmp: str) -> OSError | None:
    """The OSError naming `path` of a failed write (a full disk or a folder it may not
    write: ENV_FAULTS), for main_guard's one line; None for anything else. np.save gives
    no file name, torch.save a RuntimeError of its zip writer. An error that names another
    file is that file's (a write nested in this one's body, or a pool worker's, already
    named by its own atomic_path) and keeps its name."""
    if isinstance(e, OSError) and e.errno in ENV_FAULTS:
        if e.filename is not None and os.fsdecode(e.filename) not in (tmp, str(path)):
            return None
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)):
        with contextlib.suppress(OSError):  # the zip writer's short write: a full disk when little is free
            if shutil.disk_usage(path.parent).free < 64 << 20:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def write_text_atomic(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_figure(fig, path, dpi: int = 110):
    """A matplotlib figure to PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def step_axis(ax, max_step: int, label: bool = True, fontsize=None):
    """Training steps on a symlog x axis (linear in [0, 1], logarithmic above), so that
    step 0 and the log-spaced checkpoints 0, 1, 2, 4, ... are all visible and spread."""
    from matplotlib.ticker import FuncFormatter
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(-0.2, max(max_step, 1) * 1.3)
    if label:
        ax.set_xlabel("training step (optimizer steps,\nsymlog: linear in [0, 1])", fontsize=fontsize)


def write_csv_atomic(df, path):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


# -----------------------------------------------------------------------------
# "already computed, skip": one record for every stage that reuses earlier work

def file_signature(path) -> list:
    """Identifies one file's version cheaply (size, mtime): a rewritten file gets a new one."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


class DoneRecord:
    """A JSON file saying which items of a stage are done, and from what.

    `settings` is everything every item's result depends on (versions, options, word
    lists, the scorer...): when it changes, every item is forgotten. Each item (a shard,
    a checkpoint) also has its own key (e.g. the file_signature or sha256 of its input);
    an item is done when its stored key equals the current key and its outputs exist.

        rec = DoneRecord(out / "done.json", {"version": 2, "metrics": names}, redo)
        for it, path in ckpts:
            if rec.is_done(it, file_signature(path), png): continue
            ...; rec.mark(it, file_signature(path))
        rec.save(keep=[it for it, _ in ckpts])
    """

    def __init__(self, path, settings: dict, redo: bool = False):
        self.path, self.settings = Path(path), json.loads(json.dumps(settings))  # JSON-normalised
        _remove_dead_temps(self.path)  # a rerun that finds every item done never writes the record again
        old = {}
        if self.path.exists() and not redo:
            try:
                old = json.loads(self.path.read_text())
            except ValueError:
                old = {}
        self.changed = bool(old) and old.get("settings") != self.settings
        self.done = old.get("done", {}) if old.get("settings") == self.settings else {}

    def is_done(self, item, key, *outputs) -> bool:
        return (self.done.get(str(item)) == json.loads(json.dumps(key))
                and all(Path(o).exists() for o in outputs))

    def mark(self, item, key, save: bool = False):
        self.done[str(item)] = key
        if save:
            self.save()

    def save(self, keep=None):
        """Write the record; with `keep`, forget the items not in it (e.g. deleted checkpoints)."""
        if keep is not None:
            keep = {str(i) for i in keep}
            self.done = {k: v for k, v in self.done.items() if k in keep}
        write_json_atomic(self.path, {"settings": self.settings, "done": self.done})


# -----------------------------------------------------------------------------
# run records

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "numpy", "sentencepiece", "pandas", "sacrebleu", "rouge-score",
                "vaderSentiment"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class FolderLock:
    """<folder>/.lock, held (flock) while a run (train.py) or an experiment (experiment.py)
    writes into the folder: a second process on the same folder gets one line naming the
    holder instead of interleaving its files with the first one's."""

    def __init__(self, out_dir, flag: str = "--out_dir"):
        self.path = Path(out_dir) / ".lock"
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise UserError(f"{flag}={out_dir} is a file, not a folder: give a folder")
        self.created = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a .lock that is a symbolic link is refused, never followed (and truncated)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise UserError(f"{self.path} is a symbolic link: remove it (the lock is a plain file)") from None
            raise UserError(f"cannot create the lock file {self.path} ({e.strerror}): remove {self.path} if it is "
                            f"not a plain file, or give a writable {flag}") from None
        self.f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            self.f.seek(0)
            holder = self.f.read().strip() or "another process"
            self.f.close()
            raise UserError(f"{out_dir} is in use by {holder}: wait for it to finish, or use another {flag}") \
                from None
        except OSError as e:  # no lock support here (some network filesystems)
            self.f.close()
            raise UserError(f"{out_dir}: this filesystem cannot lock files ({e.strerror}); use a folder on a "
                            "local disk or one mounted with lock support") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        self.f.flush()

    def release(self):
        """Unlock; a folder this lock created and nothing else wrote into goes away (a run
        refused before its first write leaves nothing behind)."""
        if self.created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
            self.path.unlink()
            self.path.parent.rmdir()
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
