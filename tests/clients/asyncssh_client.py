"""asyncssh through the bastion: exec, sftp, a pty and a symlink.

Run by tests/clients.rs. Arguments: HOST PORT USER KEY HOST_KEY_LINE WORKDIR
[STEPS], where WORKDIR is a directory on the target and STEPS a comma-separated
subset of exec,sftp,pty,symlink (default: all). The symlink step asks for
WORKDIR/link -> portcullis-link-target and leaves it for the test to inspect.
Prints one `ok STEP` line per step; any failure raises (exit status 1).
"""

import asyncio
import os
import sys

import asyncssh

host, port, user, key, host_key, work = sys.argv[1:7]
steps = sys.argv[7].split(",") if len(sys.argv) > 7 else ["exec", "sftp", "pty", "symlink"]
LINK_TARGET = "portcullis-link-target"


async def main():
    print("asyncssh", asyncssh.__version__)
    known = asyncssh.import_known_hosts("[%s]:%s %s\n" % (host, port, host_key))
    async with asyncssh.connect(
        host, port=int(port), username=user, client_keys=[key], known_hosts=known,
        agent_path=None, config=[],
    ) as conn:
        print("server", conn.get_extra_info("server_version"))
        if "exec" in steps:
            result = await conn.run("echo out; echo err >&2; exit 3", check=False)
            assert (result.stdout, result.stderr, result.exit_status) == ("out\n", "err\n", 3), result
            print("ok exec")
        if "sftp" in steps:
            payload = os.urandom(300000)
            local = os.path.join(work, "asyncssh-local.bin")
            with open(local, "wb") as f:
                f.write(payload)
            async with conn.start_sftp_client() as sftp:
                remote = work + "/asyncssh-remote.bin"
                await sftp.put(local, remote)
                back = os.path.join(work, "asyncssh-back.bin")
                await sftp.get(remote, back)
                with open(back, "rb") as f:
                    assert f.read() == payload
                assert (await sftp.stat(remote)).size == len(payload)
                await sftp.remove(remote)
            print("ok sftp")
        if "pty" in steps:
            result = await conn.run(
                "stty size; test -t 0 && echo tty", term_type="xterm", term_size=(101, 33)
            )
            assert result.stdout.split() == ["33", "101", "tty"], result.stdout
            print("ok pty")
        if "symlink" in steps:
            async with conn.start_sftp_client() as sftp:
                await sftp.symlink(LINK_TARGET, work + "/link")
                assert await sftp.readlink(work + "/link") == LINK_TARGET
            print("ok symlink")


asyncio.run(main())
