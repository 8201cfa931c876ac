# Shared preamble of the GPU scripts (sourced, not run): repository root, the interpreter, a real (not interpreted)
# Triton, offline model hubs, OUT created, and a clear error when longserve is not installed.
# Expects OUT to be set by the caller.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python}"
unset TRITON_INTERPRET
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import importlib.util, sys
if importlib.util.find_spec("longserve") is None:
    sys.exit("longserve is not installed: pip install --no-deps dist/longserve-*.whl (or -e .) first")
PYEOF
