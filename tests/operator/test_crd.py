"""The CRD is generated from code: manifest freshness, schema defaults == parser defaults, example
resources valid against its openAPIV3Schema (jsonschema), invalid examples rejected."""
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from longserve.operator import crd
from longserve.operator.render import size
from longserve.operator.types import DEFAULTS, SpecError, parse

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "manifests" / "crd" / "longcontextmodels.longserve.io.yaml"
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
SCHEMA = crd.openapi_schema()


def test_crd_manifest_is_generated_from_code():
    text = crd.crd_yaml()
    if os.environ.get("LONGSERVE_REGEN_GOLDENS") == "1":
        CRD_FILE.write_text(text)
    assert CRD_FILE.read_text() == text, "stale CRD manifest: run `make goldens`"
    assert yaml.safe_load(text) == crd.custom_resource_definition()


def test_crd_identity_subresources_and_columns():
    spec = crd.custom_resource_definition()["spec"]
    assert spec["group"] == "longserve.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["lcm"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Runtime", "TP", "Pods/Replica", "GPUs/Pod", "Chunk", "MaxLen", "Replicas", "Phase",
                       "Age", "Endpoint"]
    rules = [r["rule"] for r in SCHEMA["properties"]["spec"]["x-kubernetes-validations"]]
    assert any("oldSelf" in r for r in rules) and len(rules) == 8


def test_schema_defaults_are_the_parser_defaults():
    spec = SCHEMA["properties"]["spec"]["properties"]

    def default(*path):
        node = spec
        for key in path[:-1]:
            node = node[key]["properties"]
        return node[path[-1]]["default"]
    pairs = {("model", "revision"): "revision", ("runtime", "name"): "runtime",
             ("context", "maxNumSeqs"): "maxNumSeqs", ("context", "maxOutputTokens"): "maxOutputTokens",
             ("sizing", "mode"): "mode", ("sizing", "objective"): "objective",
             ("sizing", "gpuMemoryUtilization"): "gpuMemoryUtilization",
             ("sizing", "safetyMarginPercent"): "safetyMarginPercent",
             ("accelerator", "gpusPerNode"): "gpusPerNode", ("accelerator", "nodes"): "nodes",
             ("accelerator", "resourceName"): "resourceName",
             ("cache", "enabled"): "cacheEnabled", ("replicas",): "replicas", ("serving", "httpPort"): "httpPort",
             ("serving", "grpcPort"): "grpcPort",
             ("cache", "download", "backoffLimit"): "downloadBackoffLimit"}
    for path, key in pairs.items():
        assert default(*path) == DEFAULTS[key], path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate_against_the_crd_schema(path):
    body = yaml.safe_load(path.read_text())
    jsonschema.validate(body, SCHEMA)
    assert parse(body).name == body["metadata"]["name"]


@pytest.mark.parametrize("name,fragment", [("missing-model", "'model' is a required property"),
                                           ("negative-replicas", "-1 is less than the minimum of 0")])
def test_invalid_examples_are_rejected_by_the_schema(name, fragment):
    body = yaml.safe_load((ROOT / "manifests/examples/invalid" / f"{name}.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(body, SCHEMA)
    assert fragment in str(info.value)


def test_tp8_for_7b_passes_the_schema_and_the_operator_rejects_it():
    body = yaml.safe_load((ROOT / "manifests/examples/invalid/tp8-for-7b.yaml").read_text())
    jsonschema.validate(body, SCHEMA)
    with pytest.raises(SpecError) as info:
        size(parse(body))
    assert info.value.reason == "InvalidTP" and "valid: 1, 2, 4" in info.value.message


@pytest.mark.parametrize("patch,fragment", [
    ({"runtime": {"name": "tensorrt"}}, "is not one of"),
    ({"sizing": {"gpuMemoryUtilization": 0.99}}, "maximum"),
    ({"sizing": {"safetyMarginPercent": 60}}, "maximum"),
    ({"context": {"maxNumSeqs": 0}}, "minimum"),
    ({"model": {"uri": "s3://bucket/model"}}, "does not match"),
])
def test_schema_bounds(patch, fragment):
    body = yaml.safe_load(EXAMPLES[0].read_text())
    for key, value in patch.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(body, SCHEMA)
    assert fragment in str(info.value)
