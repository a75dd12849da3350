#!/usr/bin/env bash
# Builds the platform's Go binaries from the Go module proxy into a cache outside the repository, keyed by
# version, and prints the directory that holds them. A warm cache makes this a no-op.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${IDM_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/idm-backup-operator}
export GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$cache/bin"

log() { echo "build: $*" >&2; }

# k8s.io/kubernetes pins its ~30 staging modules at v0.0.0 with replace directives into its own tree, so it
# cannot be built as a dependency directly: a wrapper module replaces each one with the published v0.X.Y.
build_kubernetes() {
  local out="$cache/bin/kubernetes-$K8S_VERSION"
  [ -x "$out/kubectl" ] && return 0
  local work="$cache/src/kubernetes-$K8S_VERSION" minor staging
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$work" && cd "$work"
  [ -f go.mod ] || go mod init idm-testbed/kubernetes >/dev/null 2>&1
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}' | while read -r m; do
    go mod edit -replace="$m=$m@$staging"
  done
  local ldflags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl) c
  for c in "${cmds[@]}"; do go get -tool "k8s.io/kubernetes/cmd/$c@$K8S_VERSION"; done
  mkdir -p "$out.tmp"
  for c in "${cmds[@]}"; do
    log "kubernetes $K8S_VERSION: $c"
    go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp/$c" "k8s.io/kubernetes/cmd/$c"
  done
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# A tool-only wrapper module per external Go program, so their dependency graphs never meet.
build_tool() {
  local name=$1 module=$2 version=$3 pkg=$4
  local out="$cache/bin/$name-$version"
  [ -x "$out/$name" ] && return 0
  local work="$cache/src/$name-$version"
  mkdir -p "$work" && cd "$work"
  [ -f go.mod ] || go mod init "idm-testbed/$name" >/dev/null 2>&1
  go get -tool "$pkg@$version"
  log "$name $version"
  mkdir -p "$out.tmp"
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/$name" "$pkg"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# CRDs generated from a Go module's API types: "$cache/crds/<name>-<version>/*.yaml"; "$cache/crds.path"
# names the directory that holds the current ones.
generate_crds() {
  local name=$1 module=$2 version=$3 pkg=$4
  local out="$cache/crds/$name-$version"
  [ -d "$out" ] && return 0
  build_tool controller-gen sigs.k8s.io/controller-tools "$CONTROLLER_TOOLS_VERSION" sigs.k8s.io/controller-tools/cmd/controller-gen
  local work="$cache/src/crds-$name-$version"
  mkdir -p "$work" && cd "$work"
  [ -f go.mod ] || go mod init "idm-testbed/crds-$name" >/dev/null 2>&1
  go get "$module@$version"
  log "CRDs of $name $version"
  rm -rf "$out.tmp"
  "$cache/bin/controller-gen-$CONTROLLER_TOOLS_VERSION/controller-gen" crd:crdVersions=v1,allowDangerousTypes=true \
    "paths=$pkg" "output:crd:dir=$out.tmp"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# This repository's own Go programs (testbed/<name>: the node simulator, and the runner of Argo CD health
# checks): keyed by a hash of their sources; "$cache/<name>.path" names the directory of the current build.
build_own() {
  local name=$1 key
  key=$(cd "$here/$name" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)
  local out="$cache/bin/$name-$key"
  [ -x "$out/$name" ] && { echo "$out" > "$cache/$name.path"; return 0; }
  log "$name $key"
  mkdir -p "$out.tmp"
  (cd "$here/$name" && go build -trimpath -o "$out.tmp/$name" .)
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$out" > "$cache/$name.path"
}

what=${1:-all}
case $what in
  kubernetes) build_kubernetes ;;
  etcd) build_tool etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 ;;
  versitygw) build_tool versitygw github.com/versity/versitygw "$VERSITYGW_VERSION" github.com/versity/versitygw/cmd/versitygw ;;
  helm) build_tool helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm ;;
  # Like this repository's own programs, the checkers name their current build in "$cache/<name>.path",
  # so the tests find them without knowing the pinned version.
  promtool)
    build_tool promtool github.com/prometheus/prometheus "$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/promtool
    echo "$cache/bin/promtool-$PROMETHEUS_VERSION" > "$cache/promtool.path" ;;
  kubeconform)
    build_tool kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
    echo "$cache/bin/kubeconform-$KUBECONFORM_VERSION" > "$cache/kubeconform.path" ;;
  crds)
    generate_crds prometheus-operator github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring \
      "$PROMETHEUS_OPERATOR_VERSION" github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1
    generate_crds cert-manager github.com/cert-manager/cert-manager "$CERT_MANAGER_VERSION" \
      github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1
    printf '%s\n' "$cache/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION" \
      "$cache/crds/cert-manager-$CERT_MANAGER_VERSION" > "$cache/crds.path" ;;
  fakenode) build_own fakenode ;;
  argocd-lua) build_own argocd-lua ;;
  all)
    "$0" kubernetes; "$0" etcd; "$0" versitygw; "$0" fakenode ;;
  *) echo "usage: $0 [all|kubernetes|etcd|versitygw|helm|promtool|kubeconform|crds|fakenode|argocd-lua]" >&2; exit 2 ;;
esac
echo "$cache/bin"
