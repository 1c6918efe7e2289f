#!/usr/bin/env bash
# Builds JavaScript hyperties into components of the `hyperty` world of
# wit/hyperty.wit with jco's QuickJS backend, componentize-qjs (what
# `jco componentize --backend qjs --backend-qjs-disable-async` runs; called
# directly for its `--module-root`, which lets a guest import the SDK):
#
#   guests/js/build.sh <out-dir> <file.js>...     -> <out-dir>/<name>.wasm
#
# <name> is the file's name without `.js`. The world is `hyperty` unless the
# file's first line says otherwise (`// world: idp-proxy`). A component is rebuilt only when
# it is older than its source, the SDK, the WIT or the tools' lockfile.
#
# The npm packages (package.json, pinned by package-lock.json) are installed
# with `npm ci` into $HYPERTY_JS_TOOLS (default: $CARGO_TARGET_DIR/js-tools,
# else target/js-tools of the clone), with npm's own cache beside them: never
# into the clone's sources nor into HOME. Node and npm come from Debian if
# they are missing. Once installed, building needs no network.
#
# `--sync` (jco's `--backend-qjs-disable-async`): a component that needs no
# component-model-async, which the host leaves off. `--stub-wasi`
# (`--backend-qjs-stub-wasi`): the engine's WASI imports (stdio, clocks,
# filesystem, ...) become traps inside the component, so it imports exactly
# its world and needs no grant; the SDK routes `console` to the host's log.
# No wasi:http anywhere. See guests/js/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 <out-dir> <file.js>..." >&2; exit 2; }
out="$1"; shift
tools="${HYPERTY_JS_TOOLS:-${CARGO_TARGET_DIR:-$repo/target}/js-tools}"
case "$tools" in /*) ;; *) tools="$repo/$tools" ;; esac

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node/npm missing: installing Debian's nodejs and npm" >&2
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q nodejs npm || { $sudo apt-get update -q && $sudo apt-get install -y -q nodejs npm; }
fi

# npm writes its cache and logs under npm_config_cache; nothing into HOME.
export npm_config_cache="$tools/npm-cache" npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
mkdir -p "$tools"
if ! cmp -s "$here/package-lock.json" "$tools/package-lock.json" || [ ! -x "$tools/node_modules/.bin/componentize-qjs" ]; then
    echo "installing the JavaScript componentizers into $tools" >&2
    cp "$here/package.json" "$here/package-lock.json" "$tools/"
    (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi

mkdir -p "$out"
for js in "$@"; do
    js="$(cd "$(dirname "$js")" && pwd)/$(basename "$js")"
    name="$(basename "$js" .js)"
    wasm="$out/$name.wasm"
    if [ -f "$wasm" ] && [ -z "$(find "$js" "$here/sdk" "$here/build.sh" "$repo/wit" "$tools/package-lock.json" -newer "$wasm" -print -quit)" ]; then
        continue
    fi
    echo "componentizing $js -> $wasm" >&2
    # The module root is guests/js, so `../sdk/hyperty.js` resolves.
    world="$(head -n 1 "$js" | sed -n 's|^// world: \([a-z-]*\)$|\1|p')"
    "$tools/node_modules/.bin/componentize-qjs" --wit "$repo/wit" --world "${world:-hyperty}" --sync --stub-wasi \
        --module-root "$here" --js "$js" --output "$wasm.tmp" >&2
    mv "$wasm.tmp" "$wasm"
done
