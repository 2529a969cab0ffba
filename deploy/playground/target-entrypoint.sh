#!/bin/sh
# Starts a playground target with the host key and trust material that the
# setup service prepared in /shared (one directory per target name).
set -eu
name="$1"
install -m 0600 "/shared/$name/host_ed25519" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "/shared/$name/host_ed25519.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -m 0644 /shared/ca_ed25519.pub /etc/ssh/portcullis_ca.pub
install -d -m 0700 /root/.ssh
install -m 0600 /shared/upstream_ed25519.pub /root/.ssh/authorized_keys
cat > /etc/ssh/sshd_config <<CONFIG
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
TrustedUserCAKeys /etc/ssh/portcullis_ca.pub
Subsystem sftp internal-sftp
CONFIG
exec /usr/sbin/sshd -D -e
