#!/bin/sh
# One-shot set-up of the playground: bastion keys, demo users' keys, target host
# keys, and policies that pin them. Idempotent: existing keys are kept.
set -eu
cd /playground
keys=/playground/keys          # bind-mounted: the demo users' private keys
shared=/shared                 # read by the targets
# The checkout's owner, who runs ssh -i with the demo keys: on rootful Docker
# this script runs as root, and keys left to root (mode 0600) would be unusable.
owner=$(stat -c '%u:%g' /playground)
mkdir -p "$keys" "$shared" /var/lib/portcullis/policies
chmod 0700 /var/lib/portcullis   # portcullis refuses a data dir others can read

portcullis keys --config /playground/portcullis.toml > /tmp/keys.tsv
cp /var/lib/portcullis/ca_ed25519.pub /var/lib/portcullis/upstream_ed25519.pub "$shared/"

for user in alice bob; do
    [ -f "$keys/$user" ] || ssh-keygen -q -t ed25519 -N '' -C "$user@playground" -f "$keys/$user"
done
chmod 0644 "$keys"/*.pub
chmod 0600 "$keys/alice" "$keys/bob"
chown "$owner" "$keys" "$keys/alice" "$keys/alice.pub" "$keys/bob" "$keys/bob.pub"

for target in staging production; do
    mkdir -p "$shared/$target"
    [ -f "$shared/$target/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$shared/$target/host_ed25519"
done

policies=/var/lib/portcullis/policies
cat > "$policies/users.toml" <<USERS
[users.alice]
keys   = ["$(cat "$keys/alice.pub")"]
groups = ["engineers"]

[users.bob]
keys   = ["$(cat "$keys/bob.pub")"]
groups = ["sre-leads", "auditors"]
USERS
cat > "$policies/targets.toml" <<TARGETS
[targets.staging]
address  = "staging:22"
host_key = "$(cat "$shared/staging/host_ed25519.pub")"
logins   = ["root"]
labels   = { env = "staging" }

[targets.production]
address  = "production:22"
host_key = "$(cat "$shared/production/host_ed25519.pub")"
logins   = ["root"]
labels   = { env = "production" }
auth     = "certificate"
TARGETS
cp /playground/flows.toml "$policies/flows.toml"
portcullis policy check "$policies"
chown -R 10022 /var/lib/portcullis
echo "playground ready: keys for alice and bob are in deploy/playground/keys"
