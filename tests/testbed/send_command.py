"""Send one coordinator command with a member's identity and print the outcome as JSON.

Run inside a namespace host by the partition test: ``python -m tests.testbed.send_command STATE ADDRESS TERM``.
Prints ``{"accepted": true, "term": N}`` or ``{"accepted": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from cetd.cli.connect import open_client
from cetd.errors import CetdError
from cetd.identity import StateDir, load_identity
from cetd.ids import Term
from cetd.transport.peer_info import CommandEnvelope


async def send(state_dir: Path, address: str, term: int) -> dict[str, object]:
    identity = load_identity(StateDir(state_dir))
    async with open_client(state_dir, address) as client:
        try:
            acked = await client.command(CommandEnvelope(term=Term(term), coordinator_id=identity.device_id,
                                                         kind="probe"))
        except CetdError as error:
            return {"accepted": False, "error": str(error)}
    return {"accepted": True, "term": acked}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(send(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))))
