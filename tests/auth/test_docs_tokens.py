"""The Node token example of docs/security.md mints what the broker verifies."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import trio

from broker.auth import Authenticator
from broker.config import AuthConfig
from tests.auth.conftest import SECRET

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


async def test_the_node_example_mints_a_token_the_broker_verifies(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed: make test installs it (scripts/test-prereqs)"
    example = re.search(r"```js\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert example is not None
    module = tmp_path / "mint.mjs"
    module.write_text(example.group(1) + "\nconsole.log(userToken(process.argv[2], 'alice', "
                      "{ channels: ['ai-chat/alice-*'], ai: ['alice-*'] }))\n")
    result = await trio.run_process([node, str(module), SECRET], capture_stdout=True, capture_stderr=True)
    grants = Authenticator(AuthConfig(jwt_secret=(SECRET,))).verify(result.stdout.decode().strip())
    assert grants.user == "alice" and grants.may_subscribe("ai-chat/alice-1")
    assert not grants.may_subscribe("ai-chat/bob-1") and grants.may_use_ai("alice-2")
