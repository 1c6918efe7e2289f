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
    HOME="$home" XDG_DATA_HOME= XDG_CACHE_HOME= HYPERTY_DATA_DIR= HYPERTY_CACHE_DIR= cargo test --workspace
    if [ -n "$(ls -A "$home")" ]; then
        echo "the tests wrote into HOME:" >&2
        find "$home" >&2
        exit 1
    fi

# Benchmarks (release build): bus throughput and latency, instantiation;
# runtime to runtime through NATS beside NATS's own client-to-client figures;
# syncher subscribe latency and fan-out to 1, 100 and 10,000 observers;
# JavaScript hyperties beside Rust ones (msg/s, instantiation, memory);
# scale: deploying 1,000 hyperties, 10,000 in one runtime (RSS), checking them.
bench: setup nats
    cargo bench -p hyperty-tests --bench bus
    cargo bench -p hyperty-tests --bench nats
    cargo bench -p hyperty-tests --bench syncher
    cargo bench -p hyperty-tests --bench gateway
    cargo bench -p hyperty-tests --bench js
    cargo bench -p hyperty-tests --bench media
    cargo bench -p hyperty-tests --bench scale
    cargo bench -p hyperty-tests --bench update

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

# Install Debian's coturn, whose `turnserver` the media tests run as a STUN
# server on loopback.
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
