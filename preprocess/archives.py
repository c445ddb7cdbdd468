"""Safe archive extraction and file hashing for dataset preprocessing.

Dataset archives come from the internet, so extraction must never write outside the
folder it was asked to fill. Python's `zipfile` silently rewrites dangerous member
names and `tarfile` (before the 'data' filter) follows them, so both formats are checked
here member by member and refused loudly instead:

* absolute member paths (`/etc/cron.d/x`),
* members whose path leaves the destination (`../evil.txt`, or a path that walks
  through a symlink extracted earlier),
* symbolic or hard links whose target leaves the destination,
* device files and FIFOs.

Every check happens twice: once on the member names before anything is written (so an
obviously malicious archive writes nothing at all), and once against the real file
system right before each member is written (so a chain of individually harmless links
cannot be used to escape).

`PreprocessError` lives here because this is the lowest-level module of the package;
`preprocess.preprocess` re-exports it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
from pathlib import Path

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2")

# Raised by the 'data' extraction filter (Python >= 3.11.4); an empty tuple matches nothing.
_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())


class PreprocessError(ValueError):
    """A problem the user can fix (missing file, bad archive, unknown dataset).

    The command line prints the message as `error: <message>` without a traceback,
    so messages must say what went wrong and what to do about it.
    """


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract(archive_path: str | os.PathLike[str], dest_dir: str | os.PathLike[str]) -> None:
    """Extract a .zip, .tar, .tar.gz/.tgz or .tar.bz2 archive into `dest_dir`.

    Raises PreprocessError naming the archive and the offending member if any member
    would be written (or would point) outside `dest_dir`, or is a device file. When an
    unsafe member is only detectable during extraction, the members before it are left
    in `dest_dir`; callers extract into a temporary folder they delete on error.
    """
    archive = Path(archive_path)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        _extract_zip(archive, dest)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2")):
        _extract_tar(archive, dest)
    else:
        raise PreprocessError(
            f"{archive}: unsupported archive type; expected one of {', '.join(ARCHIVE_SUFFIXES)}"
        )


def _refuse(archive: Path, member: str, reason: str) -> PreprocessError:
    return PreprocessError(f"{archive}: refusing to extract member {member!r}: {reason}")


def _check_name_lexically(archive: Path, member: str) -> None:
    """Refuse absolute names and names whose '..' components climb out of the destination."""
    if os.path.isabs(member) or member.startswith(("/", "\\")):
        raise _refuse(archive, member, "absolute path")
    normalized = os.path.normpath(member)
    if normalized == ".." or normalized.startswith(".." + os.sep):
        raise _refuse(archive, member, "path leaves the destination folder")


def _check_link_target_lexically(archive: Path, member: str, target: str, *, hard: bool) -> None:
    """Refuse link targets that are absolute or climb out of the destination.

    Symlink targets are relative to the link's folder; tar hard-link targets are
    relative to the archive root.
    """
    if os.path.isabs(target):
        raise _refuse(archive, member, f"link to absolute path {target!r}")
    base = "" if hard else os.path.dirname(member)
    normalized = os.path.normpath(os.path.join(base, target))
    if normalized == ".." or normalized.startswith(".." + os.sep):
        raise _refuse(archive, member, f"link target {target!r} leaves the destination folder")


def _inside(dest_real: str, path: str) -> bool:
    """True if `path`, after resolving every symlink that exists now, is inside `dest_real`."""
    resolved = os.path.realpath(path)
    return resolved == dest_real or resolved.startswith(dest_real + os.sep)


def _check_on_disk(archive: Path, dest_real: str, member: str, link_target: str | None = None,
                   *, hard: bool = False) -> None:
    """Re-check a member against the file system as it is right before writing it."""
    member_path = os.path.join(dest_real, member).rstrip(os.sep)
    # Resolving the full path also catches an earlier member that left a link at this
    # very name: writing through it would land wherever the link points.
    if not _inside(dest_real, member_path):
        raise _refuse(archive, member, "path leads outside the destination through a link")
    if link_target is not None:
        base = dest_real if hard else os.path.dirname(member_path)
        if not _inside(dest_real, os.path.join(base, link_target)):
            raise _refuse(archive, member, f"link target {link_target!r} resolves outside the destination")


def _zip_member_mode(info: zipfile.ZipInfo) -> int:
    """Unix mode bits stored by the archiver (0 when the archive was made elsewhere)."""
    return info.external_attr >> 16


def _extract_zip(archive: Path, dest: Path) -> None:
    dest_real = os.path.realpath(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            link_targets: dict[str, str] = {}
            for info in members:
                _check_name_lexically(archive, info.filename)
                mode = _zip_member_mode(info)
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                    raise _refuse(archive, info.filename, "device file, FIFO or socket")
                if stat.S_ISLNK(mode):
                    target = zf.read(info).decode("utf-8")
                    _check_link_target_lexically(archive, info.filename, target, hard=False)
                    link_targets[info.filename] = target

            for info in members:
                target = link_targets.get(info.filename)
                _check_on_disk(archive, dest_real, info.filename, target)
                if target is None:
                    zf.extract(info, dest_real)
                else:
                    # zipfile would write the link as a small text file; recreate the link.
                    link_path = os.path.join(dest_real, info.filename)
                    os.makedirs(os.path.dirname(link_path), exist_ok=True)
                    os.symlink(target, link_path)
    except zipfile.BadZipFile as exc:
        raise PreprocessError(f"{archive}: not a valid zip file ({exc}); delete it and fetch it again") from exc


def _extract_tar(archive: Path, dest: Path) -> None:
    dest_real = os.path.realpath(dest)
    # Python >= 3.11.4 ships the 'data' filter, which repeats these checks and also
    # strips setuid bits and foreign ownership.
    filter_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_name_lexically(archive, member.name)
                if member.isdev():
                    raise _refuse(archive, member.name, "device file or FIFO")
                if member.issym() or member.islnk():
                    _check_link_target_lexically(archive, member.name, member.linkname, hard=member.islnk())

            for member in members:
                link_target = member.linkname if (member.issym() or member.islnk()) else None
                _check_on_disk(archive, dest_real, member.name, link_target, hard=member.islnk())
                tar.extract(member, dest_real, **filter_kwargs)
    except _TAR_FILTER_ERROR as exc:
        member_name = exc.tarinfo.name if exc.tarinfo is not None else "?"
        raise _refuse(archive, member_name, str(exc)) from exc
    except tarfile.TarError as exc:
        raise PreprocessError(f"{archive}: not a valid tar archive ({exc}); delete it and fetch it again") from exc
