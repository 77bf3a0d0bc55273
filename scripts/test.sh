#!/usr/bin/env bash
# Runs every check and test of tidesync on a fresh machine: installs what is missing (the
# Cortex-M target for the no_std build, a PostgreSQL server for the cloud's store, Chromium for the dashboard test), then fmt, clippy with warnings denied, the no_std build
# of core, the dependency rule of core, and every test of the workspace. Exits non-zero on the
# first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_INCREMENTAL=0
export RUSTFLAGS="-D warnings"
export CARGO_TERM_COLOR=never
step() { printf '\n=== %s\n' "$*"; }

step "toolchain"
cargo --version
if ! rustup target list --installed 2>/dev/null | grep -qx thumbv7em-none-eabihf; then
    rustup target add thumbv7em-none-eabihf
fi
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi

step "format"
cargo fmt --all -- --check

step "clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "fuzz crates compile on stable (outside the workspace, so clippy and the tests miss them)"
cargo check --locked --manifest-path core/fuzz/Cargo.toml --bins --examples
cargo check --locked --manifest-path cloud/fuzz/Cargo.toml --bins --examples

step "core builds as no_std for thumbv7em-none-eabihf"
cargo build --locked -p tidesync-core --no-default-features --target thumbv7em-none-eabihf

step "sample firmware for thumbv7em-none-eabihf: build and footprint"
cargo rustc --locked -p tidesync-firmware --example footprint --features mcu --release \
    --target thumbv7em-none-eabihf -- -C link-arg=-T"$PWD/firmware/examples/nrf52840.x"
footprint_elf="${CARGO_TARGET_DIR:-target}/thumbv7em-none-eabihf/release/examples/footprint"
if command -v size >/dev/null 2>&1; then
    size -A "$footprint_elf" | grep -E '^\.(vector_table|text|rodata|data|bss) ' || true
fi

step "core depends on no IO crates without the net feature"
if cargo tree --locked -p tidesync-core -e normal --prefix none | grep -E '^(tokio|rusqlite|quinn|quinn-proto|rustls) '; then
    echo "tidesync-core pulls in an IO crate (see above)" >&2
    exit 1
fi

step "PostgreSQL for the cloud store tests (installed from Debian's packages when missing)"
eval "$(bash cloud/scripts/postgres.sh)"
echo "TIDESYNC_TEST_POSTGRES_URL=$TIDESYNC_TEST_POSTGRES_URL"

step "Chromium and ChromeDriver for the dashboard test (Debian's packages, installed when missing)"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium chromium-driver
fi
chromium --version
export TIDESYNC_TEST_CHROMIUM=1

step "tests"
cargo test --workspace --locked --no-fail-fast
