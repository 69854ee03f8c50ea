"""The npm package ``tokenfan`` (clients/js/): what ``npm pack`` ships, and fresh Node projects using it.

The package is built from the file the broker serves (broker/static/tokenfan.js) by clients/js's
prepack script; the only difference allowed is the msgpack import. Two fresh projects, CommonJS
(``require``) and ES module (``import``), install the tarball offline and talk to a real broker
through the ``ws`` package.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tomllib
import urllib.request
from pathlib import Path

import pytest
import trio

from broker import Broker, Config
from tests.js.npm import CLIENT, ROOT, STATIC, locked_version, node_project, pack, require_dev_tools, tool

SERVED_IMPORT = "import { Encoder, decodeMulti } from './vendor/msgpack/index.mjs'"
PACKAGED_IMPORT = "import { Encoder, decodeMulti } from '@msgpack/msgpack'"
PACKAGE_FILES = ["README.md", "dist/tokenfan.d.ts", "dist/tokenfan.js", "package.json", "react.d.ts",
                 "react.js"]


def manifest() -> dict[str, object]:
    return json.loads((CLIENT / "package.json").read_text())  # type: ignore[no-any-return]


def test_the_package_json_matches_the_project_and_the_served_client() -> None:
    package = manifest()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert package["name"] == "tokenfan"
    assert package["version"] == pyproject["project"]["version"]
    assert package["type"] == "module"
    assert package["engines"] == {"node": ">=20.19"}  # require() of an ES module works from 20.19
    # The vendored copy the broker serves and the dependency are the same release of msgpack.
    vendored = (STATIC / "vendor" / "msgpack" / "VERSION").read_text().split()[1]
    assert package["dependencies"] == {"@msgpack/msgpack": f"^{vendored}"}
    assert locked_version("@msgpack/msgpack") == vendored
    assert package["peerDependencies"] == {"react": ">=18", "@types/react": ">=18"}
    optional = {"optional": True}
    assert package["peerDependenciesMeta"] == {"react": optional, "@types/react": optional}
    lock = json.loads((CLIENT / "package-lock.json").read_text())
    assert lock["packages"][""]["version"] == package["version"]
    # No registry URLs in the lock (clients/js/.npmrc): then `npm ci` caches packages' metadata,
    # which the offline installs below need.
    assert not [name for name, entry in lock["packages"].items() if "resolved" in entry]


def test_npm_pack_ships_the_served_client_with_msgpack_as_a_dependency(tmp_path: Path) -> None:
    require_dev_tools()
    tarball, files = pack(tmp_path)
    assert files == PACKAGE_FILES  # no vendored msgpack, no build script, no tests
    with tarfile.open(tarball) as archive:
        shipped = {name: archive.extractfile(f"package/{name}").read()  # type: ignore[union-attr]
                   for name in files}
    served = (STATIC / "tokenfan.js").read_text()
    assert served.count(SERVED_IMPORT) == 1
    assert shipped["dist/tokenfan.js"].decode() == served.replace(SERVED_IMPORT, PACKAGED_IMPORT)
    assert shipped["dist/tokenfan.d.ts"] == (STATIC / "tokenfan.d.ts").read_bytes()
    assert shipped["react.js"] == (CLIENT / "react.js").read_bytes()
    packed = json.loads(shipped["package.json"])
    assert packed["version"] == manifest()["version"]

    def targets(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        assert isinstance(node, dict)
        return [target for child in node.values() for target in targets(child)]

    assert set(packed["exports"]) == {".", "./react", "./package.json"}
    for target in [*targets(packed["exports"]), packed["main"], packed["types"]]:
        assert target.startswith("./") and target[2:] in files, target


# A consumer script, as a user would write it in each kind of project. It subscribes, publishes
# ai:cancel (clients may, on ai-chat/*), says it is ready, prints every event it gets until ai:done.
CONSUMER = """\
{imports}
const [url, name] = process.argv.slice(2)
const realtime = new Realtime({{ url, WebSocket }})
const channel = realtime.channel(name)
const seen = []
channel.on('*', ({{ event, data, offset, firstOffset }}) => {{
  seen.push({{ event, data, offset, firstOffset }})
  if (event !== 'ai:done') return
  console.log(JSON.stringify({{ seen }}))
  realtime.close()
}})
channel.subscribe()
async function main () {{
  const status = await channel.ready()
  const published = await channel.publish('ai:cancel', {{}})
  console.log(JSON.stringify({{ status, published, state: realtime.state, react: {resolve_react} }}))
}}
main().catch((error) => {{ console.error(error); process.exit(1) }})
"""

IMPORTS = {
    "commonjs": ("const { Realtime } = require('tokenfan')\nconst WebSocket = require('ws')",
                 "require.resolve('tokenfan/react').endsWith('/node_modules/tokenfan/react.js')"),
    "module": ("import { Realtime } from 'tokenfan'\nimport WebSocket from 'ws'",
               "import.meta.resolve('tokenfan/react').endsWith('/node_modules/tokenfan/react.js')"),
}


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"the consumer ended its output early: {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def emit(url: str, channel: str, event: str, data: object) -> None:
    body = json.dumps({"channel": channel, "event": event, "data": data}).encode()
    request = urllib.request.Request(url + "/api/emit", body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.mark.parametrize("module_type", ["commonjs", "module"])
async def test_a_fresh_node_project_streams_from_a_real_broker(tmp_path: Path, nursery: trio.Nursery,
                                                               module_type: str) -> None:
    require_dev_tools()
    tarball, _ = await trio.to_thread.run_sync(pack, tmp_path)
    project = await trio.to_thread.run_sync(node_project, tmp_path / "project", tarball, module_type, ["ws"])
    imports, resolve_react = IMPORTS[module_type]
    (project / "consumer.js").write_text(CONSUMER.format(imports=imports, resolve_react=resolve_react))

    broker = Broker(Config(port=0))
    await nursery.start(broker.serve)
    base = f"http://127.0.0.1:{broker.port}"
    channel = f"ai-chat/npm-{module_type}"
    stderr = tmp_path / "stderr.txt"
    with trio.fail_after(30), stderr.open("wb") as errors:
        process = await trio.lowlevel.open_process(
            [tool("node"), "consumer.js", f"ws://127.0.0.1:{broker.port}/ws", channel], cwd=project,
            stdout=subprocess.PIPE, stderr=errors)
        try:
            assert process.stdout is not None
            buffer = bytearray()
            ready = json.loads(await read_line(process.stdout, buffer))
            assert ready == {"status": {"recovered": False, "offset": 0, "epoch": ready["status"]["epoch"],
                                        "resubscribed": False},
                             "published": {"offset": 1, "epoch": ready["status"]["epoch"]},
                             "state": "open", "react": True}
            for event, data in [("ai:token", {"token": "Hello"}), ("ai:token", {"token": ", wörld ✓"}),
                                ("ai:done", {})]:
                await trio.to_thread.run_sync(emit, base, channel, event, data)
            done = json.loads(await read_line(process.stdout, buffer))
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
    assert done == {"seen": [
        {"event": "ai:cancel", "data": {}, "offset": 1, "firstOffset": 1},
        {"event": "ai:token", "data": {"token": "Hello"}, "offset": 2, "firstOffset": 2},
        {"event": "ai:token", "data": {"token": ", wörld ✓"}, "offset": 3, "firstOffset": 3},
        {"event": "ai:done", "data": {}, "offset": 4, "firstOffset": 4},
    ]}, stderr.read_text()
    assert stderr.read_text() == ""  # no warning either (require() of an ES module is quiet here)


TSCONFIG = {"compilerOptions": {
    "strict": True, "noEmit": True, "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022",
    "lib": ["es2022", "dom"], "jsx": "react-jsx", "skipLibCheck": False, "verbatimModuleSyntax": True,
}, "files": ["consumer.tsx"]}

# Uses of both entry points, right and (under @ts-expect-error, which fails if there is no error) wrong.
TYPED_CONSUMER = """\
import { Realtime, type ChannelEvent, type Offset, type Subscribed } from 'tokenfan'
import { RealtimeProvider, useAiChat, useChannel, useRealtime, type AiChat } from 'tokenfan/react'
import WebSocket from 'ws'

export const realtime = new Realtime({ url: 'ws://127.0.0.1:8765/ws', WebSocket, backoff: [100, 5000] })
export const inBrowser = new Realtime({ url: 'ws://127.0.0.1:8765/ws', WebSocket: globalThis.WebSocket })
// @ts-expect-error: not a WebSocket class
export const wrong = new Realtime({ url: 'ws://127.0.0.1:8765/ws', WebSocket: Date })
const channel = realtime.channel('ai-chat/1')
  .on('ai:token', ({ data }: ChannelEvent<{ token: string }>) => data.token.toUpperCase())
  .on('subscribed', ({ recovered, resubscribed }) => recovered && resubscribed)
  .subscribe({ since: { o: 0 } })
export const confirmed: Promise<Subscribed> = channel.ready()

export function Answer ({ sessionId }: { sessionId: string }) {
  const chat: AiChat = useAiChat(`ai-chat/${sessionId}`)
  const { text, streaming, error, ready, cancel } = chat
  const length: number = text.length
  const message: string | null = error
  const { publish } = useChannel('scores', {
    goal: ({ data, offset }) => { const at: Offset = offset; return [data, at] },
  }, {
    since: { o: 0 },
    onSubscribed: (status: Subscribed) => status.epoch.length,
    onGap: ({ from, to }) => [from, to],
  })
  // @ts-expect-error: a channel name is a string
  useAiChat(42)
  // @ts-expect-error: handlers get a ChannelEvent
  useChannel('scores', { goal: (count: number) => count })
  const client: Realtime = useRealtime()
  return (
    <RealtimeProvider client={client}>
      <p data-length={length} data-message={message ?? ''}>{text}{streaming && '▍'}</p>
      <button disabled={!ready} onClick={() => { void cancel(); void publish('ai:cancel', {}) }}>Stop</button>
    </RealtimeProvider>
  )
}
"""


def test_the_types_check_in_a_typescript_project(tmp_path: Path) -> None:
    require_dev_tools()
    tarball, _ = pack(tmp_path)
    packages = ["ws", "react", "@types/react", "@types/ws"]
    project = node_project(tmp_path / "project", tarball, "module", packages)
    (project / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (project / "consumer.tsx").write_text(TYPED_CONSUMER)
    tsc = CLIENT / "node_modules" / ".bin" / "tsc"
    result = subprocess.run([str(tsc), "-p", "."], cwd=project, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # And the checker does look: a wrong use of each entry point fails.
    (project / "consumer.tsx").write_text(TYPED_CONSUMER.replace("// @ts-expect-error", "//"))
    result = subprocess.run([str(tsc), "-p", "."], cwd=project, capture_output=True, text=True, timeout=120,
                            check=False)
    errors = [line for line in result.stdout.splitlines() if "error TS" in line]
    assert len(errors) == 3, result.stdout
