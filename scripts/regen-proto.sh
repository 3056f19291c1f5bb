#!/usr/bin/env bash
# Regenerates proto/src/generated/ from proto/proto/*.proto.
#
#   scripts/regen-proto.sh          rewrite proto/src/generated/
#   scripts/regen-proto.sh --check  fail, showing a diff, if the committed code is stale
#
# The code comes from the codex-proto-gen program (proto/gen): protox parses the schemas
# and prost-build writes the Rust, so no protoc is needed and nothing needs installing.
# Honours CARGO_TARGET_DIR.
set -euo pipefail

usage() {
    sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

check=false
case "${1:-}" in
    "") ;;
    --check) check=true ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
committed="$root/proto/src/generated"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fresh="$tmp/generated"

(
    cd "$root"
    cargo run --quiet -p codex-proto-gen -- "$fresh" >/dev/null
)

if "$check"; then
    if ! (cd "$root" && diff -ru proto/src/generated "$fresh"); then
        echo "regen-proto: proto/src/generated/ is stale; run scripts/regen-proto.sh and commit the result" >&2
        exit 1
    fi
    echo "regen-proto: proto/src/generated/ is up to date"
else
    rm -rf "$committed"
    cp -r "$fresh" "$committed"
    echo "regen-proto: wrote proto/src/generated/"
fi
