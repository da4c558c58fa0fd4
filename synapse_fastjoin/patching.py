"""Apply, revert and check the quilt-style patch series carried by this project.

Some of what synapse-fastjoin does cannot be done from a Synapse module, so the
project also ships a small series of patches against one exact Synapse release
(``patches/series``).  This module manages that series against an installed
``matrix-synapse``:

* :func:`read_series` parses the series file (including its
  ``# synapse-version: X.Y.Z`` header, the single source of truth for the
  Synapse release the series targets) and every patch in it.
* :func:`status` reports, per patch, whether it is applied, unapplied or in
  conflict with the installed files.
* :func:`apply` / :func:`revert` bring the installation to the fully patched /
  pristine state, all or nothing.
* :func:`verify_applied` is the cheap check run at every Synapse start-up.

Matching is exact: context and removed lines must match byte for byte (a hunk
may be found at a different line number, but there is no fuzz).  That is what
makes :func:`revert` restore every file byte for byte, and what lets the state
of a patch be decided without any bookkeeping on disk: a patch is *applied* if
its reverse applies exactly, *unapplied* if it applies exactly, and in
*conflict* otherwise.

Everything is handled as bytes, split on ``\\n`` only, so line endings (and
files without a final newline) are preserved exactly.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import site
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Literal, Mapping, Optional

__all__ = [
    "APPLY_COMMAND",
    "FileDiff",
    "Hunk",
    "Patch",
    "PatchSeriesError",
    "PatchState",
    "Series",
    "SynapseInstall",
    "VersionMismatchError",
    "apply",
    "default_series_dir",
    "locate_synapse",
    "read_series",
    "revert",
    "status",
    "verify_applied",
]

#: The command that applies the series; quoted in error messages.
APPLY_COMMAND = "synapse-fastjoin patches apply"

#: Name of the series file inside a series directory.
SERIES_FILE = "series"

_VERSION_HEADER_RE = re.compile(r"^#\s*synapse-version\s*:\s*(?P<version>\S+)\s*$")
_HUNK_HEADER_RE = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_EPOCH_TIMESTAMP_RE = re.compile(rb"^(1970-01-01|1969-12-31)[ T]")
_DEP3_HEADER_RE = re.compile(r"^(?P<key>[A-Za-z][A-Za-z0-9-]*):(?P<value>.*)$")

PatchStateName = Literal["applied", "unapplied", "conflict"]


class PatchSeriesError(Exception):
    """The patch series cannot be read, checked, applied or reverted.

    ``str(e)`` is a complete, user-facing explanation.
    """


class VersionMismatchError(PatchSeriesError):
    """The installed Synapse is not the release the patch series targets."""


# ---------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SynapseInstall:
    """Where an installed ``matrix-synapse`` lives, and which release it is.

    Attributes:
        site_dir: the directory holding the ``synapse`` package and its
            ``matrix_synapse-*.dist-info``; the paths in patches are relative
            to it.
        package_dir: ``site_dir / "synapse"``.
        version: the version from the dist-info ``METADATA``.
    """

    site_dir: Path
    package_dir: Path
    version: str


@dataclass(frozen=True)
class Hunk:
    """One ``@@ -a,b +c,d @@`` hunk of a unified diff.

    Attributes:
        old_start, old_len, new_start, new_len: the numbers of the hunk header.
        lines: ``(op, content)`` pairs; ``op`` is ``" "`` (context), ``"-"``
            (removed) or ``"+"`` (added); ``content`` is the exact bytes of the
            file line including its line terminator (absent for a last line
            marked ``\\ No newline at end of file``).
        patch_line: 1-based line number of the hunk header in the patch file,
            for error messages.
    """

    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: tuple[tuple[str, bytes], ...]
    patch_line: int

    @property
    def old_lines(self) -> list[bytes]:
        """The lines the hunk expects to find (context and removed lines)."""
        return [content for op, content in self.lines if op != "+"]

    @property
    def new_lines(self) -> list[bytes]:
        """The lines the hunk leaves behind (context and added lines)."""
        return [content for op, content in self.lines if op != "-"]

    @property
    def header(self) -> str:
        """The ``@@ ... @@`` header, for error messages."""
        return (
            f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@"
        )


@dataclass(frozen=True)
class FileDiff:
    """The changes a patch makes to one file.

    Attributes:
        old_path: path (relative to the site directory, POSIX style) of the
            file before the change, or None if the patch creates the file.
        new_path: path of the file after the change, or None if the patch
            deletes it.
        hunks: the hunks, in file order.
        new_mode: permission bits for a created file (from a git
            ``new file mode`` line), or None.
    """

    old_path: Optional[str]
    new_path: Optional[str]
    hunks: tuple[Hunk, ...]
    new_mode: Optional[int] = None

    @property
    def path(self) -> str:
        """The path of the file this diff touches."""
        path = self.new_path if self.new_path is not None else self.old_path
        assert path is not None
        return path

    @property
    def creates(self) -> bool:
        """Whether applying the diff creates the file."""
        return self.old_path is None

    @property
    def deletes(self) -> bool:
        """Whether applying the diff deletes the file."""
        return self.new_path is None


@dataclass(frozen=True)
class Patch:
    """One patch of the series.

    Attributes:
        name: the file name as listed in ``series``.
        path: the patch file.
        description: the DEP-3 ``Description:`` (or ``Subject:``), with
            continuation lines joined by newlines; empty if absent.
        headers: every DEP-3 header, keyed by lower-cased field name.
        files: the file diffs, in patch order.
    """

    name: str
    path: Path
    description: str
    headers: Mapping[str, str]
    files: tuple[FileDiff, ...]

    @property
    def touched_paths(self) -> list[str]:
        """Every path (relative to the site directory) the patch touches."""
        return list(dict.fromkeys(fd.path for fd in self.files))


@dataclass(frozen=True)
class Series:
    """A parsed patch series.

    Attributes:
        directory: the directory holding ``series`` and the patch files.
        target_version: the Synapse version from ``# synapse-version:``.
        patches: the patches, in series (application) order.
    """

    directory: Path
    target_version: str
    patches: tuple[Patch, ...] = field(default_factory=tuple)

    @property
    def touched_paths(self) -> list[str]:
        """Every path the series touches, in first-touched order."""
        return list(
            dict.fromkeys(
                path for patch in self.patches for path in patch.touched_paths
            )
        )


@dataclass(frozen=True)
class PatchState:
    """Whether one patch is applied to an installation.

    Attributes:
        name: the patch name as listed in ``series``.
        state: ``"applied"``, ``"unapplied"`` or ``"conflict"``.
        detail: for a conflict, which file and hunk do not match (and why);
            otherwise empty.
    """

    name: str
    state: PatchStateName
    detail: str = ""


# ---------------------------------------------------------------------------
# Locating things
# ---------------------------------------------------------------------------


def _source_patches_dir() -> Path:
    """The ``patches`` directory of a source checkout of this project."""
    return Path(__file__).resolve().parent.parent / "patches"


def _installed_patches_dirs() -> list[Path]:
    """Where ``setup.cfg``'s ``data_files`` put the series when installed."""
    prefixes = [Path(sys.prefix)]
    user_base = getattr(site, "USER_BASE", None) or site.getuserbase()
    if user_base:
        prefixes.append(Path(user_base))
    return [prefix / "share" / "synapse-fastjoin" / "patches" for prefix in prefixes]


def default_series_dir() -> Path:
    """Find the patch series shipped with this project.

    Prefers ``patches/`` next to the package source (a source checkout or an
    editable install), then the copy installed as data files under
    ``<sys.prefix>/share/synapse-fastjoin/patches``.

    Returns:
        The directory containing the ``series`` file.

    Raises:
        PatchSeriesError: if no series file can be found.
    """
    candidates = [_source_patches_dir(), *_installed_patches_dirs()]
    for candidate in candidates:
        if (candidate / SERIES_FILE).is_file():
            return candidate
    looked = ", ".join(str(c / SERIES_FILE) for c in candidates)
    raise PatchSeriesError(
        f"cannot find the synapse-fastjoin patch series (looked for {looked}); "
        "pass the directory holding the series file explicitly"
    )


def _read_dist_version(site_dir: Path) -> str:
    """Read the matrix-synapse version from its dist-info in ``site_dir``.

    Raises:
        PatchSeriesError: if there is no (or more than one) matrix-synapse
            dist-info, or it has no version.
    """
    dist_infos = sorted(site_dir.glob("matrix_synapse-*.dist-info"))
    if not dist_infos:
        raise PatchSeriesError(
            f"found a synapse package in {site_dir} but no "
            "matrix_synapse-*.dist-info next to it, so its version is unknown; "
            "is matrix-synapse installed with pip in this environment?"
        )
    if len(dist_infos) > 1:
        names = ", ".join(d.name for d in dist_infos)
        raise PatchSeriesError(
            f"several matrix-synapse installations are recorded in {site_dir} "
            f"({names}); reinstall matrix-synapse to clean this up"
        )
    metadata = dist_infos[0] / "METADATA"
    try:
        text = metadata.read_text(encoding="utf-8")
    except OSError as e:
        raise PatchSeriesError(f"cannot read {metadata}: {e.strerror or e}") from e
    for line in text.splitlines():
        if not line.strip():
            break  # end of the header block; the body is the long description
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "version" and value.strip():
            return value.strip()
    raise PatchSeriesError(f"{metadata} has no Version field")


def locate_synapse(site_dir: Optional[Path] = None) -> SynapseInstall:
    """Find an installed ``matrix-synapse`` and its version.

    Synapse itself is never imported (importing it is slow and has side
    effects); the version comes from the dist-info ``METADATA``.

    Args:
        site_dir: the directory holding the ``synapse`` package (usually a
            ``site-packages``).  Default: wherever the running interpreter
            would import ``synapse`` from.

    Returns:
        The installation.

    Raises:
        PatchSeriesError: if there is no synapse package, or its version
            cannot be determined.
    """
    if site_dir is None:
        try:
            spec = importlib.util.find_spec("synapse")
        except (ImportError, ValueError) as e:
            raise PatchSeriesError(f"cannot look for Synapse: {e}") from e
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise PatchSeriesError(
                "Synapse (the matrix-synapse package) is not installed in the "
                f"Python environment of {sys.executable}; run this command with "
                "the Python that runs Synapse, or pass --site-packages"
            )
        package_dir = Path(locations[0]).resolve()
        site_dir = package_dir.parent
    else:
        site_dir = Path(site_dir).resolve()
        package_dir = site_dir / "synapse"
        if not (package_dir / "__init__.py").is_file():
            raise PatchSeriesError(
                f"{site_dir} does not contain the synapse package "
                f"({package_dir / '__init__.py'} is missing)"
            )
    return SynapseInstall(
        site_dir=site_dir, package_dir=package_dir, version=_read_dist_version(site_dir)
    )


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def read_series(series_dir: Optional[Path] = None) -> Series:
    """Parse a series file and every patch it lists.

    Args:
        series_dir: the directory holding ``series`` and the patches.
            Default: :func:`default_series_dir`.

    Returns:
        The series.

    Raises:
        PatchSeriesError: if the series or a patch is missing or malformed
            (the message names the file and line), or the series has no
            ``# synapse-version:`` header.
    """
    directory = Path(series_dir) if series_dir is not None else default_series_dir()
    series_path = directory / SERIES_FILE
    try:
        text = series_path.read_text(encoding="utf-8")
    except OSError as e:
        raise PatchSeriesError(
            f"cannot read the patch series {series_path}: {e.strerror or e}"
        ) from e

    version: Optional[str] = None
    names: list[str] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = _VERSION_HEADER_RE.match(line)
            if match:
                if version is not None and version != match.group("version"):
                    raise PatchSeriesError(
                        f"{series_path}:{lineno}: conflicting synapse-version "
                        f"headers ({version} and {match.group('version')})"
                    )
                version = match.group("version")
            continue
        # quilt allows per-patch options after the name; we only support -p1.
        name, *options = line.split()
        if any(option != "-p1" for option in options):
            raise PatchSeriesError(
                f"{series_path}:{lineno}: unsupported patch options {' '.join(options)!r}"
            )
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise PatchSeriesError(
                f"{series_path}:{lineno}: patch name {name!r} must be a path "
                "inside the series directory"
            )
        if name in names:
            raise PatchSeriesError(
                f"{series_path}:{lineno}: patch {name} is listed twice"
            )
        names.append(name)

    if version is None:
        raise PatchSeriesError(
            f"{series_path} has no '# synapse-version: X.Y.Z' header line"
        )
    patches = tuple(_read_patch(name, directory / name) for name in names)
    return Series(directory=directory, target_version=version, patches=patches)


def _split_lines(data: bytes) -> list[bytes]:
    """Split on ``\\n`` only, keeping terminators (``b"".join`` inverts it)."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _read_patch(name: str, path: Path) -> Patch:
    """Read and parse one patch file.

    Raises:
        PatchSeriesError: if it is missing or malformed.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PatchSeriesError(
            f"cannot read patch {name} ({path}): {e.strerror or e}"
        ) from e
    lines = _split_lines(data)

    # The DEP-3 header block ends at a line that is exactly "---".  Be lenient
    # with patches lacking the separator: the diff then starts at the first
    # line that looks like one.
    diff_start = None
    for index, line in enumerate(lines):
        stripped = line.rstrip(b"\r\n")
        if stripped == b"---":
            header_lines, diff_start = lines[:index], index + 1
            break
        if stripped.startswith((b"diff ", b"--- ", b"Index: ")):
            header_lines, diff_start = lines[:index], index
            break
    if diff_start is None:
        raise PatchSeriesError(f"patch {name} ({path}) contains no diff")

    try:
        header_text = b"".join(header_lines).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatchSeriesError(f"patch {name}: headers are not UTF-8: {e}") from e
    headers = _parse_dep3(header_text)
    description = headers.get("description", headers.get("subject", ""))
    files = _parse_diff(name, lines, diff_start)
    if not files:
        raise PatchSeriesError(f"patch {name} ({path}) contains no file changes")
    return Patch(
        name=name, path=path, description=description, headers=headers, files=files
    )


def _parse_dep3(text: str) -> dict[str, str]:
    """Parse DEP-3 headers into a dict keyed by lower-cased field name.

    Continuation lines start with whitespace; a continuation line consisting of
    a single ``.`` stands for an empty line (as in Debian control files).
    """
    headers: dict[str, str] = {}
    current: Optional[str] = None
    for raw in text.splitlines():
        if not raw.strip():
            current = None
            continue
        if raw[0] in " \t" and current is not None:
            continuation = raw.strip()
            headers[current] += "\n" + ("" if continuation == "." else continuation)
            continue
        match = _DEP3_HEADER_RE.match(raw)
        if match:
            current = match.group("key").lower()
            value = match.group("value").strip()
            headers[current] = (
                headers[current] + "\n" + value if current in headers else value
            )
        else:
            current = None  # free text; DEP-3 allows it after the headers
    return {key: value.strip("\n") for key, value in headers.items()}


def _parse_diff_path(
    patch_name: str, lineno: int, raw: bytes, strip_prefix: bytes
) -> Optional[str]:
    """Parse the path of a ``---``/``+++`` line (after the marker).

    Returns:
        The path relative to the site directory, or None for ``/dev/null``.

    Raises:
        PatchSeriesError: if the path is unsupported or outside ``synapse/``.
    """
    text, _, timestamp = raw.rstrip(b"\r\n").partition(b"\t")
    try:
        path = text.rstrip(b" ").decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatchSeriesError(f"patch {patch_name}:{lineno}: path is not UTF-8") from e
    if path == "/dev/null" or _EPOCH_TIMESTAMP_RE.match(timestamp):
        # `diff -N` marks a missing file with the epoch (in local time) as
        # its timestamp rather than with /dev/null.
        return None
    if path.startswith('"'):
        raise PatchSeriesError(
            f"patch {patch_name}:{lineno}: quoted paths are not supported ({path})"
        )
    prefix = strip_prefix.decode()
    if not path.startswith(prefix):
        raise PatchSeriesError(
            f"patch {patch_name}:{lineno}: expected a path starting with "
            f"{prefix!r}, got {path!r}"
        )
    relative = PurePosixPath(path[len(prefix) :])
    if (
        relative.is_absolute()
        or ".." in relative.parts
        or not relative.parts
        or relative.parts[0] != "synapse"
        or len(relative.parts) < 2
    ):
        raise PatchSeriesError(
            f"patch {patch_name}:{lineno}: {path!r} is not a file inside the "
            "synapse package (paths must look like a/synapse/...)"
        )
    return relative.as_posix()


@dataclass
class _GitBlock:
    """What the extended header lines of one ``diff --git`` block said."""

    line: int  # index of the "diff --git" line
    path: Optional[str]
    new_mode: Optional[int] = None
    deleted: bool = False
    has_files: bool = False  # whether ---/+++ lines followed


def _parse_diff(
    patch_name: str, lines: list[bytes], start: int
) -> tuple[FileDiff, ...]:
    """Parse the unified diff part of a patch.

    Understands plain ``diff -u`` output and ``git diff`` output (including
    ``new file mode`` / ``deleted file mode`` lines and new empty files).
    Lines that are neither file headers nor hunks (``diff``, ``index``,
    ``Only in`` lines, trailing signatures) are ignored, like ``patch`` does.

    Raises:
        PatchSeriesError: on malformed or unsupported content; the message
            names the patch and the line.
    """
    files: list[FileDiff] = []
    # State of a pending "diff --git" block, for files git describes without
    # ---/+++ lines (new or deleted empty files).
    git_block: Optional[_GitBlock] = None

    def error(index: int, message: str) -> PatchSeriesError:
        return PatchSeriesError(f"patch {patch_name}:{index + 1}: {message}")

    def flush_git_block() -> None:
        nonlocal git_block
        if git_block is not None and not git_block.has_files:
            if git_block.new_mode is not None or git_block.deleted:
                path = git_block.path
                if path is None:
                    raise error(git_block.line, "cannot parse the diff --git line")
                files.append(
                    FileDiff(
                        old_path=None if git_block.new_mode is not None else path,
                        new_path=None if git_block.deleted else path,
                        hunks=(),
                        new_mode=git_block.new_mode,
                    )
                )
        git_block = None

    i = start
    n = len(lines)
    while i < n:
        line = lines[i]
        if line.startswith(b"diff --git "):
            flush_git_block()
            # "diff --git a/X b/X"; only needed for files without ---/+++
            # lines, whose path is the "b/" one.
            _, sep, new_side = line.rstrip(b"\r\n").rpartition(b" b/")
            path = (
                _parse_diff_path(patch_name, i + 1, b"b/" + new_side, b"b/")
                if sep
                else None
            )
            git_block = _GitBlock(line=i, path=path)
            i += 1
            continue
        if git_block is not None and not git_block.has_files:
            stripped = line.rstrip(b"\r\n")
            if stripped.startswith(b"new file mode "):
                try:
                    git_block.new_mode = int(stripped.split()[-1], 8) & 0o7777
                except ValueError:
                    raise error(i, "malformed 'new file mode' line") from None
                i += 1
                continue
            if stripped.startswith(b"deleted file mode "):
                git_block.deleted = True
                i += 1
                continue
            if stripped.startswith(
                (b"rename ", b"copy ", b"old mode ", b"new mode ", b"similarity ")
            ):
                raise error(i, "renames, copies and mode changes are not supported")
        if line.startswith((b"GIT binary patch", b"Binary files ")):
            raise error(i, "binary patches are not supported")
        if line.startswith(b"--- ") and i + 1 < n and lines[i + 1].startswith(b"+++ "):
            old_path = _parse_diff_path(patch_name, i + 1, line[4:], b"a/")
            new_path = _parse_diff_path(patch_name, i + 2, lines[i + 1][4:], b"b/")
            if old_path is None and new_path is None:
                raise error(i, "both sides of the diff are /dev/null")
            if old_path is not None and new_path is not None and old_path != new_path:
                raise error(i, f"renames are not supported ({old_path} -> {new_path})")
            new_mode = None
            if git_block is not None:
                git_block.has_files = True
                new_mode = git_block.new_mode
            i += 2
            hunks: list[Hunk] = []
            while i < n and lines[i].startswith(b"@@ "):
                hunk, i = _parse_hunk(patch_name, lines, i)
                hunks.append(hunk)
            if not hunks:
                raise error(i, f"no hunks for {new_path or old_path}")
            if old_path is None and any(h.old_len for h in hunks):
                raise error(i, f"the diff creating {new_path} expects existing lines")
            if new_path is None and any(h.new_len for h in hunks):
                raise error(i, f"the diff deleting {old_path} leaves lines behind")
            files.append(
                FileDiff(
                    old_path=old_path,
                    new_path=new_path,
                    hunks=tuple(hunks),
                    new_mode=new_mode,
                )
            )
            continue
        if line.startswith(b"@@ "):
            raise error(i, "hunk outside of a file diff (missing ---/+++ lines?)")
        i += 1
    flush_git_block()
    return tuple(files)


def _parse_hunk(patch_name: str, lines: list[bytes], i: int) -> tuple[Hunk, int]:
    """Parse the hunk whose header is ``lines[i]``.

    Returns:
        The hunk and the index of the first line after it.

    Raises:
        PatchSeriesError: if the hunk is malformed or truncated.
    """
    header_index = i
    match = _HUNK_HEADER_RE.match(lines[i])
    if not match:
        raise PatchSeriesError(
            f"patch {patch_name}:{i + 1}: malformed hunk header "
            f"{lines[i].rstrip().decode('utf-8', 'replace')!r}"
        )
    old_start, new_start = int(match.group(1)), int(match.group(3))
    old_len = int(match.group(2)) if match.group(2) is not None else 1
    new_len = int(match.group(4)) if match.group(4) is not None else 1
    old_left, new_left = old_len, new_len
    body: list[tuple[str, bytes]] = []
    i += 1

    def strip_newline(index: int) -> None:
        if not body:
            raise PatchSeriesError(
                f"patch {patch_name}:{index + 1}: '\\ No newline at end of file' "
                "without a preceding line"
            )
        op, content = body[-1]
        if content.endswith(b"\n"):
            body[-1] = (op, content[:-1])

    while old_left > 0 or new_left > 0:
        if i >= len(lines):
            raise PatchSeriesError(
                f"patch {patch_name}:{header_index + 1}: hunk is truncated "
                f"(expected {old_len} old and {new_len} new lines)"
            )
        line = lines[i]
        if not line.endswith(b"\n"):
            line += b"\n"  # patch file without a final newline
        op = line[:1]
        if op == b"\\":
            strip_newline(i)
        elif op in (b" ", b"-", b"+"):
            counts_old = op != b"+"
            counts_new = op != b"-"
            if (counts_old and old_left == 0) or (counts_new and new_left == 0):
                raise PatchSeriesError(
                    f"patch {patch_name}:{i + 1}: hunk has more lines than its "
                    f"header ({lines[header_index].rstrip().decode('utf-8', 'replace')}) says"
                )
            old_left -= counts_old
            new_left -= counts_new
            body.append((op.decode(), line[1:]))
        elif line in (b"\n", b"\r\n"):
            # An empty context line whose leading space was stripped (editors do
            # that); patch(1) accepts it too.
            if old_left == 0 or new_left == 0:
                raise PatchSeriesError(
                    f"patch {patch_name}:{i + 1}: hunk has more lines than its header says"
                )
            old_left -= 1
            new_left -= 1
            body.append((" ", line))
        else:
            raise PatchSeriesError(
                f"patch {patch_name}:{i + 1}: unexpected line in hunk "
                f"(expected {old_left} more old and {new_left} more new lines): "
                f"{line.rstrip().decode('utf-8', 'replace')!r}"
            )
        i += 1
    if i < len(lines) and lines[i].startswith(b"\\"):
        strip_newline(i)
        i += 1
    hunk = Hunk(
        old_start=old_start,
        old_len=old_len,
        new_start=new_start,
        new_len=new_len,
        lines=tuple(body),
        patch_line=header_index + 1,
    )
    return hunk, i


# ---------------------------------------------------------------------------
# Applying in memory
# ---------------------------------------------------------------------------


class _Mismatch(Exception):
    """A file diff does not apply (exactly) to the current content."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def _describe(line: bytes) -> str:
    """Render one file line for an error message."""
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    if len(text) > 80:
        text = text[:77] + "..."
    return repr(text)


def _find_hunk(
    lines: list[bytes], expected: list[bytes], want: int, lowest: int
) -> Optional[int]:
    """Find where ``expected`` occurs exactly in ``lines``.

    Tries ``want`` first, then positions ever further from it (like patch(1)'s
    offset search, but without fuzz), never before ``lowest`` (hunks do not
    overlap and are in file order).

    Returns:
        The index, or None if ``expected`` does not occur.
    """
    highest = len(lines) - len(expected)
    if highest < lowest:
        return None
    want = min(max(want, lowest), highest)
    first = expected[0]
    size = len(expected)
    for distance in range(0, max(want - lowest, highest - want) + 1):
        for pos in (want - distance, want + distance) if distance else (want,):
            if lowest <= pos <= highest and lines[pos] == first:
                if lines[pos : pos + size] == expected:
                    return pos
    return None


def _closest_match(
    lines: list[bytes], expected: list[bytes], want: int, lowest: int
) -> int:
    """Where ``expected`` matches ``lines`` best (most equal lines).

    Only used to explain a mismatch, so simplicity beats speed.  Ties go to
    the position nearest ``want``.
    """
    highest = max(len(lines) - len(expected), lowest)
    best, best_key = want, None
    for pos in range(lowest, highest + 1):
        score = sum(
            1
            for offset, wanted in enumerate(expected)
            if pos + offset < len(lines) and lines[pos + offset] == wanted
        )
        key = (score, -abs(pos - want))
        if best_key is None or key > best_key:
            best, best_key = pos, key
    return best


def _first_difference(lines: list[bytes], expected: list[bytes], pos: int) -> str:
    """Explain how ``expected`` differs from ``lines`` at ``pos``."""
    for offset, wanted in enumerate(expected):
        index = pos + offset
        if index >= len(lines):
            return f"the file ends at line {len(lines)}, before the hunk does"
        if lines[index] != wanted:
            found = lines[index]
            if found.rstrip(b"\r\n") == wanted.rstrip(b"\r\n"):
                why = "line endings differ"
            else:
                why = f"expected {_describe(wanted)}, found {_describe(found)}"
            return f"first difference at line {index + 1}: {why}"
    return "no exact match"  # pragma: no cover - matched lines are not reported


def _apply_file_diff(
    diff: FileDiff, content: Optional[list[bytes]], reverse: bool
) -> Optional[list[bytes]]:
    """Apply (or reverse) one file diff to a file's lines, exactly.

    Args:
        diff: the file diff.
        content: the file's current lines, or None if it does not exist.
        reverse: undo the diff instead of applying it.

    Returns:
        The new lines, or None if the file must not exist afterwards.

    Raises:
        _Mismatch: if the diff does not apply exactly.
    """
    path = diff.path
    absent_before = diff.deletes if reverse else diff.creates
    absent_after = diff.creates if reverse else diff.deletes
    if absent_before:
        if content is not None:
            raise _Mismatch(path, "already exists")
        content = []
    elif content is None:
        raise _Mismatch(path, "does not exist")

    result: list[bytes] = []
    cursor = 0  # first line of `content` not yet consumed
    drift = 0  # how far the previous hunk was from its stated position
    for number, hunk in enumerate(diff.hunks, start=1):
        if reverse:
            expected, replacement = hunk.new_lines, hunk.old_lines
            start, length = hunk.new_start, hunk.new_len
        else:
            expected, replacement = hunk.old_lines, hunk.new_lines
            start, length = hunk.old_start, hunk.old_len
        # For an empty side, "start" is the line *after which* to insert.
        stated = start - 1 if length else start
        if expected:
            pos = _find_hunk(content, expected, stated + drift, cursor)
            if pos is None:
                closest = _closest_match(content, expected, stated + drift, cursor)
                raise _Mismatch(
                    path,
                    f"hunk #{number} ({hunk.header}) does not match at line "
                    f"{stated + 1} or anywhere else; closest match at line "
                    f"{closest + 1}, {_first_difference(content, expected, closest)}",
                )
        else:
            pos = stated + drift
            if not cursor <= pos <= len(content):
                raise _Mismatch(
                    path,
                    f"hunk #{number} ({hunk.header}) inserts at line {pos}, "
                    f"outside the file ({len(content)} lines)",
                )
        drift = pos - stated
        result.extend(content[cursor:pos])
        result.extend(replacement)
        cursor = pos + len(expected)
    result.extend(content[cursor:])

    if absent_after:
        if result:
            what = "created" if reverse else "expects to delete"
            raise _Mismatch(
                path,
                f"content differs from what the patch {what} "
                f"({len(result)} unexpected lines)",
            )
        return None
    return result


_Lookup = Callable[[str], Optional[list[bytes]]]


def _apply_patch(
    patch: Patch, lookup: _Lookup, reverse: bool
) -> dict[str, Optional[list[bytes]]]:
    """Apply (or reverse) every file diff of a patch, in memory.

    Args:
        patch: the patch.
        lookup: returns the current lines of a path (None if absent).
        reverse: undo the patch instead of applying it.

    Returns:
        The new content of every touched path (None for absent files).

    Raises:
        _Mismatch: if any file diff does not apply exactly.
    """
    changed: dict[str, Optional[list[bytes]]] = {}
    diffs = reversed(patch.files) if reverse else patch.files
    for diff in diffs:
        current = changed[diff.path] if diff.path in changed else lookup(diff.path)
        changed[diff.path] = _apply_file_diff(diff, current, reverse)
    return changed


def _apply_patch_partially(
    patch: Patch, lookup: _Lookup, reverse: bool
) -> tuple[dict[str, Optional[list[bytes]]], list[str]]:
    """Apply (or reverse) the file diffs of a patch that apply, skip the rest.

    Only used to model a patch in conflict as well as possible, so that the
    patches around it are judged on plausible content.

    Returns:
        The new content of every touched path, and the paths whose diffs
        did apply.
    """
    changed: dict[str, Optional[list[bytes]]] = {}
    succeeded: list[str] = []
    diffs = reversed(patch.files) if reverse else patch.files
    for diff in diffs:
        current = changed[diff.path] if diff.path in changed else lookup(diff.path)
        try:
            changed[diff.path] = _apply_file_diff(diff, current, reverse)
            succeeded.append(diff.path)
        except _Mismatch:
            changed[diff.path] = current
    return changed, list(dict.fromkeys(succeeded))


class _Tree:
    """The files of an installation, read lazily and at most once."""

    def __init__(self, site_dir: Path) -> None:
        self.site_dir = site_dir
        self.disk: dict[str, Optional[bytes]] = {}

    def read(self, path: str) -> Optional[bytes]:
        """The bytes of ``path`` (relative to the site dir), None if absent.

        Raises:
            PatchSeriesError: if the path exists but cannot be read as a file.
        """
        if path not in self.disk:
            full = self.site_dir / path
            try:
                self.disk[path] = full.read_bytes()
            except FileNotFoundError:
                self.disk[path] = None
            except OSError as e:
                raise PatchSeriesError(f"cannot read {full}: {e.strerror or e}") from e
        return self.disk[path]

    def lines(self, path: str) -> Optional[list[bytes]]:
        """The lines of ``path``, None if absent."""
        data = self.read(path)
        return None if data is None else _split_lines(data)


@dataclass
class _Analysis:
    """Where each patch stands, and the content of the two possible outcomes.

    Attributes:
        states: per patch, in series order.
        tree: the on-disk content that was examined.
        pristine: every touched path with all applied patches reverted.
        patched: every touched path with all patches applied.
    """

    states: list[PatchState]
    tree: _Tree
    pristine: dict[str, Optional[list[bytes]]]
    patched: dict[str, Optional[list[bytes]]]

    @property
    def conflicts(self) -> list[PatchState]:
        return [s for s in self.states if s.state == "conflict"]


def _lookup_in(overlay: Mapping[str, Optional[list[bytes]]], tree: _Tree) -> _Lookup:
    """A lookup reading ``overlay`` first, then the files on disk."""

    def lookup(path: str) -> Optional[list[bytes]]:
        return overlay[path] if path in overlay else tree.lines(path)

    return lookup


def _analyse(install: SynapseInstall, series: Series) -> _Analysis:
    """Work out which patches are applied, entirely in memory.

    The installed files are taken to be the pristine files plus some subset
    of the patches applied in series order.  Walking the series backwards,
    a patch whose reverse applies exactly is applied (and is reverted in
    memory, so earlier patches see the files as they were before it).  That
    gives the pristine content.  Walking forwards from there, every patch is
    applied in memory: an applied patch must re-apply (to be sure the subset
    is consistent); an unapplied one must apply exactly, or it is in conflict.
    The result of the forward walk is the fully patched content.

    A patch in conflict is modelled as well as possible (the file diffs of it
    that do revert / apply are reverted / applied in memory), so that the
    patches before and after it are judged on plausible content and the
    conflict is blamed on the right patch.  A patch some of whose file diffs
    revert while others do not is "partly applied", which is a conflict too.

    Raises:
        PatchSeriesError: if a touched file cannot be read.
    """
    tree = _Tree(install.site_dir)
    for path in series.touched_paths:
        tree.read(path)

    pristine: dict[str, Optional[list[bytes]]] = {}
    is_applied: dict[str, bool] = {}
    reverse_failure: dict[str, _Mismatch] = {}
    partly_applied: dict[str, list[str]] = {}
    for patch in reversed(series.patches):
        try:
            pristine.update(
                _apply_patch(patch, _lookup_in(pristine, tree), reverse=True)
            )
            is_applied[patch.name] = True
        except _Mismatch as e:
            is_applied[patch.name] = False
            reverse_failure[patch.name] = e
            # Undo whatever parts of it do revert, so that a half-applied patch
            # is blamed on itself rather than on the earlier patches.
            changed, reverted = _apply_patch_partially(
                patch, _lookup_in(pristine, tree), reverse=True
            )
            pristine.update(changed)
            if reverted:
                partly_applied[patch.name] = reverted

    patched: dict[str, Optional[list[bytes]]] = dict(pristine)
    states: list[PatchState] = []
    for patch in series.patches:
        if patch.name in partly_applied:
            changed, _ = _apply_patch_partially(
                patch, _lookup_in(patched, tree), reverse=False
            )
            patched.update(changed)
            states.append(
                PatchState(
                    patch.name,
                    "conflict",
                    f"partly applied: its changes to "
                    f"{', '.join(partly_applied[patch.name])} are applied, but "
                    f"{reverse_failure[patch.name]}",
                )
            )
            continue
        try:
            patched.update(
                _apply_patch(patch, _lookup_in(patched, tree), reverse=False)
            )
        except _Mismatch as e:
            changed, _ = _apply_patch_partially(
                patch, _lookup_in(patched, tree), reverse=False
            )
            patched.update(changed)
            if is_applied[patch.name]:
                detail = (
                    f"looks applied, but does not apply on top of the patches "
                    f"before it: {e}"
                )
            else:
                detail = (
                    f"neither applies nor reverts exactly: {e}"
                    if str(e) == str(reverse_failure[patch.name])
                    else f"neither applies nor reverts exactly: does not apply "
                    f"({e}); does not revert ({reverse_failure[patch.name]})"
                )
            states.append(PatchState(patch.name, "conflict", detail))
            continue
        states.append(
            PatchState(patch.name, "applied" if is_applied[patch.name] else "unapplied")
        )
    for path in series.touched_paths:
        pristine.setdefault(path, tree.lines(path))
        patched.setdefault(path, tree.lines(path))
    return _Analysis(states=states, tree=tree, pristine=pristine, patched=patched)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _remove_stale_bytecode(path: Path) -> None:
    """Delete ``__pycache__/<module>.*.pyc`` for a written or deleted module."""
    if path.suffix != ".py":
        return
    cache = path.parent / "__pycache__"
    for pyc in cache.glob(f"{path.stem}.*.pyc"):
        try:
            pyc.unlink()
        except FileNotFoundError:
            pass


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` via a temporary file and ``os.replace``.

    The temporary file lives in the same directory (so the rename is atomic)
    and gets ``mode`` (and, where permitted, the owner of the file it
    replaces) before it replaces the original.
    """
    try:
        original = path.stat()
    except FileNotFoundError:
        original = None
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".fastjoin-tmp"
    )
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        if original is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp_name, original.st_uid, original.st_gid)
            except OSError:
                pass  # not permitted; keep the current user's ownership
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _remove_empty_dirs(directory: Path, stop: Path) -> None:
    """Remove ``directory`` and its parents while empty, up to ``stop``.

    Used after deleting a file a patch created, so a patch creating a new
    subpackage leaves nothing behind when reverted.  A directory holding only
    an (emptied) ``__pycache__`` counts as empty.
    """
    while directory != stop and stop in directory.parents:
        cache = directory / "__pycache__"
        if cache.is_dir() and not any(cache.iterdir()):
            try:
                cache.rmdir()
            except OSError:
                return
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or not ours to remove)
        directory = directory.parent


def _write_changes(
    install: SynapseInstall,
    tree: _Tree,
    target: Mapping[str, Optional[list[bytes]]],
    modes: Mapping[str, int],
) -> None:
    """Bring every path in ``target`` to its target content, all or nothing.

    Args:
        install: the installation being modified.
        tree: the original on-disk content (used to skip unchanged files and
            to roll back).
        target: per path, the lines it must have, or None if it must not exist.
        modes: permission bits for files that do not exist yet.

    Raises:
        PatchSeriesError: if a write fails; the files already written are then
            restored (the message says if that failed too).
    """
    changes: list[tuple[str, Optional[bytes]]] = []
    for path, lines in target.items():
        data = None if lines is None else b"".join(lines)
        if data != tree.read(path):
            changes.append((path, data))

    # Write in series order; remember what was done for the rollback.
    done: list[tuple[str, Optional[bytes], int]] = []  # path, original, mode
    created_dirs: list[Path] = []
    path = ""
    try:
        for path, data in changes:
            full = install.site_dir / path
            original = tree.read(path)
            try:
                mode = stat.S_IMODE(full.stat().st_mode)
            except FileNotFoundError:
                mode = modes.get(path, 0o644)
            if data is None:
                full.unlink()
                done.append((path, original, mode))
                _remove_stale_bytecode(full)
                _remove_empty_dirs(full.parent, install.package_dir)
            else:
                missing = [
                    p for p in [full.parent, *full.parent.parents] if not p.exists()
                ]
                if missing:
                    full.parent.mkdir(parents=True)
                    created_dirs.extend(reversed(missing))  # outermost first
                _write_atomically(full, data, mode)
                done.append((path, original, mode))
                _remove_stale_bytecode(full)
    except OSError as e:
        problems = _roll_back(install, done, created_dirs)
        message = f"failed to write {install.site_dir / path}: {e.strerror or e}; "
        if problems:
            message += (
                "restoring the files already written failed too, the installation "
                "is now inconsistent (reinstall matrix-synapse): " + "; ".join(problems)
            )
        else:
            message += "no file was changed (the files already written were restored)"
        raise PatchSeriesError(message) from e


def _roll_back(
    install: SynapseInstall,
    done: list[tuple[str, Optional[bytes], int]],
    created_dirs: list[Path],
) -> list[str]:
    """Undo the writes in ``done`` (newest first).

    Returns:
        A description of every file that could not be restored.
    """
    problems: list[str] = []
    for path, original, mode in reversed(done):
        full = install.site_dir / path
        try:
            if original is None:
                full.unlink()
            else:
                full.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(full, original, mode)
            _remove_stale_bytecode(full)
        except OSError as e:
            if not (original is None and e.errno == errno.ENOENT):
                problems.append(f"{full}: {e.strerror or e}")
    for directory in reversed(created_dirs):
        try:
            directory.rmdir()
        except OSError:
            pass
    return problems


# ---------------------------------------------------------------------------
# Public operations
# ---------------------------------------------------------------------------


def _resolve(
    install: Optional[SynapseInstall], series: Optional[Series]
) -> tuple[SynapseInstall, Series]:
    """Fill in the defaults of the public functions."""
    if series is None:
        series = read_series()
    if install is None:
        install = locate_synapse()
    return install, series


def _check_version(install: SynapseInstall, series: Series) -> None:
    """Refuse to touch a Synapse release the series was not written for.

    Raises:
        VersionMismatchError: naming both versions.
    """
    if install.version != series.target_version:
        raise VersionMismatchError(
            f"the synapse-fastjoin patch series targets Synapse "
            f"{series.target_version}, but Synapse {install.version} is installed "
            f"at {install.package_dir}; install matrix-synapse=="
            f"{series.target_version} (the version synapse-fastjoin supports) and "
            f"run `{APPLY_COMMAND}`"
        )


def _conflict_error(
    action: str, series: Series, conflicts: Iterable[PatchState]
) -> PatchSeriesError:
    """The error raised when ``action`` is refused because of conflicts."""
    details = "; ".join(f"{s.name}: {s.detail}" for s in conflicts)
    return PatchSeriesError(
        f"cannot {action} the patch series, nothing was changed. Patch(es) "
        f"neither cleanly applied nor cleanly unapplied: {details}. "
        "Were the Synapse files modified locally? Reinstalling Synapse "
        f"(pip install --force-reinstall --no-deps "
        f"matrix-synapse=={series.target_version}) and running "
        f"`{APPLY_COMMAND}` restores a known state."
    )


def status(
    install: Optional[SynapseInstall] = None, series: Optional[Series] = None
) -> list[PatchState]:
    """Report whether each patch of the series is applied.

    Args:
        install: the installation; default :func:`locate_synapse`.
        series: the series; default :func:`read_series`.

    Returns:
        One state per patch, in series order.

    Raises:
        VersionMismatchError: if the installed Synapse is not the target.
        PatchSeriesError: if a touched file cannot be read.
    """
    install, series = _resolve(install, series)
    _check_version(install, series)
    return _analyse(install, series).states


def apply(
    install: Optional[SynapseInstall] = None, series: Optional[Series] = None
) -> list[str]:
    """Apply every patch that is not applied yet, all or nothing.

    All patched files are computed in memory (patches applied in series
    order) before anything is written; then each changed file is replaced
    atomically, and if that fails midway the files already written are
    restored.

    Args:
        install: the installation; default :func:`locate_synapse`.
        series: the series; default :func:`read_series`.

    Returns:
        The names of the newly applied patches, in series order (empty if
        everything was applied already).

    Raises:
        VersionMismatchError: if the installed Synapse is not the target.
        PatchSeriesError: if a patch is in conflict or a file cannot be
            read or written; nothing is changed then.
    """
    install, series = _resolve(install, series)
    _check_version(install, series)
    analysis = _analyse(install, series)
    if analysis.conflicts:
        raise _conflict_error("apply", series, analysis.conflicts)
    newly = [s.name for s in analysis.states if s.state == "unapplied"]
    if newly:
        modes = {
            fd.path: fd.new_mode
            for patch in series.patches
            for fd in patch.files
            if fd.new_mode is not None
        }
        _write_changes(install, analysis.tree, analysis.patched, modes)
    return newly


def revert(
    install: Optional[SynapseInstall] = None, series: Optional[Series] = None
) -> list[str]:
    """Revert every applied patch, restoring the files byte for byte.

    Patches are reverted in reverse series order; files created by a patch
    are deleted (only if their content is exactly what the patch created).
    All or nothing, like :func:`apply`.

    Args:
        install: the installation; default :func:`locate_synapse`.
        series: the series; default :func:`read_series`.

    Returns:
        The names of the reverted patches, in the order they were reverted
        (reverse series order).

    Raises:
        VersionMismatchError: if the installed Synapse is not the target.
        PatchSeriesError: if a patch is in conflict or a file cannot be read
            or written; nothing is changed then.
    """
    install, series = _resolve(install, series)
    _check_version(install, series)
    analysis = _analyse(install, series)
    if analysis.conflicts:
        raise _conflict_error("revert", series, analysis.conflicts)
    reverted = [s.name for s in reversed(analysis.states) if s.state == "applied"]
    if reverted:
        _write_changes(install, analysis.tree, analysis.pristine, {})
    return reverted


def verify_applied(
    install: Optional[SynapseInstall] = None, series: Optional[Series] = None
) -> None:
    """Check that the installed Synapse is the target release, fully patched.

    Meant to run at every Synapse start-up, so it only reads the series and
    the files the series touches.

    Args:
        install: the installation; default :func:`locate_synapse` (the
            Synapse of the running interpreter).
        series: the series; default :func:`read_series`.

    Raises:
        VersionMismatchError: if the installed Synapse is not the target.
        PatchSeriesError: unless every patch is applied; the message names
            the patches that are not and the command that fixes it.
    """
    install, series = _resolve(install, series)
    _check_version(install, series)
    states = _analyse(install, series).states
    missing = [s for s in states if s.state != "applied"]
    if not missing:
        return
    described = ", ".join(
        f"{s.name} ({s.state}{': ' + s.detail if s.detail else ''})" for s in missing
    )
    if any(s.state == "conflict" for s in missing):
        fix = (
            "reinstall matrix-synapse=="
            f"{series.target_version} (pip install --force-reinstall --no-deps) "
            f"and then run `{APPLY_COMMAND}`"
        )
    else:
        fix = f"run `{APPLY_COMMAND}`"
    raise PatchSeriesError(
        f"Synapse {install.version} at {install.package_dir} is missing "
        f"{len(missing)} of the {len(states)} synapse-fastjoin patches: "
        f"{described}. To fix this, {fix} with the Python environment that "
        f"runs Synapse (e.g. `{sys.executable} -m synapse_fastjoin.cli patches "
        "apply`)."
    )
