#!/usr/bin/env bash
# Fetches KServe's InferenceService CRD (config/crd/full/serving.kserve.io_inferenceservices.yaml) from
# KServe's Go module, github.com/kserve/kserve (Apache-2.0), through the Go module proxy, checks the
# module against the hash pinned here (the checksum database checks it too), and keeps the file in a
# machine-local cache keyed by version. Prints the file's path on the last line of stdout; does
# nothing when it is already there. tests/optimizer/test_serving_layout.py validates the
# InferenceService mlopt writes against this schema. Same caches and rules as build-kueue.sh.
set -euo pipefail

# v0.17.0 is the newest release the Go module proxy serves (v0.17.1 and v0.18.0 are refused there).
version=v0.17.0
module_sum="h1:IaynaBFzVQz1Xyrw5n3ncqzd5Y7L1RkO+YWvVwwtMQE="
crd_path=config/crd/full/serving.kserve.io_inferenceservices.yaml

cache_root=${MLOPT_CACHE:-$HOME/.cache/mlopt}
die() { echo "fetch-kserve-crd: $*" >&2; exit 2; }

go_cmd=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $(command -v "$go_cmd" || true) ]] || die "Go toolchain not found (need Go on PATH or GO=/path/to/go)"
export GOMODCACHE=${GOMODCACHE:-$cache_root/gomod}
export GOTOOLCHAIN=local

out=$cache_root/kserve-crd/$version/$(basename "$crd_path")
if [[ ! -f $out ]]; then
  mkdir -p "$cache_root/kserve-crd"
  exec 9>"$cache_root/kserve-crd/.fetch.lock"
  flock 9
  if [[ ! -f $out ]]; then
    tmp=$(mktemp -d "$cache_root/kserve-crd/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "fetch-kserve-crd: downloading github.com/kserve/kserve@$version" >&2
    # Run outside any module (an empty folder), so only this module is downloaded, not a build graph.
    json=$(cd "$tmp" && "$go_cmd" mod download -json "github.com/kserve/kserve@$version") ||
      die "cannot download github.com/kserve/kserve@$version (is the Go module proxy reachable?): $json"
    field() { sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" <<<"$json"; }
    [[ $(field Sum) == "$module_sum" ]] || die "github.com/kserve/kserve@$version has hash '$(field Sum)', expected $module_sum"
    module_dir=$(field Dir)
    [[ -f $module_dir/$crd_path ]] || die "no $crd_path in github.com/kserve/kserve@$version ($module_dir)"
    mkdir -p "$tmp/out"
    cp "$module_dir/$crd_path" "$tmp/out/"
    chmod u+w "$tmp/out/$(basename "$crd_path")"  # GOMODCACHE files are read-only
    rm -rf "$cache_root/kserve-crd/$version"
    mv "$tmp/out" "$cache_root/kserve-crd/$version"
  fi
fi
echo "$out"
