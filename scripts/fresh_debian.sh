#!/usr/bin/env bash
# Proves that kiln sets itself up from nothing: builds minimal Debian 12 roots with debootstrap
# and, inside them (chroot, as root), runs
#   readme   README.md's two commands from a clean clone of HEAD: setup + build + `kiln run`,
#            then `bash scripts/test.sh`;
#   image    the container image's build stage: `setup.sh --build-only`, then the Dockerfile's
#            own RUN lines of that stage, as written;
#   runtime  the binary that stage yields, with only the libraries it gathered, in a bare root
#            (as the image's runtime stage has it): a few training steps.
# Each step's time goes to the summary at the end (and to WORK/summary.txt).
#
#   bash scripts/fresh_debian.sh [--work DIR] [--only readme|image|runtime] [--keep]
#
# Needs root, network access to the machine's Debian mirror (read from its apt sources) and to
# the npm registry (the llama.cpp check's package), and
# about 8 GB of disk. The roots live under WORK (default /var/tmp/kiln-fresh) and are removed
# at the end unless --keep. Mounts (proc, sys, dev, a tmpfs /dev/shm) live in a private mount
# namespace and vanish with it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

work=/var/tmp/kiln-fresh
only=""
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --work) work=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "fresh_debian: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$only" in ""|readme|image|runtime) ;; *) echo "fresh_debian: --only $only is not readme, image or runtime" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "fresh_debian: needs root (debootstrap, chroot, mount)" >&2; exit 2; }
git -C "$repo" rev-parse HEAD >/dev/null 2>&1 || { echo "fresh_debian: $repo is not a git checkout" >&2; exit 2; }

summary=()
commit=$(git -C "$repo" rev-parse --short HEAD)  # what the clones below hold
step() {  # step NAME COMMAND...: runs it, records its time, stops the script if it fails
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name"
    if "$@"; then
        summary+=("$(printf '%-44s %6ds  ok' "$name" $((SECONDS - t0)))")
    else
        summary+=("$(printf '%-44s %6ds  FAILED' "$name" $((SECONDS - t0)))")
        report
        exit 1
    fi
}
report() {
    {
        echo
        echo "fresh Debian 12 check of $commit, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
        printf '%s\n' "${summary[@]}"
    } | tee "$work/summary.txt"
}

# The mirror and apt settings of this machine: what a fresh Debian 12 here starts with.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "fresh_debian: no Debian mirror in /etc/apt/sources.list*" >&2; exit 2; }

mkdir -p "$work"
base=$work/base
make_base() {
    command -v debootstrap >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
    }
    rm -rf "$base"
    debootstrap --variant=minbase bookworm "$base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log"; return 1; }
    # This machine's sources and apt settings; nothing else of the host.
    rm -f "$base/etc/apt/sources.list"
    cp /etc/apt/sources.list.d/*.sources "$base/etc/apt/sources.list.d/" 2>/dev/null || true
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$base/etc/apt/"
    cp /etc/apt/apt.conf.d/* "$base/etc/apt/apt.conf.d/" 2>/dev/null || true
    cp /etc/resolv.conf "$base/etc/resolv.conf"
    # The machine's own certificate authorities (a network that inspects TLS has one): a fresh
    # machine on this network trusts them too. ca-certificates adds them to the root's bundle
    # when setup installs it.
    if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
        mkdir -p "$base/usr/local/share/ca-certificates"
        cp -r /usr/local/share/ca-certificates/. "$base/usr/local/share/ca-certificates/"
    fi
    # What Debian's installer writes and debootstrap does not: localhost and the host name
    # resolve.
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' "$(hostname)" >"$base/etc/hosts"
}
fresh_root() {  # fresh_root NAME: a copy of the bare root
    rm -rf "${work:?}/$1"
    cp -a "$base" "$work/$1"
}
in_root() {  # in_root ROOT COMMAND: runs COMMAND (bash) in ROOT as a login shell of root
    local root=$1 cmd=$2
    unshare --mount --propagation private bash -c '
        set -e
        r=$1
        mount -t proc proc "$r/proc"
        mount -t sysfs sys "$r/sys"
        mount --bind /dev "$r/dev"
        mount -t devpts devpts "$r/dev/pts" -o newinstance,ptmxmode=0666 2>/dev/null || true
        mount -t tmpfs tmpfs "$r/dev/shm"
        mkdir -p "$r/tmp" && chmod 1777 "$r/tmp"
        exec chroot "$r" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            bash -c "$2"
    ' in_root "$root" "$cmd"
}
readme_line() {  # the command of README.md's code line that starts with $1
    grep -m1 -E "^$1" "$repo/README.md"
}

t_start=$SECONDS
[ -d "$base" ] && [ -x "$base/usr/bin/apt-get" ] && [ "$keep" = 1 ] || step "debootstrap minbase bookworm" make_base

if [ -z "$only" ] || [ "$only" = readme ]; then
    step "readme: fresh root" fresh_root readme
    step "readme: clean clone" git clone -q "$repo" "$work/readme/root/kiln"
    run_cmd=$(readme_line 'bash scripts/setup.sh')
    test_cmd=$(readme_line 'bash scripts/test.sh')
    [ -n "$run_cmd" ] && [ -n "$test_cmd" ] || { echo "fresh_debian: README.md lacks its two commands" >&2; exit 1; }
    step "readme: $run_cmd" in_root "$work/readme" "cd /root/kiln && $run_cmd"
    step "readme: $test_cmd" in_root "$work/readme" "cd /root/kiln && $test_cmd"
fi

if [ -z "$only" ] || [ "$only" != readme ]; then
    # The build stage of deploy/docker/Dockerfile: its WORKDIR, its COPYs, its RUN lines.
    dockerfile=$repo/deploy/docker/Dockerfile
    mapfile -t runs < <(awk '
        /^FROM / { stage++ }
        stage == 1 && /^RUN / { cmd = substr($0, 5); while (cmd ~ /\\$/) { sub(/\\$/, "", cmd); getline line; cmd = cmd line } print cmd }
    ' "$dockerfile")
    [ ${#runs[@]} -ge 2 ] || { echo "fresh_debian: no build-stage RUN lines in $dockerfile" >&2; exit 1; }
    step "image: fresh root" fresh_root image
    step "image: COPY . /src" git clone -q "$repo" "$work/image/src"
    for r in "${runs[@]}"; do
        step "image: RUN ${r:0:40}..." in_root "$work/image" "cd /src && $r"
    done
    # The runtime stage: the binary and the libraries it gathered, in a bare root.
    step "runtime: fresh root" fresh_root runtime
    install_runtime() {
        install -D "$work/image/out/bin/kiln" "$work/runtime/usr/local/bin/kiln"
        mkdir -p "$work/runtime/usr/local/lib/kiln"
        cp "$work/image/out/lib/"* "$work/runtime/usr/local/lib/kiln/"
        echo /usr/local/lib/kiln >"$work/runtime/etc/ld.so.conf.d/kiln.conf"
    }
    step "runtime: COPY --from=build" install_runtime
    step "runtime: kiln train (tiny, 3 steps)" in_root "$work/runtime" \
        "ldconfig && cd /tmp && kiln train --set train.steps=3 --set train.micro_batch=2 --set run.dir=/tmp/run && ls /tmp/run/checkpoints/step-00000003"
fi

summary+=("$(printf '%-44s %6ds' "total" $((SECONDS - t_start)))")
report
if [ "$keep" = 0 ]; then
    rm -rf "${work:?}/base" "$work/readme" "$work/image" "$work/runtime"
fi
