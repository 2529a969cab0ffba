"""libssh (through ssh-python) through the bastion: exec, sftp and a symlink.

Run by tests/clients.rs. Arguments: HOST PORT USER KEY HOST_KEY_LINE WORKDIR.
The symlink step asks for WORKDIR/libssh-link -> portcullis-link-target and
leaves it for the test to inspect. Prints one `ok STEP` line per step; any
failure raises (exit status 1).
"""

import os
import sys

from ssh import key as sshkey
from ssh import options
from ssh.session import Session
from ssh.sftp import SFTP  # noqa: F401 (the sftp module must load)

host, port, user, key, host_key, work = sys.argv[1:7]
LINK_TARGET = "portcullis-link-target"

session = Session()
session.options_set(options.HOST, host)
session.options_set_port(int(port))
session.options_set(options.USER, user)
session.connect()
print("server", session.get_serverbanner(), "openssh", hex(session.get_openssh_version()))
# Pin the host key: the server's must be the one the test expects.
seen = session.get_server_publickey().export_pubkey_base64().decode()
assert seen == host_key.split()[1], seen
session.userauth_publickey(sshkey.import_privkey_file(key))


def run(command):
    channel = session.channel_new()
    channel.open_session()
    channel.request_exec(command)
    out = b""
    while True:
        size, data = channel.read()
        if size <= 0:
            break
        out += data
    channel.send_eof()
    channel.close()
    return out, channel.get_exit_status()


out, status = run("echo out; exit 3")
assert (out, status) == (b"out\n", 3), (out, status)
print("ok exec")

sftp = session.sftp_init()
payload = os.urandom(100000)
remote = work + "/libssh-remote.bin"
handle = sftp.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
handle.write(payload)
handle.close()
with open(remote, "rb") as f:
    assert f.read() == payload
assert sftp.stat(remote).size == len(payload)
sftp.unlink(remote)
print("ok sftp")

sftp.symlink(LINK_TARGET, work + "/libssh-link")
assert sftp.readlink(work + "/libssh-link") == LINK_TARGET
print("ok symlink")
session.disconnect()
