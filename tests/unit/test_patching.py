"""The patch-series tooling: parsing, status, all-or-nothing apply/revert, CLI.

Most tests work on a copy of the pristine Synapse package of the stock
virtualenv (``<repo>/.venvs/stock``, or ``$FASTJOIN_STOCK_VENV``), so that
patches are exercised against real Synapse files and ``revert`` can be checked
to restore every file byte for byte.  The stock venv itself is never modified.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from synapse_fastjoin import patching
from synapse_fastjoin.patching import (
    PatchSeriesError,
    PatchState,
    SynapseInstall,
    VersionMismatchError,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

FILE_A = "synapse/handlers/federation.py"
FILE_B = "synapse/handlers/room_member.py"
NEW_FILE = "synapse/handlers/fastjoin_synthetic.py"
NEW_FILE_CONTENT = b'"""Created by the synthetic patch 0002."""\n\nVALUE = 2\n'
PATCH_1 = "0001-first.patch"
PATCH_2 = "0002-second.patch"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _stock_venv() -> Path:
    return Path(os.environ.get("FASTJOIN_STOCK_VENV") or REPO_ROOT / ".venvs" / "stock")


def _stock_site_packages() -> Optional[Path]:
    for candidate in sorted(_stock_venv().glob("lib/python3*/site-packages")):
        if (candidate / "synapse" / "__init__.py").is_file() and any(
            candidate.glob("matrix_synapse-*.dist-info")
        ):
            return candidate
    return None


def _stock_python() -> str:
    python = _stock_venv() / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def _split(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _tree_hashes(site: Path) -> dict[str, str]:
    """sha256 of every file of the synapse package and its dist-info."""
    hashes = {}
    roots = [site / "synapse", *site.glob("matrix_synapse-*.dist-info")]
    for root in roots:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(site)
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            hashes[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _tree_dirs(site: Path) -> set[str]:
    return {
        p.relative_to(site).as_posix()
        for p in (site / "synapse").rglob("*")
        if p.is_dir() and "__pycache__" not in p.parts
    }


def _udiff(
    rel: str, old: Optional[bytes], new: Optional[bytes], git: bool = False
) -> str:
    """A unified diff (``diff -u``/``git diff`` style) between two contents."""
    a = [line.decode("utf-8") for line in _split(old or b"")]
    b = [line.decode("utf-8") for line in _split(new or b"")]
    out = []
    if git:
        out.append(f"diff --git a/{rel} b/{rel}\n")
        if old is None:
            out.append("new file mode 100644\n")
            out.append("index 0000000..2222222\n")
        else:
            out.append("index 1111111..2222222 100644\n")
    fromfile = "/dev/null" if old is None else f"a/{rel}"
    tofile = "/dev/null" if new is None else f"b/{rel}"
    for line in difflib.unified_diff(a, b, fromfile, tofile, n=3, lineterm="\n"):
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        out.append(line)
    return "".join(out)


def _patch_text(description: str, *diffs: str) -> str:
    return (
        f"Description: {description}\n"
        " Second line of the long description.\n"
        " .\n"
        " After an empty line.\n"
        "Forwarded: not-needed\n"
        "Author: synapse-fastjoin test suite\n"
        "Last-Update: 2025-01-01\n"
        "---\n" + "".join(diffs)
    )


def _write_series(directory: Path, version: str, patches: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# synapse-fastjoin test series", f"# synapse-version: {version}", ""]
    for name, text in patches.items():
        (directory / name).write_text(text, encoding="utf-8")
        lines.append(name)
    (directory / "series").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@dataclass
class Synthetic:
    """A copy of the stock Synapse plus a synthetic two-patch series."""

    site: Path
    install: SynapseInstall
    full: patching.Series  # 0001 + 0002
    first_only: patching.Series  # 0001
    pristine: dict[str, bytes]  # FILE_A / FILE_B original content
    patched: dict[str, bytes]  # FILE_A / FILE_B / NEW_FILE fully patched
    after_first: dict[str, bytes]  # FILE_A / FILE_B with 0001 only


def _insert(lines: list[bytes], index: int, new: bytes) -> list[bytes]:
    return lines[:index] + [new] + lines[index:]


def _annotate(line: bytes, note: bytes) -> bytes:
    body = line.rstrip(b"\r\n")
    return body + note + line[len(body) :]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stock_site() -> Path:
    site = _stock_site_packages()
    if site is None:
        pytest.skip(
            f"no pristine matrix-synapse in {_stock_venv()} "
            "(run scripts/setup-env or set FASTJOIN_STOCK_VENV)"
        )
    return site


@pytest.fixture(scope="session")
def stock_hashes(stock_site: Path) -> dict[str, str]:
    return _tree_hashes(stock_site)


@pytest.fixture
def site(stock_site: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine synapse package and its dist-info."""
    target = tmp_path / "site-packages"
    target.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(stock_site / "synapse", target / "synapse", ignore=ignore)
    for dist_info in stock_site.glob("matrix_synapse-*.dist-info"):
        shutil.copytree(dist_info, target / dist_info.name, ignore=ignore)
    return target


@pytest.fixture
def synthetic(site: Path, tmp_path: Path) -> Synthetic:
    """Build the synthetic series against the copied Synapse.

    0001 modifies FILE_A (an insertion and a changed line) and FILE_B;
    0002 amends the line 0001 inserted into FILE_A (so it only applies on top
    of 0001), changes another part of FILE_A and creates NEW_FILE.
    """
    install = patching.locate_synapse(site)
    a0 = (site / FILE_A).read_bytes()
    b0 = (site / FILE_B).read_bytes()

    a0_lines = _split(a0)
    a1_lines = _insert(a0_lines, 40, b"# fastjoin-synthetic: added by 0001\n")
    a1_lines[120] = _annotate(a1_lines[120], b"  # changed by 0001")
    a1 = b"".join(a1_lines)
    b1_lines = _split(b0)
    b1_lines[200] = _annotate(b1_lines[200], b"  # changed by 0001")
    del b1_lines[300]
    b1 = b"".join(b1_lines)

    a2_lines = list(a1_lines)
    assert a2_lines[40] == b"# fastjoin-synthetic: added by 0001\n"
    a2_lines[40] = b"# fastjoin-synthetic: added by 0001, amended by 0002\n"
    a2_lines = _insert(a2_lines, len(a2_lines) - 20, b"# fastjoin-synthetic: 0002\n")
    a2 = b"".join(a2_lines)

    patch_1 = _patch_text(
        "Synthetic patch one", _udiff(FILE_A, a0, a1), _udiff(FILE_B, b0, b1)
    )
    patch_2 = _patch_text(
        "Synthetic patch two",
        _udiff(FILE_A, a1, a2, git=True),
        _udiff(NEW_FILE, None, NEW_FILE_CONTENT, git=True),
    )
    version = install.version
    full = _write_series(
        tmp_path / "series-full", version, {PATCH_1: patch_1, PATCH_2: patch_2}
    )
    first = _write_series(tmp_path / "series-first", version, {PATCH_1: patch_1})
    return Synthetic(
        site=site,
        install=install,
        full=patching.read_series(full),
        first_only=patching.read_series(first),
        pristine={FILE_A: a0, FILE_B: b0},
        patched={FILE_A: a2, FILE_B: b1, NEW_FILE: NEW_FILE_CONTENT},
        after_first={FILE_A: a1, FILE_B: b1},
    )


def _fake_site(root: Path, version: str, files: dict[str, bytes]) -> SynapseInstall:
    """A minimal site dir: a synapse package with the given files + dist-info."""
    (root / "synapse").mkdir(parents=True)
    (root / "synapse" / "__init__.py").write_bytes(b"")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    dist_info = root / f"matrix_synapse-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.4\nName: matrix-synapse\nVersion: {version}\n\nBody\n"
    )
    return patching.locate_synapse(root)


def _states(states: list[PatchState]) -> list[tuple[str, str]]:
    return [(s.name, s.state) for s in states]


# ---------------------------------------------------------------------------
# Parsing and locating
# ---------------------------------------------------------------------------


def test_read_series_parses_headers_and_diffs(synthetic: Synthetic) -> None:
    series = synthetic.full
    assert series.target_version == synthetic.install.version
    assert [p.name for p in series.patches] == [PATCH_1, PATCH_2]
    first, second = series.patches
    assert first.description == (
        "Synthetic patch one\nSecond line of the long description.\n\n"
        "After an empty line."
    )
    assert first.headers["forwarded"] == "not-needed"
    assert first.headers["last-update"] == "2025-01-01"
    assert [fd.path for fd in first.files] == [FILE_A, FILE_B]
    assert [fd.path for fd in second.files] == [FILE_A, NEW_FILE]
    created = second.files[1]
    assert created.creates and not created.deletes and created.new_mode == 0o644
    assert series.touched_paths == [FILE_A, FILE_B, NEW_FILE]


def test_read_series_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    diff = _udiff("synapse/x.py", b"a\n", b"b\n")
    (tmp_path / "0001-x.patch").write_text(_patch_text("x", diff))
    (tmp_path / "series").write_text(
        "# header comment\n\n#synapse-version:   9.8.7  \n  0001-x.patch  \n# trailing\n"
    )
    series = patching.read_series(tmp_path)
    assert series.target_version == "9.8.7"
    assert [p.name for p in series.patches] == ["0001-x.patch"]


@pytest.mark.parametrize(
    "series_text, patch_text, expected",
    [
        ("0001-x.patch\n", None, "synapse-version"),
        ("# synapse-version: 1.0.0\n0002-missing.patch\n", None, "0002-missing.patch"),
        (
            "# synapse-version: 1.0.0\n0001-x.patch\n",
            "Description: x\n---\n--- a/synapse/x.py\n+++ b/synapse/x.py\n"
            "@@ -1,2 +1,2 @@\n-a\n+b\n",
            "0001-x.patch:5: hunk is truncated",
        ),
        (
            "# synapse-version: 1.0.0\n0001-x.patch\n",
            "Description: x\n---\n--- a/etc/passwd\n+++ b/etc/passwd\n@@ -1 +1 @@\n-a\n+b\n",
            "not a file inside the synapse package",
        ),
        (
            "# synapse-version: 1.0.0\n0001-x.patch\n",
            "Description: x\n---\n--- a/synapse/../x.py\n+++ b/synapse/../x.py\n"
            "@@ -1 +1 @@\n-a\n+b\n",
            "not a file inside the synapse package",
        ),
        (
            "# synapse-version: 1.0.0\n0001-x.patch\n",
            "Description: x\n---\n--- a/synapse/x.py\n+++ b/synapse/x.py\n"
            "@@ -1 +1 @@\n-a\n?b\n",
            "0001-x.patch:7: unexpected line in hunk",
        ),
        ("# synapse-version: 1.0.0\n0001-x.patch\n", "Description: x\n", "no diff"),
    ],
    ids=[
        "no-version-header",
        "missing-patch-file",
        "truncated-hunk",
        "path-outside-synapse",
        "path-escaping-synapse",
        "garbage-in-hunk",
        "no-diff",
    ],
)
def test_read_series_errors(
    tmp_path: Path, series_text: str, patch_text: Optional[str], expected: str
) -> None:
    (tmp_path / "series").write_text(series_text)
    if patch_text is not None:
        (tmp_path / "0001-x.patch").write_text(patch_text)
    with pytest.raises(PatchSeriesError) as e:
        patching.read_series(tmp_path)
    assert expected in str(e.value)


def test_default_series_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_patches = REPO_ROOT / "patches"
    if (repo_patches / "series").is_file():
        assert patching.default_series_dir() == repo_patches.resolve()

    # Without a source checkout: the copy installed under sys.prefix.
    monkeypatch.setattr(patching, "_source_patches_dir", lambda: tmp_path / "nothing")
    monkeypatch.setattr(patching.site, "USER_BASE", str(tmp_path / "userbase"))
    prefix = tmp_path / "prefix"
    monkeypatch.setattr(patching.sys, "prefix", str(prefix))
    with pytest.raises(PatchSeriesError) as e:
        patching.default_series_dir()
    assert "cannot find the synapse-fastjoin patch series" in str(e.value)
    installed = prefix / "share" / "synapse-fastjoin" / "patches"
    installed.mkdir(parents=True)
    (installed / "series").write_text("# synapse-version: 1.0.0\n")
    assert patching.default_series_dir() == installed


def test_locate_synapse_without_importing_it(stock_site: Path) -> None:
    code = (
        "import sys\n"
        "from synapse_fastjoin import patching\n"
        "install = patching.locate_synapse()\n"
        "assert 'synapse' not in sys.modules, 'synapse was imported'\n"
        "print(install.version)\n"
        "print(install.package_dir)\n"
    )
    result = subprocess.run(
        [_stock_python(), "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    version, package_dir = result.stdout.split("\n")[:2]
    assert version == patching.locate_synapse(stock_site).version
    assert Path(package_dir) == (stock_site / "synapse").resolve()


def test_locate_synapse_errors(tmp_path: Path) -> None:
    with pytest.raises(PatchSeriesError) as e:
        patching.locate_synapse(tmp_path)
    assert "does not contain the synapse package" in str(e.value)

    (tmp_path / "synapse").mkdir()
    (tmp_path / "synapse" / "__init__.py").write_text("")
    with pytest.raises(PatchSeriesError) as e:
        patching.locate_synapse(tmp_path)
    assert "matrix_synapse-*.dist-info" in str(e.value)

    install = _fake_site(tmp_path / "ok", "1.2.3", {})
    assert install.version == "1.2.3"
    assert install.package_dir == (tmp_path / "ok" / "synapse").resolve()


# ---------------------------------------------------------------------------
# Apply / revert against real Synapse files
# ---------------------------------------------------------------------------


def test_roundtrip_synthetic_series_is_byte_exact(
    synthetic: Synthetic, stock_hashes: dict[str, str]
) -> None:
    site, install, series = synthetic.site, synthetic.install, synthetic.full
    assert _tree_hashes(site) == stock_hashes
    dirs_before = _tree_dirs(site)

    assert patching.apply(install, series) == [PATCH_1, PATCH_2]
    for rel, content in synthetic.patched.items():
        assert (site / rel).read_bytes() == content, rel
    changed = {k for k, v in _tree_hashes(site).items() if stock_hashes.get(k) != v}
    assert changed == {FILE_A, FILE_B, NEW_FILE}
    assert (site / NEW_FILE).stat().st_mode & 0o777 == 0o644

    assert patching.revert(install, series) == [PATCH_2, PATCH_1]
    assert not (site / NEW_FILE).exists()
    assert _tree_hashes(site) == stock_hashes
    assert _tree_dirs(site) == dirs_before


def test_roundtrip_real_series_is_byte_exact(
    site: Path, stock_hashes: dict[str, str]
) -> None:
    repo_patches = REPO_ROOT / "patches"
    if not (repo_patches / "series").is_file():
        pytest.skip(f"{repo_patches / 'series'} does not exist (yet)")
    series_dir = patching.default_series_dir()
    assert series_dir == repo_patches.resolve()
    series = patching.read_series(series_dir)
    assert series.patches, f"{series_dir / 'series'} lists no patches"
    install = patching.locate_synapse(site)
    assert install.version == series.target_version, (
        f"the stock venv has Synapse {install.version}, the series targets "
        f"{series.target_version}"
    )
    names = [p.name for p in series.patches]

    assert _states(patching.status(install, series)) == [
        (n, "unapplied") for n in names
    ]
    assert patching.apply(install, series) == names
    assert _tree_hashes(site) != stock_hashes
    patching.verify_applied(install, series)
    assert patching.apply(install, series) == []
    assert patching.revert(install, series) == list(reversed(names))
    assert _tree_hashes(site) == stock_hashes


def test_version_mismatch_refused(synthetic: Synthetic) -> None:
    site = synthetic.site
    (dist_info,) = site.glob("matrix_synapse-*.dist-info")
    metadata = dist_info / "METADATA"
    metadata.write_text(
        metadata.read_text().replace(
            f"Version: {synthetic.install.version}\n", "Version: 1.162.0\n", 1
        )
    )
    install = patching.locate_synapse(site)
    assert install.version == "1.162.0"
    before = _tree_hashes(site)

    for operation in (patching.apply, patching.revert, patching.status):
        with pytest.raises(VersionMismatchError) as e:
            operation(install, synthetic.full)
        assert "1.162.0" in str(e.value)
        assert synthetic.full.target_version in str(e.value)
    with pytest.raises(VersionMismatchError):
        patching.verify_applied(install, synthetic.full)
    assert _tree_hashes(site) == before
    assert not (site / NEW_FILE).exists()


def test_locally_modified_file_refused(synthetic: Synthetic) -> None:
    site, install = synthetic.site, synthetic.install
    # Modify a line inside the hunk 0001 applies to FILE_B.
    lines = _split((site / FILE_B).read_bytes())
    lines[199] = _annotate(lines[199], b"  # local change")
    (site / FILE_B).write_bytes(b"".join(lines))
    before = _tree_hashes(site)

    with pytest.raises(PatchSeriesError) as e:
        patching.apply(install, synthetic.full)
    message = str(e.value)
    assert PATCH_1 in message
    assert FILE_B in message
    assert "hunk #1" in message
    assert "nothing was changed" in message
    # Nothing written: not FILE_A (which 0001 could patch), not the new file.
    assert _tree_hashes(site) == before
    assert not (site / NEW_FILE).exists()

    states = patching.status(install, synthetic.full)
    assert states[0].state == "conflict" and FILE_B in states[0].detail
    with pytest.raises(PatchSeriesError):
        patching.revert(install, synthetic.full)
    assert _tree_hashes(site) == before


def test_partially_applied_series_is_completed(synthetic: Synthetic) -> None:
    site, install = synthetic.site, synthetic.install
    assert patching.apply(install, synthetic.first_only) == [PATCH_1]
    for rel, content in synthetic.after_first.items():
        assert (site / rel).read_bytes() == content
    assert not (site / NEW_FILE).exists()

    assert _states(patching.status(install, synthetic.full)) == [
        (PATCH_1, "applied"),
        (PATCH_2, "unapplied"),
    ]
    with pytest.raises(PatchSeriesError) as e:
        patching.verify_applied(install, synthetic.full)
    assert PATCH_2 in str(e.value) and PATCH_1 not in str(e.value)

    assert patching.apply(install, synthetic.full) == [PATCH_2]
    for rel, content in synthetic.patched.items():
        assert (site / rel).read_bytes() == content
    assert _states(patching.status(install, synthetic.full)) == [
        (PATCH_1, "applied"),
        (PATCH_2, "applied"),
    ]


def test_revert_partially_applied_series(
    synthetic: Synthetic, stock_hashes: dict[str, str]
) -> None:
    patching.apply(synthetic.install, synthetic.first_only)
    assert patching.revert(synthetic.install, synthetic.full) == [PATCH_1]
    assert _tree_hashes(synthetic.site) == stock_hashes
    assert patching.revert(synthetic.install, synthetic.full) == []


def test_apply_twice_is_noop(synthetic: Synthetic) -> None:
    site, install = synthetic.site, synthetic.install
    patching.apply(install, synthetic.full)
    stamps = {rel: (site / rel).stat().st_mtime_ns for rel in synthetic.patched}
    hashes = _tree_hashes(site)
    assert patching.apply(install, synthetic.full) == []
    assert {rel: (site / rel).stat().st_mtime_ns for rel in synthetic.patched} == stamps
    assert _tree_hashes(site) == hashes


def test_status_reports_each_patch(synthetic: Synthetic) -> None:
    site, install, series = synthetic.site, synthetic.install, synthetic.full
    assert patching.status(install, series) == [
        PatchState(PATCH_1, "unapplied", ""),
        PatchState(PATCH_2, "unapplied", ""),
    ]
    patching.apply(install, series)
    assert _states(patching.status(install, series)) == [
        (PATCH_1, "applied"),
        (PATCH_2, "applied"),
    ]
    # The file 0002 creates was edited: 0002 is in conflict, 0001 still applied.
    (site / NEW_FILE).write_bytes(NEW_FILE_CONTENT + b"# local\n")
    states = patching.status(install, series)
    assert _states(states) == [(PATCH_1, "applied"), (PATCH_2, "conflict")]
    assert NEW_FILE in states[1].detail
    assert states[0].detail == ""


def test_revert_refuses_modified_created_file(synthetic: Synthetic) -> None:
    site, install = synthetic.site, synthetic.install
    patching.apply(install, synthetic.full)
    (site / NEW_FILE).write_bytes(NEW_FILE_CONTENT + b"# local\n")
    before = _tree_hashes(site)
    with pytest.raises(PatchSeriesError) as e:
        patching.revert(install, synthetic.full)
    assert PATCH_2 in str(e.value) and NEW_FILE in str(e.value)
    assert _tree_hashes(site) == before

    # A missing created file is a conflict too (the patch is half applied).
    (site / NEW_FILE).unlink()
    assert _states(patching.status(install, synthetic.full))[1] == (PATCH_2, "conflict")


def test_verify_applied(synthetic: Synthetic) -> None:
    install, series = synthetic.install, synthetic.full
    with pytest.raises(PatchSeriesError) as e:
        patching.verify_applied(install, series)
    message = str(e.value)
    assert "synapse-fastjoin patches apply" in message
    assert PATCH_1 in message and PATCH_2 in message
    assert install.version in message

    patching.apply(install, synthetic.first_only)
    with pytest.raises(PatchSeriesError) as e:
        patching.verify_applied(install, series)
    assert "1 of the 2" in str(e.value)

    patching.apply(install, series)
    patching.verify_applied(install, series)  # does not raise


# ---------------------------------------------------------------------------
# Matching details, on small fake installations
# ---------------------------------------------------------------------------


def test_offset_accepted_but_no_fuzz(tmp_path: Path) -> None:
    original = b"".join(b"line %d\n" % i for i in range(1, 41))
    target = original.replace(b"line 20\n", b"line twenty\n")
    diff = _udiff("synapse/mod.py", original, target)
    series = _write_series(
        tmp_path / "series", "1.0.0", {"0001-x.patch": _patch_text("x", diff)}
    )

    # Ten extra lines at the top: the hunk is found 10 lines further down.
    shifted = b"".join(b"extra %d\n" % i for i in range(10)) + original
    install = _fake_site(tmp_path / "site", "1.0.0", {"synapse/mod.py": shifted})
    assert patching.apply(install, patching.read_series(series)) == ["0001-x.patch"]
    path = install.site_dir / "synapse/mod.py"
    assert path.read_bytes() == shifted.replace(b"line 20\n", b"line twenty\n")
    assert patching.revert(install, patching.read_series(series)) == ["0001-x.patch"]
    assert path.read_bytes() == shifted

    # One context line differs: no fuzz, so this is a conflict.
    path.write_bytes(shifted.replace(b"line 18\n", b"line 18 (local)\n"))
    with pytest.raises(PatchSeriesError) as e:
        patching.apply(install, patching.read_series(series))
    assert "synapse/mod.py" in str(e.value)
    assert "line 18 (local)" in str(e.value)


def test_no_newline_at_eof_and_crlf_preserved(tmp_path: Path) -> None:
    original = b"first\r\nsecond\r\nthird"
    target = b"first\r\nsecond (patched)\r\nthird\r\nfourth"
    diff = _udiff("synapse/crlf.py", original, target)
    assert "\\ No newline at end of file" in diff
    created = b"no trailing newline"
    diff_new = _udiff("synapse/sub/new.py", None, created, git=True)
    series_dir = _write_series(
        tmp_path / "series", "1.0.0", {"0001-x.patch": _patch_text("x", diff, diff_new)}
    )
    install = _fake_site(tmp_path / "site", "1.0.0", {"synapse/crlf.py": original})
    series = patching.read_series(series_dir)

    assert patching.apply(install, series) == ["0001-x.patch"]
    assert (install.site_dir / "synapse/crlf.py").read_bytes() == target
    assert (install.site_dir / "synapse/sub/new.py").read_bytes() == created
    assert patching.revert(install, series) == ["0001-x.patch"]
    assert (install.site_dir / "synapse/crlf.py").read_bytes() == original
    # The directory the patch created is gone too.
    assert not (install.site_dir / "synapse/sub").exists()

    # LF instead of CRLF is not an exact match.
    (install.site_dir / "synapse/crlf.py").write_bytes(original.replace(b"\r\n", b"\n"))
    with pytest.raises(PatchSeriesError) as e:
        patching.apply(install, series)
    assert "line endings differ" in str(e.value)


@pytest.mark.parametrize("tool", ["diff", "git"])
def test_patches_made_by_real_tools(tmp_path: Path, tool: str) -> None:
    """Output of `diff -ruN` and `git diff` applies and reverts exactly.

    Covers modifying, creating (in a new subpackage) and deleting files,
    patching an empty file, and a file without a final newline.
    """
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    before = {
        "synapse/mod.py": b"".join(b"value_%d = %d\n" % (i, i) for i in range(60)),
        "synapse/empty.py": b"",
        "synapse/gone.py": b"# deleted by the patch\n",
    }
    after = {
        "synapse/mod.py": before["synapse/mod.py"]
        .replace(b"value_7 = 7\n", b"value_7 = 'seven'\nvalue_7b = 7\n")
        .replace(b"value_50 = 50\n", b"")
        + b"tail = True",
        "synapse/empty.py": b"# no longer empty\n",
        "synapse/pkg/__init__.py": b"from synapse.pkg.x import y\n",
    }
    if tool == "git":
        # git describes a new empty file without ---/+++ lines (and `diff -N`
        # cannot describe it at all).
        after["synapse/pkg/empty.py"] = b""
    for side, files in (("a", before), ("b", after)):
        for rel, data in files.items():
            (tmp_path / side / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / side / rel).write_bytes(data)
    if tool == "diff":
        command = ["diff", "-ruN", "a", "b"]
    else:
        command = ["git", "diff", "--no-index", "--no-prefix", "a", "b"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, check=False)
    assert result.returncode == 1, result.stderr
    diff = result.stdout.decode("utf-8")
    series_dir = _write_series(
        tmp_path / "series", "1.0.0", {"0001-x.patch": _patch_text("x", diff)}
    )
    install = _fake_site(tmp_path / "site", "1.0.0", before)
    series = patching.read_series(series_dir)
    assert sorted(fd.path for fd in series.patches[0].files) == sorted(
        set(before) | set(after)
    )

    assert patching.apply(install, series) == ["0001-x.patch"]
    for rel in set(before) | set(after):
        path = install.site_dir / rel
        assert (path.read_bytes() if path.exists() else None) == after.get(rel), rel
    assert patching.revert(install, series) == ["0001-x.patch"]
    for rel in set(before) | set(after):
        path = install.site_dir / rel
        assert (path.read_bytes() if path.exists() else None) == before.get(rel), rel
    assert not (install.site_dir / "synapse/pkg").exists()


def test_agrees_with_gnu_patch(synthetic: Synthetic, tmp_path: Path) -> None:
    """GNU patch (without fuzz) produces the same bytes as our apply."""
    if shutil.which("patch") is None:
        pytest.skip("GNU patch is not installed")
    gnu = tmp_path / "gnu"
    for rel, content in synthetic.pristine.items():
        (gnu / rel).parent.mkdir(parents=True, exist_ok=True)
        (gnu / rel).write_bytes(content)
    for patch in synthetic.full.patches:
        result = subprocess.run(
            ["patch", "-p1", "-F0", "--no-backup-if-mismatch", "-i", str(patch.path)],
            cwd=gnu,
            check=False,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    patching.apply(synthetic.install, synthetic.full)
    for rel in synthetic.patched:
        assert (gnu / rel).read_bytes() == (synthetic.site / rel).read_bytes(), rel


def test_write_failure_rolls_back(
    synthetic: Synthetic, stock_hashes: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    calls = []

    def failing_replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(patching.os, "replace", failing_replace)
    with pytest.raises(PatchSeriesError) as e:
        patching.apply(synthetic.install, synthetic.full)
    assert "No space left on device" in str(e.value)
    assert "no file was changed" in str(e.value)
    monkeypatch.setattr(patching.os, "replace", real_replace)
    assert _tree_hashes(synthetic.site) == stock_hashes
    assert not (synthetic.site / NEW_FILE).exists()
    leftovers = [p for p in synthetic.site.rglob("*.fastjoin-tmp")]
    assert leftovers == []


def test_stale_bytecode_removed_and_mode_preserved(synthetic: Synthetic) -> None:
    site = synthetic.site
    cache = (site / FILE_A).parent / "__pycache__"
    cache.mkdir(exist_ok=True)
    stale = [
        cache / "federation.cpython-311.pyc",
        cache / "federation.cpython-311.opt-1.pyc",
    ]
    unrelated = cache / "federation_event.cpython-311.pyc"
    for pyc in [*stale, unrelated]:
        pyc.write_bytes(b"stale")
    os.chmod(site / FILE_B, 0o640)

    patching.apply(synthetic.install, synthetic.full)
    assert not any(p.exists() for p in stale)
    assert unrelated.exists()
    assert (site / FILE_B).stat().st_mode & 0o777 == 0o640

    patching.revert(synthetic.install, synthetic.full)
    assert (site / FILE_B).stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _cli(*args: str, pythonpath: Optional[str] = None) -> subprocess.CompletedProcess:
    path = (
        str(REPO_ROOT) if pythonpath is None else f"{pythonpath}{os.pathsep}{REPO_ROOT}"
    )
    return subprocess.run(
        [_stock_python(), "-m", "synapse_fastjoin.cli", *args],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )


def _patches_cli(synthetic: Synthetic, action: str, series: Optional[Path] = None):
    series_dir = series or synthetic.full.directory
    return _cli(
        "patches",
        action,
        "--site-packages",
        str(synthetic.site),
        "--series",
        str(series_dir),
    )


def test_cli_status_apply_revert(
    synthetic: Synthetic, stock_hashes: dict[str, str]
) -> None:
    version = synthetic.install.version
    result = _patches_cli(synthetic, "status")
    assert result.returncode == 3, result
    assert f"unapplied  {PATCH_1}" in result.stdout
    assert f"unapplied  {PATCH_2}" in result.stdout
    assert f"0 of 2 patches applied to Synapse {version}" in result.stdout

    result = _patches_cli(synthetic, "apply", synthetic.first_only.directory)
    assert result.returncode == 0, result
    assert f"applied    {PATCH_1}" in result.stdout

    result = _patches_cli(synthetic, "status")
    assert result.returncode == 4, result
    assert f"applied    {PATCH_1}" in result.stdout
    assert f"unapplied  {PATCH_2}" in result.stdout

    result = _patches_cli(synthetic, "apply")
    assert result.returncode == 0, result
    assert f"unchanged  {PATCH_1} (already applied)" in result.stdout
    assert f"applied    {PATCH_2}" in result.stdout
    assert f"Synapse {version} at {synthetic.install.package_dir}" in result.stdout
    assert result.stderr == ""

    result = _patches_cli(synthetic, "status")
    assert result.returncode == 0, result
    assert "2 of 2 patches applied" in result.stdout

    result = _patches_cli(synthetic, "apply")
    assert result.returncode == 0, result
    assert "Nothing to do" in result.stdout

    result = _patches_cli(synthetic, "revert")
    assert result.returncode == 0, result
    assert result.stdout.index(f"reverted   {PATCH_2}") < result.stdout.index(
        f"reverted   {PATCH_1}"
    )
    assert _tree_hashes(synthetic.site) == stock_hashes


def test_cli_errors(synthetic: Synthetic) -> None:
    site = synthetic.site
    (site / FILE_B).write_bytes(b"# replaced locally\n")
    for action in ("apply", "revert", "status"):
        result = _patches_cli(synthetic, action)
        assert result.returncode == 1, (action, result)
        assert result.stderr.startswith("synapse-fastjoin: error: "), result.stderr
        assert PATCH_1 in result.stderr
    assert f"conflict   {PATCH_1}" in _patches_cli(synthetic, "status").stdout

    (dist_info,) = site.glob("matrix_synapse-*.dist-info")
    (dist_info / "METADATA").write_text("Name: matrix-synapse\nVersion: 1.162.0\n")
    result = _patches_cli(synthetic, "apply")
    assert result.returncode == 1
    assert "1.162.0" in result.stderr and synthetic.install.version in result.stderr

    result = _cli("patches", "status", "--series", str(site / "no-such-dir"))
    assert result.returncode == 1
    assert result.stderr.startswith(
        "synapse-fastjoin: error: cannot read the patch series"
    )

    result = _cli("patches", "frobnicate")
    assert result.returncode == 2


def test_cli_help_documents_exit_codes() -> None:
    result = _cli("patches", "status", "--help")
    assert result.returncode == 0
    for fragment in (
        "exit status",
        "3  `status` only: no patch",
        "4  `status` only: some",
    ):
        assert fragment in result.stdout


def test_cli_defaults_to_the_interpreters_synapse(synthetic: Synthetic) -> None:
    """Without --site-packages, the synapse importable by the Python is used."""
    result = _cli(
        "patches",
        "apply",
        "--series",
        str(synthetic.full.directory),
        pythonpath=str(synthetic.site),
    )
    assert result.returncode == 0, result
    assert f"at {synthetic.install.package_dir}" in result.stdout
    assert "Python environment:" in result.stdout
    assert (synthetic.site / NEW_FILE).read_bytes() == NEW_FILE_CONTENT


def test_cli_main_in_process(
    synthetic: Synthetic, capsys: pytest.CaptureFixture
) -> None:
    from synapse_fastjoin import cli

    args = [
        "--site-packages",
        str(synthetic.site),
        "--series",
        str(synthetic.full.directory),
    ]
    assert cli.main(["patches", "status", *args]) == 3
    assert cli.main(["patches", "apply", *args]) == 0
    assert cli.main(["patches", "status", *args]) == 0
    out = capsys.readouterr().out
    assert f"applied    {PATCH_2}" in out
