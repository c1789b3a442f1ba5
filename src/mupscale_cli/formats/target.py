"""How an output appears: all at once, by one writer, from inputs that did not change meanwhile.

- `temp_name(dest)`: `.<name>.mupscale-tmp-<pid>-<random>` beside `dest` (same file system: renames are
  atomic; the pid tells a later run whether its writer is gone).
- `atomic_dir(dest, replace)`: build a whole output directory beside `dest`, then swap it in with one
  `renameat2(RENAME_EXCHANGE)` (or, where the file system lacks it, two renames whose interruption the next
  run repairs). Until the swap the old output is intact, after it the new one is complete.
- `rename_noreplace(src, dst)`: commit without clobbering what another writer committed meanwhile.
- `claim(dest)`: one writer per output: an exclusive `flock` on `.<name>.mupscale-lock` beside it.
- `InputWatch`: size, mtime and inode of every input file, compared again before the commit.
- `env_error(e, path)`: disk full, quota, read-only, file too large, too many open files, permission
  denied: one line naming the path (exit 2), never a traceback.
- `install_sigbus_handler()`: an input read through mmap that shrinks raises SIGBUS, which Python cannot
  turn into an exception; the handler prints one line, removes this process's temporaries and exits 2.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mupscale_cli.errors import MupscaleError, one_line
from mupscale_cli.libc import libc as c_library

TMP_MARKER = ".mupscale-tmp-"
"""Part of every temporary name: `.<dest name>.mupscale-tmp-<pid>-<random>` (files and directories)."""
OLD_MARKER = ".mupscale-old-"
"""A replaced output directory kept only between the two renames of the fallback swap."""
LOCK_SUFFIX = ".mupscale-lock"

_live: set[Path] = set()  # temporaries of this process, removed by the SIGBUS handler


def temp_name(dest: Path, marker: str = TMP_MARKER) -> Path:
    return dest.with_name(f".{dest.name}{marker}{os.getpid()}-{secrets.token_hex(4)}")


def track(path: Path) -> None:
    """Register a temporary of this process (removed if the process must stop at once)."""
    _live.add(Path(path))


def untrack(path: Path) -> None:
    _live.discard(Path(path))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- renames -----------------------------------------------------------------------------------------

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = c_library()
        f = libc.renameat2
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        f.restype = ctypes.c_int
        return f
    except (OSError, AttributeError):
        return None


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False if this system or file system cannot (then nothing happened)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, raising FileExistsError if `dst` exists (atomically where renameat2 works;
    elsewhere checked just before: mupscale's own writers are kept apart by `claim`)."""
    if _rename2(src, dst, RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False if not supported here."""
    return _rename2(a, b, RENAME_EXCHANGE)


def commit_path(tmp: Path, dest: Path, replace: bool) -> None:
    """Move a finished temporary (file or directory) to `dest`: an existing `dest` only if `replace`
    (a directory is swapped, then the old one removed); fsyncs the parent directory."""
    if not replace or not os.path.lexists(dest):
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError:
            raise MupscaleError(f"-o {dest}: appeared while this output was written (another writer?); "
                                f"pass --force to overwrite") from None
    elif tmp.is_dir() and not dest.is_symlink():
        if not dest.is_dir():
            raise MupscaleError(f"-o {dest}: exists and is not a directory")
        if exchange(tmp, dest):  # tmp now holds the old output
            fsync_dir(dest.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = temp_name(dest, OLD_MARKER)  # the next run puts it back if we die between the renames
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


@contextmanager
def atomic_dir(dest: Path, replace: bool = False) -> Iterator[Path]:
    """An empty temporary directory beside `dest` to build a whole output in; on success its entries and
    itself are fsynced and it becomes `dest` at once (`replace`: swapping out an existing `dest`). On any
    exception, signal or kill `dest` is untouched; the temporary is removed (after a kill, by the next run's
    `clean_stale_temps`)."""
    tmp = temp_name(dest)
    tmp.mkdir()
    track(tmp)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(tmp)
        commit_path(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        untrack(tmp)


# --- one writer per output ---------------------------------------------------------------------------

def input_root(path: Path) -> Path:
    """What an input occupies on disk: its directory for a directory input (Hugging Face, DCP, shards) or for
    a file that stands for one (a DCP `.metadata`, a shard index); else the file itself."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.name == ".metadata" or path.name.endswith(".safetensors.index.json"):
        return path.parent
    return path


def _chain(p: Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `p` (if it exists) and of each existing ancestor, innermost first."""
    out = []
    for q in [p, *p.parents]:
        try:
            st = q.stat()
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino))
    return out


def check_not_over_input(out: Path, inp: Path) -> None:
    """-o is not a symbolic link (check_output_link) and never equals the input, contains it (an ancestor directory, which a directory output would replace)
    or lies inside an input directory, whatever the spelling: symlinks resolved, `..` removed, and compared by
    device and inode too (a hard link, a bind mount, a second path to the same directory)."""
    root = input_root(inp)
    try:
        r_out, r_in = Path(os.path.realpath(out)), Path(os.path.realpath(root))
        out_chain, in_chain = _chain(r_out), _chain(r_in)
        out_id = out_chain[0] if os.path.lexists(r_out) and out_chain else None
        in_id = in_chain[0] if in_chain and r_in.exists() else None
    except (OSError, ValueError) as e:
        raise MupscaleError(f"-o {one_line(str(out))}: cannot compare it with the input ({e.__class__.__name__}: "
                            f"{one_line(str(e))[:120]})") from None
    shown = one_line(str(out))
    if r_out == r_in or (out_id is not None and out_id == in_id):
        raise MupscaleError(f"-o {shown}: is the input {one_line(str(inp))}; refusing to write over it")
    if r_in.is_relative_to(r_out) or (out_id is not None and out_id in in_chain[1:]):
        raise MupscaleError(f"-o {shown}: contains the input {one_line(str(inp))}; writing there would replace "
                            f"it: give a path outside the input")
    if root.is_dir() and (r_out.is_relative_to(r_in) or (in_id is not None and in_id in out_chain[1:])):
        raise MupscaleError(f"-o {shown}: lies inside the input directory {one_line(str(root))}; write beside it")
    check_output_link(out)
    check_output_kind(out)


def check_inside(root: Path, p: Path) -> None:
    """A file of the input directory `root` that is a symbolic link must stay inside it; the one exception is
    the Hugging Face cache layout, where models--ORG--NAME/snapshots/REV/FILE links to that repository's own
    blobs/. Anything else (`tokenizer.model -> ../secret/id_rsa`) is refused: never read, never published."""
    if not p.is_symlink():
        return
    real_root, target = Path(os.path.realpath(root)), Path(os.path.realpath(p))
    if target.is_relative_to(real_root):
        return
    repo = real_root.parent.parent
    if real_root.parent.name == "snapshots" and repo.name.startswith("models--") and \
            target.is_relative_to(repo / "blobs") and target.is_file():
        return
    raise MupscaleError(f"{one_line(str(p))}: is a symbolic link leading out of {one_line(str(root))} (to "
                        f"{one_line(os.readlink(p))}); mupscale follows links only inside the input (and a Hugging "
                        f"Face cache snapshot's own blobs/): copy the file in, or remove the link")


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{LOCK_SUFFIX}")


@contextmanager
def claim(dest: Path) -> Iterator[None]:
    """Hold an exclusive claim on output `dest` (flock on `.<name>.mupscale-lock` beside it, which holds the
    writer's pid) or fail at once naming the writer that has it. The lock file is removed on release; a
    killed writer's lock file is reused (the kernel drops the lock with the process)."""
    import fcntl
    lock = lock_path(dest)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:  # e.g. -o /proc/self/x.pt: no file can be made there
            code = errno.errorcode.get(e.errno, e.errno)
            raise env_error(OSError(e.errno, e.strerror), f"-o {dest}") or MupscaleError(
                f"-o {one_line(str(dest))}: cannot create files in {one_line(str(dest.parent))}: {e.strerror} "
                f"({code})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MupscaleError(f"-o {dest}: being written by pid {pid} (another mupscale widen); wait for it, "
                                f"or write elsewhere") from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise env_error(e, lock) or MupscaleError(f"-o {dest}: cannot lock {lock}: {e.strerror}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its previous holder removed it meanwhile: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    track(lock)
    try:
        yield
    finally:
        untrack(lock)
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


# --- inputs that change ------------------------------------------------------------------------------

class InputWatch:
    """Size, mtime (ns), inode and device of input files; `check()` raises if any differs now."""

    def __init__(self, files=()):
        self._seen: dict[Path, tuple | None] = {}
        self.add(files)

    @staticmethod
    def _stat(p: Path) -> tuple | None:
        try:
            st = os.stat(p)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev

    def add(self, files) -> None:
        for p in files:
            p = Path(p)
            if p not in self._seen:
                self._seen[p] = self._stat(p)

    def check(self) -> None:
        for p, before in self._seen.items():
            now = self._stat(p)
            if now != before:
                what = "was removed" if now is None else "was replaced" if before and now[2:] != before[2:] \
                    else "changed (size or modification time)"
                raise MupscaleError(f"{p}: {what} while it was read; the output was not written (the result "
                                    f"would mix two versions): rerun once the input is stable")


# --- environment errors ------------------------------------------------------------------------------

ENV_ERRORS = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.EROFS: "read-only file system: write elsewhere",
    errno.EFBIG: "file too large for this file system or for `ulimit -f`",
    errno.EMFILE: "too many open files (`ulimit -n`)",
    errno.ENFILE: "too many open files in the system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error (failing disk?)",
}


def env_error(e: BaseException, path) -> MupscaleError | None:
    """A one-line MupscaleError for an OSError the environment causes, naming `path` (or the error's own
    file name, when it has one), else None."""
    if not isinstance(e, OSError) or e.errno not in ENV_ERRORS:
        return None
    where = e.filename if e.filename and TMP_MARKER not in str(e.filename) else path
    return MupscaleError(f"{where}: {ENV_ERRORS[e.errno]} ({errno.errorcode.get(e.errno, e.errno)})")


def os_error(e: OSError) -> MupscaleError:
    """Any other OSError as one line naming its file(s) and the system's reason (exit 2: the environment)."""
    names = [one_line(str(f)) for f in (e.filename, e.filename2) if f and TMP_MARKER not in str(f)]
    what = " -> ".join(n if len(n) <= 120 else n[:60] + "..." + n[-40:] for n in names) or "mupscale"
    code = errno.errorcode.get(e.errno, e.errno) if e.errno else type(e).__name__
    return MupscaleError(f"{what}: {one_line(e.strerror or str(e))} ({code})")


def check_output_link(out: Path) -> None:
    """-o that is a symbolic link is refused: replacing the link or what it points to are both plausible and
    either surprises someone (an earlier output reached through `latest -> run-17`)."""
    if out.is_symlink():
        target = os.readlink(out)
        what = "a symbolic link" if out.exists() else "a dangling symbolic link"
        state = "" if out.exists() else ", which does not exist"
        raise MupscaleError(f"-o {one_line(str(out))}: is {what} (to {one_line(target)}{state}); mupscale replaces "
                            f"neither a link nor what it points to, --force or not: pass the path it should write "
                            f"itself, or remove the link")


def check_output_kind(out: Path) -> None:
    """-o that exists as anything but a regular file or a directory (a FIFO, a socket, a device) is refused,
    --force or not: replacing it would remove what another program reads or listens on."""
    import stat
    try:
        mode = os.lstat(out).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a parent that is a file: named later)
        return
    except OSError as e:
        raise os_error(e) from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise MupscaleError(f"-o {one_line(str(out))}: is {kind}, not a file or directory; mupscale never replaces "
                        f"one: give another path")


def check_output_name(raw: str) -> None:
    """-o spelled with a trailing '/' names a directory: a file name there (`wide.safetensors/`) is refused
    rather than written as a file (the '/' is lost once the path is parsed, so the command line checks it)."""
    if raw.endswith(("/", os.sep)) and Path(raw).suffix in (".safetensors", ".pt"):
        raise MupscaleError(f"-o {one_line(raw)}: ends in '/' (a directory) but names a {Path(raw).suffix} file; "
                            f"drop the '/' for a file, or name a directory (with --shard-size) for shards")


# --- SIGBUS ------------------------------------------------------------------------------------------

_SIGBUS = {"what": "an input file", "handler": None}
_SIGBUS_ONCE = threading.Lock()  # one faulting thread reports (two at once printed the line twice)


def sigbus_names(what: str) -> None:
    """Name the input in the SIGBUS message (the handler cannot know which file shrank)."""
    from mupscale_cli.errors import one_line
    _SIGBUS["what"] = one_line(what)


def _on_sigbus(signum: int) -> None:  # runs in the faulting thread; no return (the fault would repeat)
    if not _SIGBUS_ONCE.acquire(blocking=False):  # another thread faulted too: it reports and exits
        time.sleep(60)
    try:
        os.write(2, f"mupscale: error: {one_line(_SIGBUS['what'])} shrank or vanished while it was read (bus error); "
                    f"nothing was written: rerun once the input is stable\n".encode(errors="replace"))
        for p in list(_live):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except OSError:
                    pass
    finally:
        os._exit(2)


def install_sigbus_handler() -> bool:
    """For the `mupscale` program (process-wide, so not for library callers): SIGBUS (an mmapped input
    truncated under us) becomes a one-line error, exit 2, temporaries removed. False where unavailable."""
    if _SIGBUS["handler"] is not None:
        return True
    if not sys.platform.startswith("linux") or not hasattr(signal, "SIGBUS"):
        return False
    try:
        libc = c_library()
        kind = ctypes.CFUNCTYPE(None, ctypes.c_int)
        handler = kind(_on_sigbus)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, kind]
        libc.signal(signal.SIGBUS, handler)
    except (OSError, AttributeError):
        return False
    _SIGBUS["handler"] = handler  # keep the callback alive
    return True
