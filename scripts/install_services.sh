#!/usr/bin/env bash
# Install the servers the tests start (the one way to do it: `make services`): Debian's redis-server and postgresql;
# libcap2-bin's capsh, with which a test started as root drops the privilege of binding a port below 1024; and
# prometheus' promtool, which evaluates deploy/'s alerts and dashboard queries on made-up series (`promtool test rules`).
#
# The tests start their own Redis and PostgreSQL on ephemeral loopback ports in temporary directories, from these
# packages' binaries; nothing here starts a server. Installed only when missing, with apt-get (as root, or with
# sudo when there is one); without either, says which command to run and fails, rather than letting the tests fail
# one by one.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v capsh >/dev/null || [ -x /sbin/capsh ] || missing+=(libcap2-bin)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    run=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    run=(sudo -n)
else
    echo "install_services: the tests need ${missing[*]}: run  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "install_services: installing ${missing[*]} (Debian packages)" >&2
export DEBIAN_FRONTEND=noninteractive
"${run[@]}" apt-get update -qq
# Only the binaries are needed: the packages' own services are never started by the tests.
"${run[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
