#!/bin/bash
# The swarm (docs/vagrant.md): sw1 inits it, the other nodes join it with a token that sw1's
# Vagrant trigger copied to /vagrant/.vagrant-tokens/ (managers first: Vagrant brings the
# nodes up in order). Run as root by Vagrant after vagrant/node.sh; idempotent: a node already
# in a swarm is left as it is.
#
# usage: swarm.sh init ADDRESS POOL
#        swarm.sh join ADDRESS worker|manager MANAGER:PORT
#   ADDRESS  this node's address on the private network, which it advertises (never the NAT
#            one, 10.0.2.15 on every VirtualBox VM)
#   POOL     where overlay subnets come from: not overlapping any network the node routes to
set -eu

usage() {
	echo "usage: $0 init ADDRESS POOL | $0 join ADDRESS worker|manager MANAGER:PORT" >&2
	exit 2
}
[ $# -ge 1 ] || usage
tokens=${SHOAL_TOKENS:-/vagrant/.vagrant-tokens}
# shoald (vagrant/node.sh); tests/test_vagrant.py points it at a lab node's
export DOCKER_HOST=${DOCKER_HOST:-unix:///run/shoal/shoal.sock}

# True once this node is in a swarm ("pending": its session is reconnecting, say after a
# manager joined); stops the script where shoald does not answer, or the node is locked.
# (set -e does not hold in a function called by `if`: the exits are explicit.)
in_swarm() {
	if ! state=$(docker info --format '{{.Swarm.LocalNodeState}}'); then
		echo "$0: shoald does not answer on $DOCKER_HOST (systemctl status shoald)" >&2
		exit 1
	fi
	case $state in
	inactive) return 1 ;;
	active | pending) echo "$(hostname): already in a swarm ($state)" ;;
	*)
		echo "$0: this node's swarm is $state: see docker info" >&2
		exit 1
		;;
	esac
}

case $1 in
init)
	[ $# -eq 3 ] || usage
	address=$2 pool=$3
	if ! in_swarm; then
		docker swarm init --advertise-addr "$address" --default-addr-pool "$pool"
	fi
	docker node ls
	;;
join)
	[ $# -eq 4 ] || usage
	address=$2 role=$3 manager=$4
	case $role in
	worker | manager) ;;
	*) usage ;;
	esac
	if in_swarm; then
		exit 0
	fi
	if [ ! -s "$tokens/$role" ]; then
		echo "$0: no $role join token in $tokens/$role: sw1's swarm must be up first," \
			"and /vagrant synced since (vagrant up sw1, then vagrant reload $(hostname)" \
			"--provision)" >&2
		exit 1
	fi
	docker swarm join --token "$(cat "$tokens/$role")" --advertise-addr "$address" "$manager"
	;;
*)
	usage
	;;
esac
