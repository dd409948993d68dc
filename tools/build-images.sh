#!/usr/bin/env bash
# Builds the images the e2e node runs, without a registry, and prints the folder holding their OCI
# archives on the last line of stdout:
#   base.tar      Debian bookworm from debootstrap with Python 3.11 (stands in for python:3.11-slim)
#   pause.tar     the pod sandbox image, from build/pause/linux/pause.c of the k8s.io/kubernetes module
#   operator.tar  `--target operator` of the Dockerfile, FROM the base above
#   worker.tar    `--target worker`, torch from PyPI (TORCH_INDEX_URL; the CPU index is not reachable here)
# Everything is cached under $MLOPT_CACHE (default ~/.cache/mlopt): the debootstrap tarball, buildah's
# storage (layer cache: a code change rebuilds only the small layers) and pip's download cache.
# Needs root, buildah, debootstrap and gcc (scripts/node-packages installs them from Debian).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_root=${MLOPT_CACHE:-$HOME/.cache/mlopt}
out=$cache_root/images
torch_index=${TORCH_INDEX_URL:-https://pypi.org/simple}
base_ref=localhost/mlopt/base:bookworm-py3.11
die() { echo "build-images: $*" >&2; exit 2; }
[[ $(id -u) == 0 ]] || die "needs root (buildah with its storage under $cache_root, debootstrap)"
for tool in buildah debootstrap gcc; do
  command -v $tool >/dev/null || die "$tool not found: run scripts/node-packages (Debian packages)"
done

mkdir -p "$out" "$cache_root/buildah-tmp"
exec 9>"$out/.build.lock"
flock 9   # concurrent callers wait for one build
# buildah's own storage and RUN --mount=type=cache folders (it puts those under $TMPDIR) stay on
# this machine between runs: that is the layer and pip cache.
export TMPDIR=$cache_root/buildah-tmp
bah() { buildah --root "$cache_root/containers/storage" --runroot "$cache_root/containers/run" \
          --storage-driver overlay "$@"; }

# ---- base: debootstrap, once per machine ----------------------------------------------------------
base_tar=$cache_root/debootstrap-bookworm-py311.tar
if [[ ! -s $base_tar ]]; then
  echo "build-images: debootstrap bookworm (Python 3.11) -> $base_tar" >&2
  rootfs=$(mktemp -d "$cache_root/.rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >&2 || die "debootstrap failed (Debian mirror reachable?)"
  # Like python:3.11-slim: pip installs into the system Python (no PEP 668 marker), no apt lists.
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" --numeric-owner -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -rf "$rootfs"; trap - EXIT
fi
if ! bah inspect --type image "$base_ref" >/dev/null 2>&1; then
  ctr=$(bah from --quiet scratch)
  mnt=$(bah mount "$ctr")
  tar -C "$mnt" --numeric-owner -xf "$base_tar"
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 "$ctr"
  bah commit --quiet "$ctr" "$base_ref" >/dev/null
  bah rm "$ctr" >/dev/null
fi

# ---- pause: the sandbox image, compiled from the kubelet's own module ------------------------------
# `go mod download -json` fetches the module if needed (pinned by tools/k8s/go.sum) and prints its Dir.
k8s_module=$(cd "$repo/tools/k8s" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
  GOMODCACHE=${GOMODCACHE:-$cache_root/gomod} go mod download -json k8s.io/kubernetes |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') ||
  die "cannot fetch the k8s.io/kubernetes module (Go module proxy reachable?)"
pause_c=$k8s_module/build/pause/linux/pause.c
if ! bah inspect --type image localhost/mlopt/pause:e2e >/dev/null 2>&1; then
  pause_dir=$(mktemp -d)
  gcc -Os -static -o "$pause_dir/pause" "$pause_c" || die "gcc -static $pause_c failed (libc6-dev installed?)"
  strip "$pause_dir/pause"
  ctr=$(bah from --quiet scratch)
  bah copy "$ctr" "$pause_dir/pause" /pause >/dev/null
  bah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  bah commit --quiet "$ctr" localhost/mlopt/pause:e2e >/dev/null
  bah rm "$ctr" >/dev/null
  rm -rf "$pause_dir"
fi

# ---- operator and worker: the Dockerfile's targets, exactly as a user builds them for kind ------------
for target in operator worker; do
  echo "build-images: buildah bud --target $target" >&2
  # RUN steps see this machine's CA bundle (it may hold a proxy's CA); a volume, so never in a layer.
  bah bud --quiet --layers --pull=never --isolation oci --network host \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg PYTHON_IMAGE="$base_ref" --build-arg TORCH_INDEX_URL="$torch_index" \
    --target "$target" --tag "docker.io/mlopt/$target:0.1.0" --file "$repo/Dockerfile" "$repo" >&2 ||
    die "buildah bud --target $target failed (see above)"
done
# The layers of earlier builds that no tagged image stands on: a machine that rebuilds after each code
# change would otherwise keep every old worker layer (a CI machine ran out of disk that way).
bah rmi --prune >/dev/null || die "buildah rmi --prune failed (see above)"

# ---- export: docker-archive (uncompressed layers: no gzip pass over the worker's ~6 GB) ---------------
# An archive is rewritten only when its image changed (the image ID is kept next to it).
need_space() {  # ref file: fail before writing, with the numbers, rather than halfway with ENOSPC
  local size avail
  size=$(bah images --json "$1" | python3 -c '
import json, sys
number, unit = json.load(sys.stdin)[0]["size"].split()  # humanised, in SI units: "699.9 KB", "6.06 GB"
print(int(float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit.upper()]))')
  avail=$(df --output=avail -B1 "$out" | tail -1)
  (( avail > size + (1 << 30) )) || die "exporting $1 to $2 needs $(( size >> 20 )) MiB and 1 GiB spare;" \
    "$(( avail >> 20 )) MiB are free there: free disk space (or point MLOPT_CACHE at a larger disk)"
}
export_image() {  # ref file
  local ref=$1 file=$out/$2 id
  id=$(bah inspect --type image --format '{{.FromImageID}}' "$ref")
  [[ -s $file && $(cat "$file.id" 2>/dev/null) == "$id" ]] && return
  rm -f "$file" "$file.id"
  rm -f "$file.tmp"  # a half-written archive of an interrupted export (e.g. a full disk)
  need_space "$ref" "$file"
  bah push --quiet "$ref" "docker-archive:$file.tmp:$ref" >/dev/null || die "exporting $ref failed"
  mv "$file.tmp" "$file" && echo "$id" > "$file.id"
}
export_image "$base_ref" base.tar
export_image localhost/mlopt/pause:e2e pause.tar
export_image docker.io/mlopt/operator:0.1.0 operator.tar
export_image docker.io/mlopt/worker:0.1.0 worker.tar
echo "$out"
