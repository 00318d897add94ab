# Shoal: `make test` and `make demo` set up a fresh Debian 12 machine (as root) themselves.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The container executor's engine and the lab's registry; busybox-static is the rootfs of the
# images the lab builds and of the executor's sandbox image (docs/container-executor.md).
# (defined first: `:=` expands what it names at once)
ENGINE_PACKAGES := docker.io docker-registry busybox-static
# Kernel tools the mesh and its tests use, the tools the tests compare against, and promtool.
DEB_PACKAGES := iproute2 nftables conntrack iputils-ping procps curl bind9-dnsutils dnsperf \
	prometheus python3-venv $(ENGINE_PACKAGES)
# What the benchmarks compare against or load with.
BENCH_PACKAGES := wrk haproxy nginx-light util-linux etcd-server etcd-client
# The VM lab (docs/vm-lab.md): QEMU, Debian's kernel (IPVS, ESP) and what builds its image;
# tcpdump captures its wire.
VM_PACKAGES := qemu-system-x86 linux-image-amd64 mmdebstrap e2fsprogs kmod \
	tcpdump
# CI's check of the Vagrantfile and its provisioning scripts (docs/vagrant.md): `vagrant
# validate` for VirtualBox and libvirt, shellcheck.
VAGRANT_PACKAGES := vagrant vagrant-libvirt shellcheck

.PHONY: all setup deb test lint typecheck unit demo bench clean

all: test

setup: deb $(VENV)/.installed

deb:
	@missing=""; for p in $(DEB_PACKAGES) $(VM_PACKAGES) $(VAGRANT_PACKAGES) $(EXTRA_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# strict, over mesh/, orchestrator/, tests/ and bench/ ([tool.mypy] packages in pyproject.toml)
typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/shoal lab demo

bench:
	$(MAKE) setup EXTRA_PACKAGES="$(BENCH_PACKAGES)"
	$(BIN)/python -m bench.mesh data
	$(BIN)/python -m bench.mesh sync
	$(BIN)/python -m bench.dns
	$(BIN)/python -m bench.raft
	$(BIN)/python -m bench.control

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
