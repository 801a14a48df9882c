#!/bin/sh
# Container entry point: check the data volume, then hand over to `dicomnode`.
# Arguments are a dicomnode command line (default: serve); the configuration
# comes from $DICOMNODE_CONFIG (/etc/dicomnode/node.yaml, mount your own) and
# DICOMNODE_<SECTION>__<KEY> environment variables.
set -eu

if [ ! -w /data ]; then
    echo "dicomnode: /data is not writable by uid $(id -u); give the volume to uid $(id -u)" \
         "(e.g. chown $(id -u) DIR) or use a named volume" >&2
    exit 1
fi
mkdir -p /data/storage

exec /opt/dicomnode/bin/dicomnode "$@"
