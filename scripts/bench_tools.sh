#!/usr/bin/env bash
# Installs the Debian packages that the processor benchmarks compare Settle
# with (make bench-jsonl, bench-http, bench-exec), when they are missing.
# Usage: scripts/bench_tools.sh COMMAND...   (redis-server, wrk, parallel)
set -euo pipefail
missing=()
for cmd in "$@"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[ ${#missing[@]} -eq 0 ] && exit 0
# Debian's package for each command.
pkgs=()
for cmd in "${missing[@]}"; do
  case "$cmd" in
    redis-server) pkgs+=(redis-server) ;;
    wrk) pkgs+=(wrk) ;;
    parallel) pkgs+=(parallel) ;;
    *) echo "bench_tools.sh: no package known for $cmd" >&2; exit 2 ;;
  esac
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${pkgs[*]} (apt-get)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
