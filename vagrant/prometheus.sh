#!/bin/bash
# Prometheus on sw1 (docs/vagrant.md): Debian's package, configured by vagrant/prometheus.yml
# (every node's metrics, found through sw1's shoald) and its rule files in vagrant/prometheus/,
# checked by promtool before it is restarted. Run as root by Vagrant after vagrant/node.sh;
# idempotent: restarted only when a file or its groups changed.
#
# usage: prometheus.sh
set -eu

src=${SHOAL_SRC:-/vagrant}/vagrant
etc=/etc/prometheus

if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "ok installed"; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
fi

if [ ! -f "$src/prometheus.yml" ]; then
	echo "no $src/prometheus.yml: Prometheus keeps Debian's configuration (itself only)"
	systemctl enable --now prometheus
	exit 0
fi

# Into a staging copy of /etc/prometheus first: promtool checks the configuration with the
# rule files it names, and a bad one leaves the running Prometheus as it is.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -R "$etc/." "$stage/"
cp "$src/prometheus.yml" "$stage/prometheus.yml"
# its rule files, named relative to it (prometheus/rules.yml)
if [ -d "$src/prometheus" ]; then
	cp -R "$src/prometheus" "$stage/"
fi
if ! promtool check config "$stage/prometheus.yml"; then
	echo "$0: $src/prometheus.yml is refused by promtool (above); Prometheus left as it was" >&2
	exit 1
fi
changed=no
if ! diff -r -q "$stage" "$etc" >/dev/null; then
	cp -R "$stage/." "$etc/"
	changed=yes
fi
# It finds the nodes through shoald's API socket, which is the docker group's (vagrant/node.sh).
if ! id -nG prometheus | tr ' ' '\n' | grep -qx docker; then
	usermod -aG docker prometheus
	changed=yes
fi
systemctl enable prometheus
if [ "$changed" = yes ] || ! systemctl is-active -q prometheus; then
	systemctl restart prometheus
fi
echo "Prometheus: http://$(hostname -I | tr ' ' '\n' | grep '^192\.168\.56\.' | head -n1):9090"
