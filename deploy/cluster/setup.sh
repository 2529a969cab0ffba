#!/bin/sh
# One-shot set-up of the cluster playground: the playground's set-up for node a
# (keys, demo users, targets, policies), the same keys and policies for node b,
# and the database password, readable by PostgreSQL and by the bastions only.
set -eu
sh /playground/setup.sh
node_b=/nodes/bastion-b
mkdir -p "$node_b"
chmod 0700 "$node_b"
# Every node must present the same keys: a node with keys of its own is refused
# at start while another node runs.
for file in host_ed25519 host_ed25519.pub upstream_ed25519 upstream_ed25519.pub \
            ca_ed25519 ca_ed25519.pub totp.key; do
    cp -p "/var/lib/portcullis/$file" "$node_b/$file"
done
rm -rf "$node_b/policies"
cp -rp /var/lib/portcullis/policies "$node_b/policies"
chown -R 10022 "$node_b"

mkdir -p /secrets/postgres /secrets/portcullis
if [ ! -f /secrets/portcullis/password ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > /secrets/portcullis/password
fi
cp /secrets/portcullis/password /secrets/postgres/password
chown 999 /secrets/postgres /secrets/postgres/password          # the postgres image's user
chown 10022 /secrets/portcullis /secrets/portcullis/password    # portcullis (deploy/Dockerfile)
chmod 0700 /secrets/postgres /secrets/portcullis
chmod 0400 /secrets/postgres/password /secrets/portcullis/password
echo "cluster playground ready: docker compose -f deploy/cluster/compose.yaml up"
