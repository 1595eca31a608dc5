#!/usr/bin/env bash
# Creates (or completes) the project's virtual environment: CPU torch 2.13.0, varlib in editable mode with
# its dev extras, and, only where a plain `import torchvision` fails, the torchvision schema import hook.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" > "$constraints"

echo "[setup] installing $TORCH_SPEC"
$PIP install --quiet --disable-pip-version-check "$TORCH_SPEC" 2> >(grep -v "is ignored: it is neither" >&2)
echo "[setup] installing varlib (editable) with dev extras"
$PIP install --quiet --disable-pip-version-check -c "$constraints" -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)

if "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "[setup] torchvision imports as is; no shim needed"
else
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "[setup] 'import torchvision' fails: its compiled ops are a CUDA build that cannot load on this CPU torch."
    echo "[setup] installing an import hook into $site that defines the missing op schemas"
    echo "[setup]   torchvision::nms and torchvision::qnms right before torchvision is first imported"
    cp scripts/torchvision_schema_shim.py "$site/varlib_torchvision_schema_shim.py"
    echo "import varlib_torchvision_schema_shim; varlib_torchvision_schema_shim.install()" \
        > "$site/varlib_torchvision_schema_shim.pth"
    "$VENV/bin/python" -c "import torchvision, lpips, torchmetrics, lightning" \
        || { echo "[setup] torchvision still fails to import" >&2; exit 1; }
    echo "[setup] torchvision now imports"
fi
touch "$VENV/.varlib-installed"
