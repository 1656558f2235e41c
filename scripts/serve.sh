#!/usr/bin/env bash
# Serve an image over NBD:  scripts/serve.sh [IMAGE] [PORT]   (what `make serve` runs)
# SIZE=10G creates IMAGE (qcow2) when it does not exist.
# Installs what is needed, creates ./demo/demo.qcow2 (1 GiB) when IMAGE is empty,
# and serves it with `nbdqcow serve -t` on 127.0.0.1:PORT until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${1:-}"
PORT="${2:-10809}"
BIND="${BIND:-127.0.0.1}"
# the format of an image this script created; an image given by the user is probed
# (a probed raw image gets qemu-nbd's block-0 protection and warning)
FORMAT_ARGS=()
bash scripts/setup.sh
if [ -z "$IMAGE" ]; then
  IMAGE=demo/demo.qcow2
  if [ ! -e "$IMAGE" ]; then
    mkdir -p demo
    if ! .venv/bin/nbdqcow create -q -f qcow2 "$IMAGE" 1G 2>/dev/null; then
      qemu-img create -q -f qcow2 "$IMAGE" 1G
    fi
    echo "serve: created demo image $IMAGE (1 GiB qcow2)"
  fi
  FORMAT_ARGS=(-f qcow2)  # the demo image is always this script's qcow2
fi
if [ ! -e "$IMAGE" ]; then
  if [ -z "${SIZE:-}" ]; then
    echo "serve: no such image: $IMAGE (to create it: make serve IMAGE=$IMAGE SIZE=10G)" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$IMAGE")"
  .venv/bin/nbdqcow create -q -f qcow2 "$IMAGE" "$SIZE"
  echo "serve: created $IMAGE ($SIZE qcow2)"
  FORMAT_ARGS=(-f qcow2)
fi
URI="nbd://$BIND:$PORT"
cat <<MSG
serve: serving $IMAGE at $URI  (Ctrl-C to stop)

  nbdinfo $URI                          # what the export offers
  nbdinfo --map $URI                    # allocation map (base:allocation)
  qemu-img info -f raw $URI             # size, as qemu sees it
  qemu-io -f raw -c 'read -v 0 512' $URI
  mkdir -p /tmp/nbd && nbdfuse /tmp/nbd/disk $URI &   # the export as a file
                                        # (unmount: fusermount3 -u /tmp/nbd)
MSG
exec .venv/bin/nbdqcow serve -t -e 0 --discard=unmap -A -b "$BIND" -p "$PORT" \
  ${FORMAT_ARGS[@]+"${FORMAT_ARGS[@]}"} "$IMAGE"
