"""Where a run's files live: a local folder or an object-store URL (``s3://``, ``gs://``, any fsspec
protocol whose package is installed).

A location is a pathlib object: ``pathlib.Path`` for a local folder, ``upath.UPath`` for a URL, with
the same ``/``, ``exists``, ``glob``, ``read_text``. What an object store does differently is handled
here, in one place:

- atomic writes: locally a temporary file renamed over the target; in an object store one PUT of
  the whole content (an object appears whole or not at all, and a rename there is a copy);
- folders: an object store has none to create, and removing one removes every object under it;
- copies: a hard link locally, a server-side copy in an object store;
- model folders: ``from_pretrained`` reads local files, so a model at a URL is fetched once per node
  into a cache keyed by its listing (:func:`local_model`).

Credentials and endpoints come from the environment (``AWS_*``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``), never from the config, so none can reach the manifest. Listing
caches are off: other processes (Ray workers) write into the same prefixes.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Location = Any  # pathlib.Path (a local folder) or upath.UPath (a URL)


def is_url(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def check_url(url: str) -> None:
    """Raise ``ValueError`` when ``url``'s protocol is unknown or its fsspec package is missing."""
    import fsspec

    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{url}: {exc}") from None


def location(text: str | os.PathLike) -> Location:
    """A local path as ``Path``; a URL as ``UPath`` (listing cache off); a pinned Hub model
    (``hf://org/name@commit``) as its folder in this node's Hugging Face cache, fetched if needed.
    Remote locations stay as they are; local ones as given (callers make them absolute)."""
    if isinstance(text, Path):
        return text
    if not is_url(text):
        return Path(text)
    if str(text).startswith("hf://"):  # a pinned Hub model: its snapshot in this node's cache
        from grads_ray import hub

        return hub.snapshot(str(text))[0]
    if str(text).startswith("file://"):
        return Path(str(text)[len("file://"):])
    from upath import UPath

    if isinstance(text, UPath):
        return text
    return UPath(str(text), use_listings_cache=False)


def is_remote(loc: Location) -> bool:
    return not isinstance(loc, Path)


def makedirs(loc: Location) -> None:
    """Create a local folder (and parents); nothing to do in an object store."""
    if not is_remote(loc):
        loc.mkdir(parents=True, exist_ok=True)


def umask() -> int:
    """The process's umask, read without changing it where the system says (Linux's
    /proc/self/status); elsewhere set and put back at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file: 0666 less the umask (0644 under
    022). ``mkstemp`` makes 0600 files, which another account (the training job that reads the
    subset, a colleague on the cluster) could not read."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0777 less the umask (``mkdtemp`` makes 0700)."""
    return 0o777 & ~umask()


def make_temp_dir(prefix: str, near: Path | None = None) -> Path:
    """A new temporary folder (``mkdtemp``) with an ordinary folder's mode, so that what is renamed
    into place from it is readable as any other output."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=near))
    os.chmod(tmp, dir_mode())
    return tmp


def atomic_write(loc: Location, write: Callable[[Any], None]) -> None:
    """``write(binary file object)`` becomes ``loc``'s whole content, or nothing does: locally a
    temporary file beside it renamed over it, remotely one PUT of the buffered bytes."""
    if is_remote(loc):
        buf = io.BytesIO()
        write(buf)
        loc.fs.pipe_file(loc.path, buf.getvalue())
        return
    loc.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{loc.name}.", dir=loc.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would make every output private to its writer
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, loc)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(loc: Location, data: bytes) -> None:
    atomic_write(loc, lambda fh: fh.write(data))


def rmtree(loc: Location) -> None:
    """Remove a folder (every object under the prefix), if there."""
    if is_remote(loc):
        if loc.exists():
            loc.fs.rm(loc.path, recursive=True)
    else:
        shutil.rmtree(loc, ignore_errors=True)


def remove(loc: Location) -> None:
    """Remove a file or a folder, if there."""
    if is_remote(loc) or (loc.is_dir() and not loc.is_symlink()):
        rmtree(loc)
    else:
        loc.unlink(missing_ok=True)


def link_or_copy(src: Location, dst: Location) -> None:
    """``dst`` becomes ``src``'s content: a hard link where the file system allows (no copy; every
    writer here replaces files, never edits them, so a shared inode stays right), a server-side copy
    within one object store, else a copy of the bytes."""
    if not is_remote(src) and not is_remote(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    elif is_remote(src) and is_remote(dst) and src.protocol == dst.protocol:
        dst.fs.copy(src.path, dst.path)
    else:
        write_bytes(dst, src.read_bytes())


def copy_tree(src: Location, dst: Location) -> None:
    """Every file under ``src`` to the same place under ``dst`` (replacing ``dst``), by
    :func:`link_or_copy`."""
    rmtree(dst)
    for f in files_under(src):
        link_or_copy(f, dst / relative(f, src))


def files_under(loc: Location) -> list[Location]:
    """Every file below ``loc`` (recursively), sorted."""
    if is_remote(loc):
        return sorted((loc / relative_path(p, loc.path) for p in loc.fs.find(loc.path)), key=str)
    return sorted(p for p in loc.rglob("*") if p.is_file())


def relative_path(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1:]


def relative(f: Location, root: Location) -> str:
    return relative_path(f.path, root.path) if is_remote(f) else str(f.relative_to(root))


def upload_dir(local: Path, dst: Location) -> None:
    """A local folder's files to ``dst`` (replacing it): a rename locally, an upload remotely."""
    if not is_remote(dst):
        shutil.rmtree(dst, ignore_errors=True)
        Path(local).rename(dst)
        return
    rmtree(dst)
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        dst.fs.put_file(str(f), (dst / str(f.relative_to(local))).path)


def listing(loc: Location) -> list[tuple[str, int, str]]:
    """(name, size, version) of each file directly in a folder: a change to any file changes it
    (version: the modification time locally, the ETag or generation remotely)."""
    if not is_remote(loc):
        return sorted((p.name, p.stat().st_size, str(p.stat().st_mtime_ns)) for p in loc.iterdir() if p.is_file())
    out = []
    for e in loc.fs.ls(loc.path, detail=True):
        if e.get("type") == "file":
            version = e.get("ETag") or e.get("etag") or e.get("generation") or e.get("LastModified") or e.get("mtime")
            out.append((e["name"].rsplit("/", 1)[-1], int(e.get("size") or 0), str(version)))
    return sorted(out)


def cache_root() -> Path:
    """Node-local cache of fetched models: ``$GRADS_RAY_CACHE``, else ``~/.cache/grads_ray``."""
    return Path(os.environ.get("GRADS_RAY_CACHE") or Path.home() / ".cache" / "grads_ray")


def local_model(path: str) -> str:
    """A model folder ``from_pretrained`` can read: a local path as it is; a URL fetched into
    ``cache_root()/models/<hash of URL and listing>`` once per node (a rewritten model gets a new
    entry; concurrent fetches on one node are safe: each fills its own folder, the first rename wins)."""
    if not is_url(path) or path.startswith(("file://", "hf://")):
        return str(location(path))
    loc = location(path)
    files = listing(loc)
    if not files:
        raise FileNotFoundError(f"{path}: no files (a Hugging Face model folder is expected)")
    key = hashlib.sha256(repr((str(loc), files)).encode()).hexdigest()[:20]
    target = cache_root() / "models" / key
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{key}.", target.parent)
    try:
        for name, _, _ in files:
            loc.fs.get_file((loc / name).path, str(tmp / name))
        (tmp / ".complete").write_text(str(loc) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process on this node fetched it first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
