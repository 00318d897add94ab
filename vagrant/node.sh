#!/bin/bash
# Every node (docs/vagrant.md): Shoal from /vagrant into a virtualenv in /opt/shoal, the
# Debian packages it runs with, Debian's docker.io as the node's container engine pulling from
# the swarm's registry, and shoald under systemd. Run as root by Vagrant; idempotent: a second
# run changes nothing and restarts nothing unless /vagrant or the arguments changed.
#
# usage: node.sh NAME ADDRESS REGISTRY
#   REGISTRY  HOST:PORT of the registry every engine uses as its Docker Hub mirror (plain
#             HTTP), or "none" for Docker Hub itself
set -eu

if [ $# -ne 3 ]; then
	echo "usage: $0 NAME ADDRESS REGISTRY|none" >&2
	exit 2
fi
name=$1 address=$2 registry=$3
src=${SHOAL_SRC:-/vagrant}
venv=/opt/shoal
socket=/run/shoal/shoal.sock

if [ "$(id -u)" -ne 0 ]; then
	echo "$0: run as root (Vagrant's shell provisioner does)" >&2
	exit 1
fi
if [ ! -f "$src/pyproject.toml" ]; then
	echo "$0: no Shoal in $src: is the synced folder mounted? (vagrant reload $name)" >&2
	exit 1
fi
if ! ip -o -4 addr show | grep -q " inet $address/"; then
	echo "$0: $name has no address $address: the private network is missing" >&2
	exit 1
fi

# The Makefile's DEB_PACKAGES and ENGINE_PACKAGES that a node runs with (not its test tools,
# nor the registry: sw1's, vagrant/registry.sh); ipvsadm to look at IPVS, which the mesh uses
# on Debian's kernel.
packages="iproute2 nftables conntrack iputils-ping procps curl ca-certificates python3-venv
	docker.io busybox-static ipvsadm"

# The engine's settings before its first start: the registry, and hands off the network
# (no bridge, no iptables rules or FORWARD policy), which is the mesh's, as in the lab
# (orchestrator/lab/engines.py).
daemon_json() {
	printf '{\n'
	if [ "$registry" != none ]; then
		printf '  "registry-mirrors": ["http://%s"],\n' "$registry"
		printf '  "insecure-registries": ["%s"],\n' "$registry"
	fi
	printf '  "bridge": "none",\n'
	printf '  "iptables": false,\n'
	printf '  "ip-masq": false,\n'
	printf '  "log-driver": "json-file",\n'
	printf '  "log-opts": {"max-size": "10m", "max-file": "3"}\n'
	printf '}\n'
}

# Write $1 from stdin; true (0) when it changed.
update_file() {
	new=$(mktemp)
	cat >"$new"
	if [ -f "$1" ] && cmp -s "$new" "$1"; then
		rm -f "$new"
		return 1
	fi
	install -D -m 644 "$new" "$1"
	rm -f "$new"
	return 0
}

engine_changed=no
mkdir -p /etc/docker
if daemon_json | update_file /etc/docker/daemon.json; then
	engine_changed=yes
fi

missing=""
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "installing Debian packages:$missing"
	apt-get update -q
	# shellcheck disable=SC2086 # one word per package
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
if [ "$engine_changed" = yes ]; then
	systemctl restart docker
fi
systemctl enable --now docker

# Shoal: a copy of the sources (pip builds in the source tree, which may be read-only or the
# host's), installed again only when they changed.
stamp=$(cd "$src" && find pyproject.toml README.md mesh orchestrator -type f \
	! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum)
shoal_changed=no
if [ ! -x "$venv/bin/shoald" ] || [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
	[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
	rm -rf "$venv/src"
	mkdir -p "$venv/src"
	(cd "$src" && cp -R pyproject.toml README.md mesh orchestrator "$venv/src/")
	"$venv/bin/pip" install -q --disable-pip-version-check "$venv/src"
	echo "$stamp" >"$venv/.installed"
	shoal_changed=yes
fi
for cmd in shoal shoald shoal-mesh; do
	ln -sf "$venv/bin/$cmd" "/usr/local/bin/$cmd"
done

# `docker` on the node talks to shoald, as the blog's did to its engine; the engine itself is
# `docker -H unix:///var/run/docker.sock`. The docker group (the vagrant user) may use both.
update_file /etc/profile.d/shoal.sh <<EOT || true
# Shoal (vagrant/node.sh): the docker CLI talks to shoald
export DOCKER_HOST=unix://$socket
EOT
if id vagrant >/dev/null 2>&1; then
	usermod -aG docker vagrant
fi

unit_changed=no
if update_file /etc/systemd/system/shoald.service <<EOT; then
[Unit]
Description=Shoal node daemon: swarm mode and its routing mesh
Documentation=file:///vagrant/docs/vagrant.md
Wants=docker.service network-online.target
After=docker.service network-online.target

[Service]
# setgid: the API socket shoald makes here belongs to the docker group
ExecStartPre=/usr/bin/install -d -m 2750 -g docker $(dirname "$socket")
ExecStart=$venv/bin/shoald --host unix://$socket --data-root /var/lib/shoal --executor container --engine unix:///var/run/docker.sock
# shoald stops its tasks and its shoal-mesh itself
KillMode=mixed
TimeoutStopSec=90
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOT
	unit_changed=yes
	systemctl daemon-reload
fi
systemctl enable shoald
if [ "$shoal_changed$unit_changed$engine_changed" != nonono ] || ! systemctl is-active -q shoald; then
	systemctl restart shoald
fi

# shoald answers once it has resumed its node (~2 s; longer when it is a manager in a swarm)
for _ in $(seq 120); do
	if DOCKER_HOST=unix://$socket docker version >/dev/null 2>&1; then
		echo "$name: shoald answers on $socket ($(DOCKER_HOST=unix://$socket docker info \
			--format '{{.OperatingSystem}}'))"
		exit 0
	fi
	sleep 1
done
echo "$0: shoald on $name does not answer on $socket after 120 s:" >&2
journalctl -u shoald -n 30 --no-pager >&2 || true
exit 1
