#!/usr/bin/env bash
# Format-check, vet and test the Go modules, the ordinary way: dependencies come
# from the Go module proxy and are checked against each module's go.sum.
#
#   clients/go          the Go client for Navidrome's handlers (its integration
#                       tests start a real daemon with $EMBEDD_PYTHON, default
#                       <repo>/.venv/bin/python; EMBEDD_PYTHON=skip skips them)
#   plugins/navidrome   the Navidrome plugin: vetted for wasip1/wasm, the target
#                       it ships for, and tested natively against the PDK's mocks
#
# Extra arguments go to the client's `go test` (e.g. -run TestDaemonRestart -v).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The Go tarball's usual place, for shells whose PATH lacks it.
command -v go >/dev/null || [[ ! -x /usr/local/go/bin/go ]] || PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null || { echo "go-test: no 'go' on PATH (Go 1.25 or newer)" >&2; exit 1; }
export GOWORK=off GOFLAGS=-mod=readonly
go version
start=$(date +%s)

check_format() {
    local unformatted
    unformatted=$(gofmt -l .)
    if [[ -n $unformatted ]]; then
        echo "go-test: gofmt would change, in $(pwd): $unformatted" >&2
        exit 1
    fi
}

cd "$repo/clients/go"
check_format
go vet ./...
go test -count=1 -timeout 10m "$@" ./...

cd "$repo/plugins/navidrome"
check_format
GOOS=wasip1 GOARCH=wasm go vet ./...
go vet ./...
go test -count=1 -timeout 5m ./...

echo "go-test: ok in $(($(date +%s) - start)) s"
