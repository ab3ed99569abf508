#!/usr/bin/env bash
# Vet and test the Go client (clients/go) with Debian's Go toolchain and
# Debian's packaged msgpack sources only: CI reaches no Go module proxy.
#
# Recipe: clients/go/go.mod requires the upstream module versions as usual
# (so the package builds normally anywhere with a proxy). Here we build a
# vendor/ tree (git-ignored, rebuilt on every run) from the sources Debian
# installs under /usr/share/gocode/src, write vendor/modules.txt for exactly
# the versions go.mod requires, and run the go command with
# GOFLAGS=-mod=vendor GOPROXY=off, which never consults the module graph or a
# proxy. (A `replace` to /usr/share/gocode does not work: msgpack's go.mod
# pulls testify's whole graph into module loading, and Debian ships parts of
# it without go.mod files.)
#
# The integration tests start a real daemon with $EMBEDD_PYTHON (default
# <repo>/.venv/bin/python); EMBEDD_PYTHON=skip skips them. Extra arguments go
# to `go test` (e.g. -run TestDaemonRestart -v).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
moddir=$repo/clients/go
gocode=/usr/share/gocode/src

# Debian packages: the toolchain and the msgpack library (which pulls in its
# dependency golang-github-vmihailenco-tagparser.v2-dev).
apt_packages=(golang-go golang-github-vmihailenco-msgpack.v5-dev)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH=/usr/lib/go/bin:$PATH
export GO111MODULE=on GOFLAGS=-mod=vendor GOPROXY=off GOSUMDB=off GOWORK=off GOTOOLCHAIN=local
export GOPATH=${GOPATH:-$repo/.cache/go/path}
export GOCACHE=${GOCACHE:-$repo/.cache/go/build}
go version

# --- vendor/ from Debian's sources, for the versions go.mod requires --------
vendor=$moddir/vendor
rm -rf "$vendor"
mkdir -p "$vendor"
modules_txt=$vendor/modules.txt
: >"$modules_txt"
# go.mod's require lines: "module version [// indirect]", in a block or not.
while read -r mod version; do
    src=$gocode/$mod
    if [[ ! -f $src/go.mod ]]; then
        echo "go-test: $mod is required by clients/go/go.mod but $src has no Debian source" >&2
        exit 1
    fi
    modgo=$(awk '$1 == "go" {print $2; exit}' "$src/go.mod")
    {
        echo "# $mod $version"
        echo "## explicit${modgo:+; go $modgo}"
    } >>"$modules_txt"
    # Every package directory of the module, minus tests and nested modules.
    while read -r dir; do
        rel=${dir#"$src"}
        rel=${rel#/}
        pkg=$mod${rel:+/$rel}
        mkdir -p "$vendor/$pkg"
        find "$dir" -maxdepth 1 -type f \( -name '*.go' ! -name '*_test.go' -o -name '*.s' -o -name '*.h' \) \
            -exec cp {} "$vendor/$pkg/" \;
        echo "$pkg" >>"$modules_txt"
    done < <(find "$src" -type d \( -name testdata -o -name '.*' \) -prune -o -type d -print |
        while read -r d; do
            [[ $d != "$src" && -f $d/go.mod ]] && continue
            compgen -G "$d/*.go" >/dev/null && ls "$d"/*.go | grep -qv '_test\.go$' && echo "$d"
        done | sort)
    cp "$src/LICENSE" "$vendor/$mod/" 2>/dev/null || true
done < <(awk '
    /^require[ \t]*\(/ {block = 1; next}
    block && /^\)/ {block = 0; next}
    block && NF >= 2 {print $1, $2; next}
    /^require[ \t]/ && $2 != "(" {print $2, $3}
' "$moddir/go.mod")

cd "$moddir"
start=$(date +%s)
unformatted=$(gofmt -l $(find . -path ./vendor -prune -o -name '*.go' -print))
if [[ -n $unformatted ]]; then
    echo "go-test: gofmt would change: $unformatted" >&2
    exit 1
fi
go vet ./...
go test -count=1 -timeout 10m "$@" ./...
echo "go-test: ok in $(($(date +%s) - start)) s"
