#!/usr/bin/env bash
# Builds versitygw (tools/versitygw, a real S3-compatible server) from the Go module proxy into a
# machine-local cache keyed by version, and prints the binary's path on the last line of stdout.
# Does nothing when it is already there. Same caches and rules as build-control-plane.sh.
set -euo pipefail

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${MLOPT_CACHE:-$HOME/.cache/mlopt}
die() { echo "build-versitygw: $*" >&2; exit 2; }

go_cmd=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $(command -v "$go_cmd" || true) ]] || die "Go toolchain not found (need Go >= 1.26 on PATH or GO=/path/to/go)"
export GOMODCACHE=${GOMODCACHE:-$cache_root/gomod}
export GOCACHE=${GOCACHE:-$cache_root/go-build}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

version=$(cd "$tools_dir/versitygw" && "$go_cmd" list -m -f '{{.Version}}' github.com/versity/versitygw) ||
  die "cannot resolve github.com/versity/versitygw (is the Go module proxy reachable?)"
binary=$cache_root/versitygw-bin/$version/versitygw
if [[ ! -x $binary ]]; then
  mkdir -p "$cache_root/versitygw-bin"
  exec 9>"$cache_root/versitygw-bin/.build.lock"
  flock 9
  if [[ ! -x $binary ]]; then
    tmp=$(mktemp -d "$cache_root/versitygw-bin/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "build-versitygw: building versitygw $version" >&2
    (cd "$tools_dir/versitygw" && "$go_cmd" build -trimpath -ldflags "-s -w" -o "$tmp/versitygw" \
      github.com/versity/versitygw/cmd/versitygw) >&2 || die "versitygw build failed (see above)"
    mkdir -p "$(dirname "$binary")"
    mv "$tmp/versitygw" "$binary"
  fi
fi
echo "$binary"
