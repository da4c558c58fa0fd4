#!/usr/bin/env python3
"""Download the matrix-synapse sdist of a pinned version, verified, into a cache.

Usage: fetch_sdist.py [--version X.Y.Z] [--cache DIR] [--extract-tests DEST]

Prints the path of the verified sdist on stdout. With --extract-tests DEST, also
extracts only the sdist's top-level ``tests/`` package into DEST (DEST/tests/...),
replacing whatever DEST held, and prints DEST instead.

The sdist is found through pip's own finder, so pip's configured index, find-links,
proxy and certificates apply and no host is named here. (``pip download
--no-binary :all:`` cannot be used: it builds the sdist's metadata, which needs
maturin and a Rust toolchain.) The download is checked against the hash the index
publishes for the file AND against the sha256 pinned below; an already-cached file
is re-checked against the pin and reused without touching the network.

Run it with a Python that has pip (any of the project's venvs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile

# sha256 of the matrix-synapse sdist, per version. Add a line when the pinned
# Synapse version (patches/series) moves.
PINNED_SHA256 = {
    "1.163.2": "4583f1cb8ae6e257c67b752148c3f5ec16ccf7d6cc5d8375d88a14ac20f8effe",
}

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def log(msg: str) -> None:
    print(f"[fetch_sdist] {msg}", file=sys.stderr, flush=True)


def series_version() -> str:
    path = os.path.join(REPO, "patches", "series")
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                s = line.strip()
                if s.startswith("#") and s.lstrip("#").strip().startswith("synapse-version:"):
                    return s.split(":", 1)[1].strip()
    except OSError as e:
        sys.exit(f"[fetch_sdist] ERROR: cannot read {path}: {e}")
    sys.exit(f"[fetch_sdist] ERROR: no '# synapse-version:' line in {path}")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def link_hashes(link) -> dict[str, str]:
    """The hashes an index published for a link, across pip versions."""
    hashes: dict[str, str] = {}
    name = getattr(link, "hash_name", None)
    value = getattr(link, "hash", None)
    if name and value:
        hashes[name] = value
    extra = getattr(link, "_hashes", None)
    if isinstance(extra, dict):
        hashes.update(extra)
    return hashes


def download(version: str, dest_dir: str) -> str:
    """Find the sdist with pip's finder, download it, verify it, return its path."""
    try:
        from pip._internal.commands import create_command
        from pip._vendor.packaging.specifiers import SpecifierSet
    except ImportError as e:  # pragma: no cover - depends on the interpreter
        sys.exit(f"[fetch_sdist] ERROR: this Python has no usable pip ({e}); run it with a venv's python")

    req = f"matrix-synapse=={version}"
    cmd = create_command("download")
    options, _ = cmd.parse_args(["--no-binary", ":all:", "--no-deps", "-d", dest_dir, req])
    with cmd.main_context():
        session = cmd.get_default_session(options)
        finder = cmd._build_package_finder(options=options, session=session)
        result = finder.find_best_candidate("matrix-synapse", SpecifierSet(f"=={version}"))
        best = result.best_candidate
        if best is None:
            sys.exit(f"[fetch_sdist] ERROR: no sdist found for {req} in pip's configured index")
        link = best.link
        filename = link.filename
        if not filename.endswith(".tar.gz"):
            sys.exit(f"[fetch_sdist] ERROR: best candidate for {req} is not an sdist: {filename}")
        log(f"downloading {filename}")
        resp = session.get(link.url, timeout=options.timeout)
        resp.raise_for_status()
        data = resp.content

    got = hashlib.sha256(data).hexdigest()
    published = link_hashes(link)
    if not published:
        log("WARNING: the index published no hash for this file; relying on the pinned sha256 only")
    for name, want in published.items():
        if name not in hashlib.algorithms_guaranteed:
            continue
        have = hashlib.new(name, data).hexdigest()
        if have != want:
            sys.exit(f"[fetch_sdist] ERROR: {filename}: {name} {have} does not match the index's {want}")
    pinned = PINNED_SHA256[version]
    if got != pinned:
        sys.exit(f"[fetch_sdist] ERROR: {filename}: sha256 {got} does not match the pinned {pinned}")

    os.makedirs(dest_dir, exist_ok=True)
    path = os.path.join(dest_dir, filename)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log(f"verified sha256 {got}")
    return path


def cached_sdist(version: str, dest_dir: str) -> str | None:
    """A previously downloaded sdist of this version that matches the pin, if any."""
    pinned = PINNED_SHA256[version]
    for name in (f"matrix_synapse-{version}.tar.gz", f"matrix-synapse-{version}.tar.gz"):
        path = os.path.join(dest_dir, name)
        if os.path.isfile(path):
            if sha256_of(path) == pinned:
                return path
            log(f"cached {path} does not match the pinned sha256; downloading again")
            os.unlink(path)
    return None


def extract_tests(sdist: str, dest: str) -> None:
    """Extract only <top>/tests/ of the sdist into dest/tests, atomically."""
    parent = os.path.dirname(os.path.abspath(dest)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=parent)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/")
                if len(parts) < 2 or parts[1] != "tests":
                    continue
                if not (m.isfile() or m.isdir()):
                    continue  # no links or devices: nothing of that kind is needed
                if any(p in ("", "..") for p in parts[1:]) or m.name.startswith("/"):
                    sys.exit(f"[fetch_sdist] ERROR: unsafe member in {sdist}: {m.name}")
                m.name = "/".join(parts[1:])
                members.append(m)
            if not members:
                sys.exit(f"[fetch_sdist] ERROR: {sdist} has no tests/ directory")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        if not os.path.isfile(os.path.join(tmp, "tests", "__init__.py")):
            sys.exit(f"[fetch_sdist] ERROR: {sdist}: tests/__init__.py missing after extraction")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", help="matrix-synapse version (default: from patches/series)")
    ap.add_argument("--cache", default=os.path.join(REPO, ".cache", "sdist"), help="download cache directory")
    ap.add_argument("--extract-tests", metavar="DEST", help="also extract the sdist's tests/ into DEST")
    args = ap.parse_args()

    version = args.version or series_version()
    if version not in PINNED_SHA256:
        sys.exit(
            f"[fetch_sdist] ERROR: no pinned sha256 for matrix-synapse {version} in {__file__}; "
            "add the sdist's sha256 to PINNED_SHA256"
        )

    path = cached_sdist(version, args.cache) or download(version, args.cache)
    if args.extract_tests:
        extract_tests(path, args.extract_tests)
        print(os.path.abspath(args.extract_tests))
    else:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
