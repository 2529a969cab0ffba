"""An SSH server that is not OpenSSH, as a target behind the bastion: asyncssh
with its SFTP server on the real file system.

Run by tests/clients.rs. Arguments: HOST_KEY AUTHORIZED_KEYS PORT. Listens on
127.0.0.1:PORT until killed.
"""

import asyncio
import sys

import asyncssh

host_key, authorized_keys, port = sys.argv[1:4]


async def main():
    await asyncssh.listen(
        "127.0.0.1",
        int(port),
        server_host_keys=[host_key],
        authorized_client_keys=authorized_keys,
        sftp_factory=True,
    )
    await asyncio.Event().wait()


asyncio.run(main())
