#!/usr/bin/env bash
# Install everything the tests need, then lint and run the whole test suite.
# The README's test command; CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/install-system-deps.sh          # QEMU, static busybox, gdb for the real-dump tests
python3 -m pip install --quiet --disable-pip-version-check -e '.[dev,dask]'
# Nova's own JSON schema checks the OpenStack export (tests/test_export.py); its dependencies
# are OpenStack's server, which the test does not need.
python3 -m pip install --quiet --disable-pip-version-check --no-deps 'nova>=34'
python3 -m ruff check ksm_analyze tests benchmarks
python3 -m mypy
# The layer order ([tool.importlinter], docs/architecture.md): the lint-imports of python3.
"$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/lint-imports"  # reads pyproject.toml here
python3 -m pytest "$@"
