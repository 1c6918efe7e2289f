# hyperty: the recipes a person uses. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Run the demo bundle: ping (alice.example) and pong (bob.example).
demo: setup
    cargo build --release -p hyperty-tests -p hyperty-host
    cargo run --release -q -p hyperty-host -- pin guests/demo/bundle.toml
    cargo run --release -q -p hyperty-host -- run guests/demo/bundle.toml --exit-when-idle

# Run the chat app: alice.example and bob.example chat from two browser
# tabs through their hyperties and the app gateway (guests/chat).
chat: setup
    cargo build --release -p hyperty-tests -p hyperty-host
    cargo run --release -q -p hyperty-host -- pin guests/chat/bundle.toml
    @echo "open http://127.0.0.1:8080/#domain=alice.example&user=alice@alice.example"
    @echo " and http://127.0.0.1:8080/#domain=bob.example&user=bob@bob.example"
    cargo run --release -q -p hyperty-host -- run guests/chat/bundle.toml

# The mixed demo: alice.example's Rust ping plays with bob.example's pong
# written in JavaScript (guests/js/pong). Its own recipe, not `just demo`'s
# pong: JavaScript components are not byte-reproducible (the QuickJS
# snapshot differs from build to build), so this bundle is re-pinned to the
# components just built before it runs, while the main demo's pins hold.
js-demo: setup
    cargo build --release -p hyperty-tests -p hyperty-host
    cargo run --release -q -p hyperty-host -- pin guests/demo/mixed.toml
    cargo run --release -q -p hyperty-host -- run guests/demo/mixed.toml --exit-when-idle

# The call demo: alice.example's hyperty calls bob.example's over a WebRTC
# data channel, signalling through a synced Connection data object, with
# identity-bound fingerprints (guests/media-caller); the log tells the setup.
call: setup
    cargo build --release -p hyperty-tests -p hyperty-host
    cargo run --release -q -p hyperty-host -- pin guests/demo/call.toml
    cargo run --release -q -p hyperty-host -- run guests/demo/call.toml --exit-when-idle

# The video demo: a page served by the app gateway calls the echo hyperty
# over WebRTC with the browser's camera and shows the video it sends back
# (guests/media-echo, guests/demo/video.toml).
video: setup
    cargo build --release -p hyperty-tests -p hyperty-host
    cargo run --release -q -p hyperty-host -- pin guests/demo/video.toml
    @echo "open http://127.0.0.1:8080/#domain=video.example&user=alice@video.example"
    cargo run --release -q -p hyperty-host -- run guests/demo/video.toml

# Build one JavaScript hyperty into a component of the `hyperty` world:
# `just js-guest guests/js/pong/pong.js` writes guests/target/js/pong.wasm.
# Installs the pinned npm packages (jco's QuickJS backend) outside the
# clone first if missing. See guests/js/README.md.
js-guest file:
    guests/js/build.sh guests/target/js {{file}}

# Run every test (builds the guest components first), with HOME pointed at
# an empty directory that must still be empty afterwards: no test may write
# into the home of whoever runs them (~/.local/share/hyperty, ~/.cache/hyperty).
test: setup nats chromium turnserver
    #!/usr/bin/env bash
    set -euo pipefail
    export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
    home="$(mktemp -d)"
    trap 'rm -rf "$home"' EXIT
    HOME="$home" XDG_DATA_HOME= XDG_CACHE_HOME= HYPERTY_DATA_DIR= HYPERTY_CACHE_DIR= cargo test --workspace --no-fail-fast
    # A subset again, on the Pulley interpreter (see tests/src/engines.rs).
    # Not the syncher's 3 s interleaving stress: its load is sized for
    # native code, and an interpreter ~10x slower fills the reporters'
    # inboxes, which answer with back-pressure (inbox full) as they must.
    HOME="$home" XDG_DATA_HOME= XDG_CACHE_HOME= HYPERTY_DATA_DIR= HYPERTY_CACHE_DIR= HYPERTY_TEST_ENGINE=pulley \
        cargo test --workspace --no-fail-fast --test backbone --test hostile --test policies --test syncher --test platforms \
        -- --skip interleaved_writes_reads_and_subscriptions_all_return
    if [ -n "$(ls -A "$home")" ]; then
        echo "the tests wrote into HOME:" >&2
        find "$home" >&2
        exit 1
    fi

# Benchmarks (release build): bus throughput and latency, instantiation;
# runtime to runtime through NATS beside NATS's own client-to-client figures;
# syncher subscribe latency and fan-out to 1, 100 and 10,000 observers;
# JavaScript hyperties beside Rust ones (msg/s, instantiation, memory);
# scale: deploying 1,000 hyperties, 10,000 in one runtime (RSS), checking them;
# Pulley beside Cranelift (msg/s, a call, a CPU-bound loop, instantiation).
bench: setup nats
    cargo bench -p hyperty-tests --bench bus
    cargo bench -p hyperty-tests --bench nats
    cargo bench -p hyperty-tests --bench syncher
    cargo bench -p hyperty-tests --bench gateway
    cargo bench -p hyperty-tests --bench js
    cargo bench -p hyperty-tests --bench media
    cargo bench -p hyperty-tests --bench scale
    cargo bench -p hyperty-tests --bench update
    cargo bench -p hyperty-tests --bench pulley

# The soak (#19): 10,000,000 cross-domain messages through the bus and
# 1,000,000 between two runtimes through NATS, Cedar policies and identity
# on, release build. Checks none lost, duplicated or reordered, no request
# left pending, resident memory within 24 MiB of the start. `just test` runs
# the bounded version (1,000,000 and 100,000, debug build).
soak: setup nats
    HYPERTY_SOAK_MESSAGES=10000000 HYPERTY_SOAK_NATS_MESSAGES=1000000 cargo test --release -p hyperty-tests --test soak -- --nocapture --test-threads 1

# Fuzz every target (tests/fuzz/fuzz_targets) for `seconds` each: libFuzzer
# through cargo-fuzz (installed when missing), on the stable toolchain
# without a sanitizer (`-s none`: ASan needs nightly; the targets are safe
# Rust, so what we look for is panics, hangs and unbounded growth, which
# libFuzzer reports without one). New inputs go to a corpus outside the
# clone, seeded from tests/fuzz/corpus; a crash is written to
# tests/fuzz/artifacts/<target>/ and stops the run: minimise it
# (`cargo fuzz tmin`), commit it under tests/fuzz/regressions/<target>/ with
# the fix (`cargo test --test fuzz` replays it from then on). CI's fuzzing
# is that test: the committed corpus, then 5 s of mutations per target on
# the debug build (the instrumented build of wasmtime and cranelift takes
# longer than CI's budget; HYPERTY_FUZZ_SECONDS sets the time).
fuzz seconds="600": setup
    #!/usr/bin/env bash
    set -euo pipefail
    export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    # Instrumented builds, grown corpora and logs: beside the target dir.
    cache="${HYPERTY_FUZZ_DIR:-$(dirname "${CARGO_TARGET_DIR:-$HOME/.cache/hyperty-build/target}")/fuzz}"
    fuzz="cargo fuzz run --fuzz-dir tests/fuzz -s none -O --target-dir $cache"
    for t in $(cargo fuzz list --fuzz-dir tests/fuzz); do
        mkdir -p "$cache/corpus/$t" "tests/fuzz/artifacts/$t"
        echo "== fuzz $t for {{seconds}} s"
        log="$cache/$t.log"
        if ! $fuzz "$t" "$cache/corpus/$t" "tests/fuzz/corpus/$t" -- -max_total_time={{seconds}} \
            -timeout=20 -rss_limit_mb=3072 -artifact_prefix="tests/fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
            tail -60 "$log" >&2
            echo "fuzz target $t failed; the input is in tests/fuzz/artifacts/$t/, the log in $log" >&2
            exit 1
        fi
        grep -E '^Done [0-9]+ runs|stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+.*(INITED|DONE)' "$log" | sed 's/^/   /'
    done

# Build the guest components into guests/target/wasm32-wasip2/release.
guests: setup
    cargo build -p hyperty-tests

# Re-pin the demo bundle after changing a guest.
pin: guests
    cargo run -q -p hyperty-host -- pin guests/demo/bundle.toml

# Check a bundle: manifest, files, pins, world fit.
check bundle: setup
    cargo run -q -p hyperty-host -- check {{bundle}}

# Install Debian's nats-server, the messaging node the protostub tests and
# benchmarks start on loopback (the test harness also installs it if missing).
nats:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v nats-server >/dev/null && exit 0
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q nats-server || { $sudo apt-get update -q && $sudo apt-get install -y -q nats-server; }

# Install Debian's chromium, the browser the browser tests run headless
# (the test harness also installs it if missing).
chromium:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v chromium >/dev/null && exit 0
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium || { $sudo apt-get update -q && $sudo apt-get install -y -q chromium; }

# Install Debian's coturn, whose `turnserver` the media tests run on
# loopback as a STUN server, and as a TURN server (long-term credentials,
# realm hyperty.test, loopback peers allowed: see tests/src/media.rs).
turnserver:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v turnserver >/dev/null && exit 0
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q coturn || { $sudo apt-get update -q && $sudo apt-get install -y -q coturn; }

# Install what the recipes need: the wasm32-wasip2 standard library.
setup:
    @rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# Install Debian packages when the command they provide is missing:
# `just apt-need CMD:PACKAGE,PACKAGE...` (used by the cross recipes).
[private]
apt-need +needs:
    #!/usr/bin/env bash
    set -euo pipefail
    packages=()
    for need in {{needs}}; do
        list="${need#*:}"
        command -v "${need%%:*}" >/dev/null || packages+=(${list//,/ })
    done
    [ ${#packages[@]} -eq 0 ] && exit 0
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q --no-install-recommends "${packages[@]}" \
        || { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends "${packages[@]}"; }

# aarch64 Linux (Raspberry Pi, Android-class boards): build the `hyperty`
# binary with Debian's cross compiler (installed when missing; wasmtime,
# cedar and aws-lc build C parts with it), then run the demo bundle under
# qemu-aarch64 user-mode emulation on both engines; fails unless the log
# shows every round of the ping-pong with its asserted identity. With 64
# instances at most: each reserves 4 GiB of address space, and many aarch64
# kernels (Raspberry Pi's) give a process 512 GiB (39-bit VA), not 128 TiB.
cross-aarch64: setup guests
    #!/usr/bin/env bash
    set -euo pipefail
    {{just_executable()}} apt-need aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu,libc6-dev-arm64-cross qemu-aarch64:qemu-user
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
    cargo build -p hyperty-host --bin hyperty --target aarch64-unknown-linux-gnu
    target="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
    work="$(mktemp -d)"
    # Emulated (and a debug build), the host runs 10-20x slower than on the
    # machine: alice.example's 500 ms call deadline, which ping's init spends
    # partly in the IdP proxy signing its first request's assertion, is not
    # the demo's point here. A copy of the bundle with 5 s, beside the
    # components (guests/target, ignored by git) so its paths still resolve.
    bundle=guests/target/demo-qemu/bundle.toml
    mkdir -p "$(dirname "$bundle")"
    sed -e 's/call-timeout-ms = 500/call-timeout-ms = 5000/' -e 's|"\.\./target/|"../|' guests/demo/bundle.toml > "$bundle"
    trap 'rm -rf "$work" "$(dirname "$bundle")"' EXIT
    for engine in cranelift pulley; do
        started=$(date +%s%N)
        qemu-aarch64 -L /usr/aarch64-linux-gnu "$target/aarch64-unknown-linux-gnu/debug/hyperty" \
            --data-dir "$work/$engine/data" --cache-dir "$work/$engine/cache" \
            run "$bundle" --engine "$engine" --max-instances 64 --exit-when-idle 2>&1 | tee "$work/$engine.log"
        grep -q "($engine engine): deploying bundle" "$work/$engine.log"
        for round in 1 2 3; do
            grep -q "got \"ping $round\" from alice@idp.example (asserted by idp.example) at hyperty://alice.example/" "$work/$engine.log"
            grep -q "answered \"pong $round\" (round $round of 3)" "$work/$engine.log"
        done
        grep -q "game over: every ping got its pong" "$work/$engine.log"
        echo "aarch64 under qemu, $engine: the demo played every round in $(( ($(date +%s%N) - started) / 1000000 )) ms"
    done

# x86_64 Windows: `cargo check` of the host for x86_64-pc-windows-gnu with
# Debian's MinGW-w64 (installed when missing; the C parts of wasmtime,
# cedar and aws-lc are compiled by it).
check-windows:
    #!/usr/bin/env bash
    set -euo pipefail
    {{just_executable()}} apt-need x86_64-w64-mingw32-gcc:gcc-mingw-w64-x86-64
    rustup target list --installed | grep -qx x86_64-pc-windows-gnu || rustup target add x86_64-pc-windows-gnu
    export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
    export CC_x86_64_pc_windows_gnu=x86_64-w64-mingw32-gcc AR_x86_64_pc_windows_gnu=x86_64-w64-mingw32-ar
    cargo check -p hyperty-host --target x86_64-pc-windows-gnu

# aarch64 iOS (Pulley: iOS forbids JIT): `cargo check` of the host as far as
# it goes here; without Apple's SDK the C parts cannot be compiled
# (ARCHITECTURE.md, "Platforms", names which). Lists every crate that fails.
check-ios:
    #!/usr/bin/env bash
    set -euo pipefail
    rustup target list --installed | grep -qx aarch64-apple-ios || rustup target add aarch64-apple-ios
    cargo check --keep-going -p hyperty-host --target aarch64-apple-ios
