#!/bin/bash
# sw1's registry (SHOAL_REGISTRY_MIRROR=sw1, the default; docs/vagrant.md): Debian's
# docker-registry, plain HTTP, seeded with the images Shoal's lab builds from busybox-static
# (gianarb/micro, alpine, busybox: orchestrator/lab/registry.py), so the blog runs without
# Docker Hub. Every node's engine has it as its mirror (vagrant/node.sh). Run as root by
# Vagrant after vagrant/node.sh; idempotent: a tag already there is left alone.
#
# usage: registry.sh ADDRESS:PORT
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 ADDRESS:PORT" >&2
	exit 2
fi
listen=$1
python=/opt/shoal/bin/python
config=/etc/docker/registry/config.yml

if ! dpkg-query -W -f='${Status}' docker-registry 2>/dev/null | grep -q "ok installed"; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-registry
fi

# Debian's configuration asks for htpasswd logins; the lab's registry takes none.
new=$(mktemp)
cat >"$new" <<EOT
version: 0.1
log:
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $listen
  headers:
    X-Content-Type-Options: [nosniff]
EOT
if ! cmp -s "$new" "$config"; then
	install -m 644 "$new" "$config"
	systemctl restart docker-registry
fi
rm -f "$new"
systemctl enable --now docker-registry

for _ in $(seq 30); do
	if curl -fsS -o /dev/null "http://$listen/v2/" 2>/dev/null; then
		break
	fi
	sleep 1
done
"$python" - "$listen" <<'EOT'
import sys

from orchestrator.lab.registry import SEED, SEED_TAG, catalog, has_tag, push

addr = sys.argv[1]
built = {}
for repository, build in SEED.items():
    if has_tag(addr, repository, SEED_TAG):
        continue
    if build not in built:
        built[build] = build()
    push(addr, repository, SEED_TAG, built[build])
    print(f"pushed {repository}:{SEED_TAG} to {addr}")
print(f"registry {addr}: {', '.join(catalog(addr))}")
EOT
