#!/bin/sh
# Installs what the benchmarks need on a fresh Debian machine (run as root from the repo).
set -eu
cd "$(dirname "$0")/.."
apt-get update
apt-get install -y --no-install-recommends wrk haproxy nginx-light curl util-linux
python -m pip install twisted h11 pyopenssl
python -m pip install -e . --config-settings editable_mode=compat
twistd --help | grep -q nlbproxy || { echo "twistd does not list nlbproxy" >&2; exit 1; }
