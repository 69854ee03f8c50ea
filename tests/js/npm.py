"""The npm package (clients/js/) for tests: pack it, and install the tarball into fresh Node projects.

Everything here works offline: ``npm ci --prefix clients/js`` (``make js-deps``) fills npm's cache
with the package's dependencies and dev tools from its lock file (their tarballs, and their
metadata as the lock names no registry URLs: clients/js/.npmrc), and the projects below install
from that cache with ``npm_config_offline=true``, at the versions clients/js locks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "js"
STATIC = ROOT / "broker" / "static"
NODE_MODULES = CLIENT / "node_modules"

#: Every npm command here: no network, no audit or update checks, quiet.
NPM_ENV = {**os.environ, "npm_config_offline": "true", "npm_config_audit": "false",
           "npm_config_fund": "false", "npm_config_update_notifier": "false",
           "npm_config_loglevel": "error"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed for the npm package's tests (make test-prereqs installs Node.js)")
    return path


def require_dev_tools() -> None:
    if not (NODE_MODULES / ".package-lock.json").exists():
        pytest.fail("clients/js/node_modules is missing: run `npm ci --prefix clients/js` (make js-deps)")


def run(args: list[str], cwd: Path, timeout: float = 120) -> str:
    """Run a command to completion; fail the test with its output if it fails. Returns stdout."""
    result = subprocess.run(args, cwd=cwd, env=NPM_ENV, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        hint = ("\nnpm's cache lacks what `npm ci --prefix clients/js` (make js-deps) puts there: run it"
                if "ENOTCACHED" in result.stderr else "")
        pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}{hint}")
    return result.stdout


def locked_version(name: str) -> str:
    """The version of ``name`` in clients/js/package-lock.json."""
    lock = json.loads((CLIENT / "package-lock.json").read_text())
    return str(lock["packages"][f"node_modules/{name}"]["version"])


def pack(destination: Path) -> tuple[Path, list[str]]:
    """``npm pack`` (its prepack builds dist/ from broker/static/): the tarball and the paths in it."""
    tool("node")
    out = run([tool("npm"), "pack", "--json", "--pack-destination", str(destination)], CLIENT)
    [info] = json.loads(out)
    return destination / info["filename"], sorted(entry["path"] for entry in info["files"])


def node_project(directory: Path, tarball: Path, module_type: str, packages: list[str]) -> Path:
    """A fresh Node project of ``module_type`` with the tarball and ``packages``, installed offline.

    Its package.json is what a user writes (the tarball, and ``packages`` at clients/js's locked
    versions); its package-lock.json pins the tarball's own dependencies and theirs to the
    versions clients/js locks, and ``npm ci --offline`` installs it from npm's cache. (``npm
    install`` would not do: it asks for packages' full metadata, which ``npm ci`` never caches.)
    The tarball's dependencies are read from its package.json, so one it forgot to declare would
    be missing here too.
    """
    directory.mkdir(parents=True)
    locked = json.loads((CLIENT / "package-lock.json").read_text())["packages"]
    with tarfile.open(tarball) as archive:
        shipped = json.load(archive.extractfile("package/package.json"))  # type: ignore[arg-type]
    spec = f"file:{os.path.relpath(tarball, directory)}"
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    versions = {name: locked[f"node_modules/{name}"]["version"] for name in packages}
    dependencies = {"tokenfan": spec, **versions}
    entries: dict[str, Any] = {"node_modules/tokenfan": {
        "version": shipped["version"], "resolved": spec, "integrity": integrity,
        **{key: shipped[key] for key in ("license", "dependencies", "engines", "peerDependencies",
                                         "peerDependenciesMeta") if key in shipped}}}
    wanted = [*packages, *shipped.get("dependencies", {})]
    while wanted:
        path = f"node_modules/{wanted.pop()}"
        if path not in entries:
            entry = {key: value for key, value in locked[path].items() if key not in ("dev", "devOptional")}
            entries[path] = entry
            wanted += entry.get("dependencies", {})
    name = f"consumer-{module_type}"
    manifest = {"name": name, "version": "1.0.0", "private": True, "type": module_type,
                "dependencies": dependencies}
    lock = {"name": name, "version": "1.0.0", "lockfileVersion": 3, "requires": True,
            "packages": {"": {"name": name, "version": "1.0.0", "dependencies": dependencies}, **entries}}
    (directory / "package.json").write_text(json.dumps(manifest, indent=2))
    (directory / "package-lock.json").write_text(json.dumps(lock, indent=2))
    run([tool("npm"), "ci", "--offline", "--no-audit", "--no-fund"], directory)
    return directory
