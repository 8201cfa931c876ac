#!/usr/bin/env bash
# Helm chart checks (docs/testing.md#helm-and-schemas): strict lint, and rendered templates validated offline with
# kubernetes-validate --strict for the oldest and newest supported Kubernetes versions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/fetch_helm.sh >/dev/null
HELM=.tools/bin/helm
CHART=charts/longserve
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
$HELM lint --strict "$CHART"
$HELM lint --strict "$CHART" --set watchNamespace=models --set monitoring.serviceMonitor.enabled=true \
  --set monitoring.prometheusRule.enabled=true
for kube in 1.30.0 1.34.0; do
  $HELM template ci "$CHART" --namespace longserve --include-crds --kube-version "$kube" > "$out/default.yaml"
  $HELM template ci "$CHART" --namespace longserve --kube-version "$kube" --set watchNamespace=models \
    --set tests.model=qwen > "$out/namespaced.yaml"
  .venv/bin/kubernetes-validate --strict -k "$kube" --quiet "$out/default.yaml" "$out/namespaced.yaml"
done
echo "helm chart OK"
