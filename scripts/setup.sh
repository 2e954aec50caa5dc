#!/usr/bin/env bash
# Set up lazymount on a fresh Debian 12 machine, as root: system packages, a virtual
# environment in .venv, and the project installed into it (editable, with test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

# environment-modules and Lmod's own dependencies: the module tests run both module systems;
# docker-registry (CNCF distribution) and apache2-utils (htpasswd): the OCI registry tests;
# openssl: the TLS tests make their own CA; binutils (readelf): the relocation tests;
# tar (GNU tar, in every Debian base system): it writes the files of a package
packages=(fuse3 libfuse3-dev pkg-config gcc binutils tar python3-dev python3-venv gnupg nginx squid
          curl openssl environment-modules lua5.3 lua-posix lua-filesystem lua-json lua-term tcl
          docker-registry apache2-utils systemd)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # the package starts a system registry on :5000; the tests start their own on loopback
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null \
            && systemctl is-active --quiet docker-registry 2>/dev/null; then
        systemctl disable --now docker-registry
    fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$python" -m venv .venv
fi
# Debian's lmod conflicts with environment-modules (both provide `module`), so Lmod is unpacked
# into .venv/lmod instead of installed; the tests run it from there (it finds its files itself).
lmod_exec=usr/share/lmod/lmod/libexec/lmod
if [ ! -x "/$lmod_exec" ] && [ ! -x ".venv/lmod/$lmod_exec" ]; then
    echo "setup: unpacking Lmod into .venv/lmod"
    download=$(mktemp -d)
    # a machine that had every package may have no package lists yet (apt-get clean)
    (cd "$download" && { apt-get download -qq -o APT::Sandbox::User=root lmod 2>/dev/null \
        || { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root lmod; }; })
    mkdir -p .venv/lmod
    dpkg-deb --fsys-tarfile "$download"/lmod_*.deb | tar -x -C .venv/lmod ./usr
    rm -rf "$download"
fi
# the daemon's system user (a daemon started as root runs as it and owns its store; the
# systemd unit names it with --user lazymount)
# and a second, ordinary account that the security tests attack from
if ! id lazymount >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin lazymount
fi
if ! id lazymount-test >/dev/null 2>&1; then
    useradd --user-group --no-create-home --shell /usr/sbin/nologin lazymount-test
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done ($(.venv/bin/lazymount --version))"
