"""Paramiko through the bastion: exec, sftp and a pty.

Run by tests/clients.rs, with PyPI's Paramiko (the venv's python) and with
Debian's python3-paramiko (/usr/bin/python3). Arguments: HOST PORT USER KEY
HOST_KEY_LINE WORKDIR, where WORKDIR is a directory on the target. Prints one
`ok STEP` line per step; any failure raises (exit status 1).
"""

import base64
import os
import sys

import paramiko

host, port, user, key, host_key, work = sys.argv[1:7]
port = int(port)
print("paramiko", paramiko.__version__)

client = paramiko.SSHClient()
algorithm, blob = host_key.split()[:2]
client.get_host_keys().add(
    "[%s]:%d" % (host, port), algorithm, paramiko.Ed25519Key(data=base64.b64decode(blob))
)
client.set_missing_host_key_policy(paramiko.RejectPolicy())
client.connect(host, port, username=user, key_filename=key, look_for_keys=False, allow_agent=False)
transport = client.get_transport()
print("cipher", transport.remote_cipher)

_, stdout, stderr = client.exec_command("echo out; echo err >&2; exit 3")
assert stdout.read() == b"out\n"
assert stderr.read() == b"err\n"
assert stdout.channel.recv_exit_status() == 3
print("ok exec")

payload = os.urandom(300000)
local = os.path.join(work, "paramiko-local.bin")
with open(local, "wb") as f:
    f.write(payload)
sftp = client.open_sftp()
remote = work + "/paramiko-remote.bin"
sftp.put(local, remote)
assert sftp.stat(remote).st_size == len(payload)
sftp.rename(remote, remote + ".moved")
back = os.path.join(work, "paramiko-back.bin")
sftp.get(remote + ".moved", back)
with open(back, "rb") as f:
    assert f.read() == payload
assert "paramiko-remote.bin.moved" in sftp.listdir(work)
sftp.remove(remote + ".moved")
sftp.close()
print("ok sftp")

channel = transport.open_session()
channel.get_pty(term="xterm", width=101, height=33)
channel.exec_command("stty size; test -t 0 && echo tty")
output = b""
while True:
    chunk = channel.recv(4096)
    if not chunk:
        break
    output += chunk
assert output.split() == [b"33", b"101", b"tty"], output
assert channel.recv_exit_status() == 0
print("ok pty")
client.close()
