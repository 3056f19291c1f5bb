#!/usr/bin/env bash
# Installs what the transfer bench's baseline needs (Debian): libtorrent's Python binding
# for ../shared/bench/bt_bench.sh, and GNU time. The tests and the main job need none of it.
set -euo pipefail
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
$sudo apt-get install -y python3-libtorrent time
