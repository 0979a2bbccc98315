#!/usr/bin/env bash
# Regenerates requirements.lock (every dependency pinned with hashes) from pyproject.toml, using uv in a throwaway
# virtualenv. Run it after changing a dependency; commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet uv
"$tmp/venv/bin/uv" pip compile pyproject.toml --extra hub --extra pkcs11 --extra dev --generate-hashes --python-version 3.11 \
  --no-header --quiet -o requirements.lock
echo "requirements.lock updated"
