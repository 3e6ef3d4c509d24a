#!/usr/bin/env bash
# Prepare a freshly bootstrapped tree for read-only, offline use in rooms.
#
#   rootfs/customize.sh TREE
#
# Runs as root of the tree's namespace with /proc and /dev available inside TREE (mmdebstrap's
# customize hook, or build.sh --customize-only). Idempotent: safe to run again on a built tree.
set -euo pipefail
T=${1:?usage: customize.sh TREE}
T=${T%/}
[[ -d $T/usr && $T != / ]] || { echo "customize.sh: $T is not a tree" >&2; exit 1; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Everything below runs toolchains inside the tree with a clean environment, the same one a
# room gives (HOME=/root, writable /tmp), so what gets cached here is what a room will look up.
in_tree() {
    chroot "$T" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TMPDIR=/tmp "$@"
}

# --- identity and layout --------------------------------------------------------------------
# The room's hostname is "sandbox". The JVM (Scala's runner, Kotlin's compiler) calls
# InetAddress.getLocalHost() and dies with UnknownHostException when the hostname does not
# resolve; with no network and no DNS, /etc/hosts is the only place it can.
echo sandbox >"$T/etc/hostname"
cat >"$T/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	sandbox
::1	localhost ip6-localhost ip6-loopback
EOF
# No DNS in a room: an empty resolv.conf makes lookups fail fast instead of timing out.
rm -f "$T/etc/resolv.conf"
: >"$T/etc/resolv.conf"

# Mount points the jail covers with its own writable layers; they must exist in a read-only tree.
install -d -m 0755 "$T/workspace"
install -d -m 1777 "$T/tmp"
install -d -m 0700 "$T/root"
install -d -m 0755 "$T/home"
install -d -m 0755 "$T/usr/lib/sandboxd"

# Nothing in a room may gain privileges through a setuid binary (the jail also sets
# no_new_privs and mounts nosuid; this is the third fence).
find "$T" -xdev -type f -perm /6000 -exec chmod ug-s {} +

# --- Go: a prebuilt standard library and a cache program that reads it -----------------------
# Go >= 1.20 ships no compiled std: an empty GOCACHE costs ~8 s per room (25 s of CPU for all of
# std). We build std once into a read-only cache and give rooms go-cacheprog (GOCACHEPROG), which
# answers from $GOCACHE (writable, the room's tmpfs) first and then from the prebuilt cache.
# The cache key covers GOROOT, GOOS/GOARCH, CGO_ENABLED, flags and the sources, so the env here
# must match the one languages.toml gives a room (GOFLAGS empty, no -trimpath); both cgo settings
# are prebuilt so a user who turns cgo on is fast too.
GOCACHE_RO=/usr/lib/sandboxd/go-cache
GOENV=(GOTOOLCHAIN=local GOPROXY=off GOPATH=/tmp/go GOFLAGS=)
rm -rf "${T:?}$GOCACHE_RO" "${T:?}/tmp/go-cacheprog"
install -d -m 0755 "$T/usr/lib/sandboxd/bin" "$T/tmp/go-cacheprog"
cp "$HERE/go-cacheprog/main.go" "$T/tmp/go-cacheprog/main.go"
in_tree "${GOENV[@]}" GOCACHE=/tmp/go-cacheprog/cache CGO_ENABLED=0 GO111MODULE=off \
    sh -c 'cd /tmp/go-cacheprog && go build -trimpath -ldflags=-s -o /usr/lib/sandboxd/bin/go-cacheprog main.go'
rm -rf "${T:?}/tmp/go-cacheprog"
for cgo in 0 1; do
    in_tree "${GOENV[@]}" GOCACHE=$GOCACHE_RO CGO_ENABLED=$cgo go build std
done
rm -f "$T$GOCACHE_RO/trim.txt"
chmod -R a+rX "$T$GOCACHE_RO"

# --- JVM: class-data sharing archives ---------------------------------------------------------
# The JDK's own archive (lib/server/classes.jsa) makes `java` start in ~60 ms; Debian ships it,
# but make sure. The compilers load thousands of classes of their own, so each gets a dynamic
# AppCDS archive recorded from one compile of a hello world (javac 0.67 -> 0.36 s, kotlinc
# 2.4 -> 1.0 s, scalac 1.9 -> 0.9 s). An archive is used only when the JVM flags (GC) and the
# classpath match those below, which languages.toml repeats; on a mismatch the JVM silently
# runs without it (-Xshare:auto), so a stale archive costs speed, never correctness.
JAVA_HOME_T=$(in_tree sh -c 'dirname "$(dirname "$(readlink -f /usr/bin/java)")"')
if [[ ! -s $T$JAVA_HOME_T/lib/server/classes.jsa ]]; then
    in_tree java -XX:-UsePerfData -Xshare:dump >/dev/null
fi
CDS=/usr/lib/sandboxd/cds
JVM_FLAGS=(-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData)
KOTLIN_CP=/usr/share/java/kotlin-compiler.jar:/usr/share/java/libtrove-intellij.jar
SCALA_CP=/usr/share/java/scala-compiler.jar:/usr/share/java/scala-library.jar:/usr/share/java/scala-reflect.jar
rm -rf "${T:?}$CDS" "${T:?}/tmp/cds"
install -d -m 0755 "$T$CDS" "$T/tmp/cds/j" "$T/tmp/cds/k" "$T/tmp/cds/s"
cp "$HERE/cds/Main.java" "$HERE/cds/main.kt" "$HERE/cds/main.scala" "$T/tmp/cds/"
quiet_cds() { grep -v '\[cds\]' || true; }
in_tree javac "${JVM_FLAGS[@]/#/-J}" -J-XX:ArchiveClassesAtExit=$CDS/javac.jsa \
    -d /tmp/cds/j /tmp/cds/Main.java 2>&1 | quiet_cds
in_tree java "${JVM_FLAGS[@]}" -XX:ArchiveClassesAtExit=$CDS/kotlinc.jsa -cp "$KOTLIN_CP" \
    org.jetbrains.kotlin.cli.jvm.K2JVMCompiler -kotlin-home /usr/share/kotlin/kotlinc -no-reflect \
    -d /tmp/cds/k /tmp/cds/main.kt 2>&1 | quiet_cds
in_tree java "${JVM_FLAGS[@]}" -XX:ArchiveClassesAtExit=$CDS/scalac.jsa -cp "$SCALA_CP" \
    -Dscala.usejavacp=true scala.tools.nsc.Main -d /tmp/cds/s /tmp/cds/main.scala 2>&1 | quiet_cds
for jsa in javac kotlinc scalac; do
    [[ -s $T$CDS/$jsa.jsa ]] || { echo "customize.sh: no CDS archive for $jsa" >&2; exit 1; }
done
chmod 0644 "$T$CDS"/*.jsa
rm -rf "${T:?}/tmp/cds"

# --- manifest ------------------------------------------------------------------------------
"$HERE/manifest.sh" "$T"

# --- leave nothing behind in the mount points the room covers, nor the downloaded debs ------
# (mmdebstrap 1.3 leaves /var/cache/apt/archives full in root mode: 1.1 GB)
find "${T:?}/var/cache/apt" -type f \( -name '*.deb' -o -name '*.bin' \) -delete
# /tmp is mmdebstrap's too (its apt config lives there until its own cleanup): remove only ours.
rm -rf "${T:?}/tmp/go" "${T:?}/tmp/hsperfdata_root"
find "${T:?}/root" "${T:?}/workspace" -mindepth 1 -delete
