#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) and runs banger's whole test
# suite: unit tests, protocol golden/robustness tests, the store crash test
# and the integration tests that drive real bangerd processes.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
# What the tests meet for real: a registry (docker-registry) to pull from,
# umoci to compare unpacked trees with, mmdebstrap for the golden image,
# Debian's cloud kernel to import and inspect. Only install what is missing, so a warm
# machine does not pay for apt.
packages=(build-essential pkg-config e2fsprogs qemu-system-x86 nftables iproute2 procps
  docker-registry skopeo umoci apache2-utils busybox-static mmdebstrap linux-image-cloud-amd64
  coreutils qemu-utils iputils-ping bind9-dnsutils openssh-client systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi
# systemd-resolved for the `dns setup` test, unpacked but not installed:
# installing it would take over this machine's /etc/resolv.conf. The test
# runs it in namespaces of its own (tests/tests/dns_setup.rs). Same version
# as the installed systemd, whose libsystemd-shared it links against.
resolved_dir=/var/cache/banger-tests/systemd-resolved
if [ ! -x "$resolved_dir/lib/systemd/systemd-resolved" ]; then
  [ -d /var/lib/apt/lists/partial ] && ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq
  deb_dir=$(mktemp -d)
  chmod 755 "$deb_dir"
  systemd_version=$(dpkg-query -W -f='${Version}' systemd)
  (cd "$deb_dir" && { apt-get download -qq "systemd-resolved=$systemd_version" ||
    apt-get download -qq systemd-resolved; })
  mkdir -p "$resolved_dir"
  dpkg-deb -x "$deb_dir"/systemd-resolved_*.deb "$resolved_dir"
  rm -rf "$deb_dir"
fi
export BANGER_TEST_RESOLVED="$resolved_dir/lib/systemd/systemd-resolved"
if ! command -v cargo >/dev/null; then
  # Debian's own toolchain; banger needs Rust >= 1.85 (see README).
  apt-get install -y -qq cargo
fi

cargo --version
# Binaries first: the integration tests run the real bangerd and banger.
cargo build --workspace --bins --locked
# The guest agent goes into images as a static binary; bangerd finds it in
# target/x86_64-unknown-linux-gnu/<profile>/ (see docs/vms.md).
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -p banger-agent --locked --target x86_64-unknown-linux-gnu
cargo test --workspace --locked --no-fail-fast -- --test-threads=4
