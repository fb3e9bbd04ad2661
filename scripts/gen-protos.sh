#!/usr/bin/env bash
# Regenerate the Python code for protos/ptmig/v1/*.proto.
#
#   scripts/gen-protos.sh            # writes next to the .proto files (the committed copy)
#   scripts/gen-protos.sh OUTDIR     # writes OUTDIR/ptmig/v1/... (the staleness test uses this)
#
# The generator is pinned to grpcio-tools 1.51.3 in its own venv: newer generators emit
# code that calls google.protobuf.runtime_version, which Debian 12's protobuf 3.21
# (python version 4.21.12) lacks (shared/lab-notes/protobuf-compat.md).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$here/protos}
venv=${PTMIG_PROTOGEN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ptmig/protogen-venv}
tools_version=1.51.3

if ! "$venv/bin/python" -c "import grpc_tools, importlib.metadata as m; \
    assert m.version('grpcio-tools') == '$tools_version'" 2>/dev/null; then
  echo "gen-protos: creating $venv with grpcio-tools==$tools_version" >&2
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio-tools==$tools_version"
fi

mkdir -p "$out"
cd "$here/protos"
"$venv/bin/python" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  ptmig/v1/*.proto
