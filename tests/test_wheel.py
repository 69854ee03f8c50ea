"""A built wheel carries everything the broker serves, and `tokenfan serve` from it works.

The wheel is built without network (``--no-build-isolation``: setuptools comes from
the test extra) and installed into a new venv outside the repository with
``--no-deps``; its dependencies are borrowed from this venv through a ``.pth`` path
line, which puts them on ``sys.path`` without running this venv's editable-install
hook, so ``broker`` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import urllib.request
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(ROOT)], check=True, timeout=240,
                   capture_output=True)
    [built] = out.glob("tokenfan-*.whl")
    return built


def test_the_wheel_holds_the_static_files_the_corpus_and_the_vectors(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "broker" / "static"
    expected = {f"broker/static/{path.relative_to(static).as_posix()}"
                for path in static.rglob("*") if path.is_file()}
    expected |= {"protocol/vectors.json", "bench/cswarm/swarm.c"}
    expected |= {f"broker/ai/{path.name}" for path in (ROOT / "broker" / "ai").glob("*.txt")}
    assert expected <= names, sorted(expected - names)
    assert "broker/static/tokenfan.js" in names and "broker/static/index.html" in names
    # Every Python module of the source tree is in it (subpackages included).
    modules = {path.relative_to(ROOT).as_posix() for top in ("broker", "protocol", "bench")
               for path in (ROOT / top).rglob("*.py")}
    assert modules <= names, sorted(modules - names)


@pytest.fixture
def served_from_wheel(wheel: Path, tmp_path: Path) -> Iterator[str]:
    """Install the wheel into a fresh venv in ``tmp_path`` and run ``tokenfan serve`` from there."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=120, capture_output=True)
    Path(purelib, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOKENFAN_")}
    env["TOKENFAN_AI_DEMO_TOKENS_PER_SECOND"] = "2000"
    where = subprocess.run([str(python), "-c", "import broker; print(broker.__file__)"], cwd=tmp_path,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(env_dir)), where
    with subprocess.Popen([str(env_dir / "bin" / "tokenfan"), "serve", "--port", "0"], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            match = re.search(r"listening on (http://\S+)", line)
            assert match, line
            yield match.group(1)
        finally:
            server.terminate()
            assert server.wait(timeout=15) == 0


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_tokenfan_serve_from_the_wheel_serves_the_demo(served_from_wheel: str) -> None:
    base = served_from_wheel
    status, content_type, page = _get(base + "/")
    assert status == 200 and content_type.startswith("text/html") and b"tokenfan.js" in page
    status, content_type, client = _get(base + "/tokenfan.js")
    assert status == 200 and content_type.startswith("text/javascript")
    assert client == (ROOT / "broker" / "static" / "tokenfan.js").read_bytes()
    request = urllib.request.Request(base + "/ai/chat", json.dumps({"message": "Who is late?",
                                                                     "sessionId": "wheel"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    assert answer["ok"] is True and answer["tokens"] > 10, answer
    _, _, body = _get(base + "/api/history?channel=ai-chat/wheel")
    events = [p["event"] for p in json.loads(body)["publications"]]
    assert events[0] == "ai:start" and events[-1] == "ai:done" and events.count("ai:token") >= 1, events
