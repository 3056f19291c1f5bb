#!/usr/bin/env bash
# Regenerates codex-sys/src/bindings.rs from codex-sys/wrapper.h and vendor/abi/libcodex.h.
#
#   scripts/regen-bindings.sh          rewrite codex-sys/src/bindings.rs
#   scripts/regen-bindings.sh --check  fail, showing a diff, if the committed file is stale
#
# The bindings come from codex-sys's own build script (its `bindgen` feature), the same code
# that generates them at build time, so the committed file and a build-time generation
# cannot diverge. Needs libclang: installed with apt-get when missing and running as root
# (or with passwordless sudo). Honours CARGO_TARGET_DIR.
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
committed="$root/codex-sys/src/bindings.rs"
apt_cmd="apt-get update && apt-get install -y libclang-dev"

# Whether libclang is where clang-sys (bindgen's loader) looks for it.
have_libclang() {
    local dir
    for dir in ${LIBCLANG_PATH:-} /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
        /usr/lib /usr/local/lib; do
        if compgen -G "$dir/libclang.so*" >/dev/null || compgen -G "$dir/libclang-[0-9]*.so*" >/dev/null; then
            return 0
        fi
    done
    return 1
}

if ! have_libclang; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "regen-bindings: libclang not found, installing libclang-dev" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
        echo "regen-bindings: libclang not found, installing libclang-dev with sudo" >&2
        sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
    else
        echo "regen-bindings: libclang not found. Install it, then run this script again:" >&2
        echo "    sudo sh -c '$apt_cmd'" >&2
        echo "or set LIBCLANG_PATH to the directory holding libclang.so." >&2
        exit 1
    fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fresh="$tmp/bindings.rs"

# A fresh path each run makes cargo rerun the build script. `cargo check` links nothing, and
# with CODEX_SYS_WRITE_BINDINGS set the build script only generates (no library needed).
# The committed file is made from the in-tree header, whatever CODEX_INCLUDE_DIR says.
(
    cd "$root"
    env -u CODEX_INCLUDE_DIR CODEX_SYS_WRITE_BINDINGS="$fresh" \
        cargo check --quiet -p codex-sys --no-default-features --features bindgen
)

if "$check"; then
    if ! diff -u --label "committed codex-sys/src/bindings.rs" --label "freshly generated" \
        "$committed" "$fresh"; then
        echo "regen-bindings: codex-sys/src/bindings.rs is stale; run scripts/regen-bindings.sh and commit the result" >&2
        exit 1
    fi
    echo "regen-bindings: codex-sys/src/bindings.rs is up to date"
else
    cp "$fresh" "$committed"
    echo "regen-bindings: wrote codex-sys/src/bindings.rs"
fi
