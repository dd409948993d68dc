#!/usr/bin/env bash
# Builds the e2e cluster from the Go module proxy into a machine-local cache keyed by version, and
# prints the bin dir on the last line of stdout. Skips the build when the binaries are already there.
#   control plane: etcd (tools/etcd), kube-apiserver, kube-controller-manager, kube-scheduler
#   node:          kubelet (tools/k8s), containerd + containerd-shim-runc-v2 + ctr (tools/containerd);
#                  runc and the CNI plugins come from Debian (scripts/node-packages)
#
#   MLOPT_CACHE  cache root (default ~/.cache/mlopt); binaries go to
#                $MLOPT_CACHE/k8s-bin/<k8s-version>-etcd<etcd-version>-containerd<version>/
#   GO           go command (default: `go` on PATH, else /usr/local/go/bin/go)
#   GOMODCACHE, GOCACHE  default to $MLOPT_CACHE/gomod and $MLOPT_CACHE/go-build
set -euo pipefail

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${MLOPT_CACHE:-$HOME/.cache/mlopt}

die() { echo "build-control-plane: $*" >&2; exit 2; }

go_cmd=${GO:-}
if [[ -z $go_cmd ]]; then
  go_cmd=$(command -v go || true)
  [[ -n $go_cmd ]] || { [[ -x /usr/local/go/bin/go ]] && go_cmd=/usr/local/go/bin/go; }
fi
[[ -n $go_cmd && -x $(command -v "$go_cmd" || true) ]] ||
  die "Go toolchain not found (need Go >= 1.26 on PATH, at /usr/local/go/bin/go, or GO=/path/to/go)"

export GOMODCACHE=${GOMODCACHE:-$cache_root/gomod}
export GOCACHE=${GOCACHE:-$cache_root/go-build}
# Never fetch another toolchain; never touch go.mod/go.sum (they are committed and pin every hash).
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

module_version() { (cd "$tools_dir/$1" && "$go_cmd" list -m -f '{{.Version}}' "$2"); }
k8s_version=$(module_version k8s k8s.io/kubernetes) ||
  die "cannot resolve k8s.io/kubernetes in tools/k8s (is the Go module proxy reachable? GOPROXY=$("$go_cmd" env GOPROXY))"
etcd_version=$(module_version etcd go.etcd.io/etcd/server/v3) ||
  die "cannot resolve go.etcd.io/etcd/server/v3 in tools/etcd (is the Go module proxy reachable?)"
containerd_version=$(module_version containerd github.com/containerd/containerd/v2) ||
  die "cannot resolve github.com/containerd/containerd/v2 in tools/containerd (is the Go module proxy reachable?)"

bin_dir=$cache_root/k8s-bin/$k8s_version-etcd$etcd_version-containerd$containerd_version
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy
  containerd containerd-shim-runc-v2 ctr)

have_all() { local b; for b in "${binaries[@]}"; do [[ -x $bin_dir/$b ]] || return 1; done; }

if ! have_all; then
  mkdir -p "$cache_root/k8s-bin"
  # Concurrent callers (pytest workers, scripts/cluster-up) wait for one build instead of racing.
  exec 9>"$cache_root/k8s-bin/.build.lock"
  flock 9
  if ! have_all; then
    tmp_dir=$(mktemp -d "$cache_root/k8s-bin/.tmp.XXXXXX")
    trap 'rm -rf "$tmp_dir"' EXIT
    minor=${k8s_version#v1.}; minor=${minor%%.*}
    stamp=k8s.io/component-base/version
    client_stamp=k8s.io/client-go/pkg/version
    k8s_ldflags="-s -w"
    for pkg in $stamp $client_stamp; do
      k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      k8s_ldflags+=" -X $pkg.gitTreeState=clean"
    done
    echo "build-control-plane: building etcd $etcd_version into $bin_dir" >&2
    (cd "$tools_dir/etcd" && "$go_cmd" build -trimpath -ldflags "-s -w" -o "$tmp_dir/etcd" \
      go.etcd.io/etcd/server/v3) >&2 || die "etcd build failed (see above; Go module proxy reachable?)"
    echo "build-control-plane: building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy $k8s_version" >&2
    (cd "$tools_dir/k8s" && "$go_cmd" build -trimpath -ldflags "$k8s_ldflags" -o "$tmp_dir/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy) >&2 ||
      die "kubernetes build failed (see above; Go module proxy reachable?)"
    echo "build-control-plane: building containerd $containerd_version" >&2
    ctrd=github.com/containerd/containerd/v2
    (cd "$tools_dir/containerd" && "$go_cmd" build -trimpath \
      -ldflags "-s -w -X $ctrd/version.Version=$containerd_version -X $ctrd/version.Revision=go-module" \
      -o "$tmp_dir/" $ctrd/cmd/containerd $ctrd/cmd/containerd-shim-runc-v2 $ctrd/cmd/ctr) >&2 ||
      die "containerd build failed (see above; Go module proxy reachable?)"
    # Publish all binaries at once so a half-finished build is never mistaken for a cached one.
    rm -rf "$bin_dir"
    mv "$tmp_dir" "$bin_dir"
    chmod 755 "$bin_dir"
    trap - EXIT
  fi
fi

echo "$bin_dir"
