#!/usr/bin/env bash
# Builds Kueue's controller manager (tools/kueue: sigs.k8s.io/kueue) from the Go module proxy into a
# machine-local cache keyed by version, next to the CRDs of the same module version
# (config/components/crd/bases, copied from GOMODCACHE), and prints that folder on the last line of
# stdout:  <folder>/kueue  and  <folder>/crd/*.yaml.  tests/e2e/kueue.py applies the CRDs and runs
# the manager. Does nothing when it is already there. Same caches and rules as build-control-plane.sh.
set -euo pipefail

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${MLOPT_CACHE:-$HOME/.cache/mlopt}
die() { echo "build-kueue: $*" >&2; exit 2; }

go_cmd=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $(command -v "$go_cmd" || true) ]] || die "Go toolchain not found (need Go >= 1.26 on PATH or GO=/path/to/go)"
export GOMODCACHE=${GOMODCACHE:-$cache_root/gomod}
export GOCACHE=${GOCACHE:-$cache_root/go-build}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

version=$(cd "$tools_dir/kueue" && "$go_cmd" list -m -f '{{.Version}}' sigs.k8s.io/kueue) ||
  die "cannot resolve sigs.k8s.io/kueue (is the Go module proxy reachable?)"
out=$cache_root/kueue-bin/$version
if [[ ! -x $out/kueue || ! -d $out/crd ]]; then
  mkdir -p "$cache_root/kueue-bin"
  exec 9>"$cache_root/kueue-bin/.build.lock"
  flock 9
  if [[ ! -x $out/kueue || ! -d $out/crd ]]; then
    tmp=$(mktemp -d "$cache_root/kueue-bin/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "build-kueue: building kueue $version" >&2
    (cd "$tools_dir/kueue" && "$go_cmd" build -trimpath \
      -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" \
      -o "$tmp/kueue" sigs.k8s.io/kueue/cmd/kueue) >&2 || die "kueue build failed (see above)"
    module_dir=$(cd "$tools_dir/kueue" && "$go_cmd" list -m -f '{{.Dir}}' sigs.k8s.io/kueue) &&
      [[ -d $module_dir/config/components/crd/bases ]] || die "no config/components/crd/bases in sigs.k8s.io/kueue $version"
    mkdir -p "$tmp/crd"
    cp "$module_dir"/config/components/crd/bases/*.yaml "$tmp/crd/"
    chmod -R u+w "$tmp/crd"  # GOMODCACHE files are read-only
    rm -rf "$out"
    mv "$tmp" "$out"
    trap - EXIT
  fi
fi
echo "$out"
