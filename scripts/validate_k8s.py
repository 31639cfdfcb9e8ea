"""Validates slimnn's Kubernetes manifests without a cluster.

    python scripts/validate_k8s.py [DEPLOY_DIR] [--kubernetes-version 1.33.0]

Built-in kinds (Deployment, Service, ...) are checked strictly (unknown fields rejected) against
the Kubernetes OpenAPI schemas that the kubernetes-validate package ships. KServe's
InferenceService is a custom resource those schemas lack: it is checked against
deploy/kserve/inferenceservice.schema.json, whose container/volume/metadata parts refer to the
same Kubernetes schemas. Then slimnn's own rules: health probes on the v2 endpoints and a
`serve` command line. Prints one line per resource; exits non-zero on the first bad file.
"""
import argparse
import glob
import json
import os
import sys

import jsonschema
import kubernetes_validate
import referencing
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("deploy_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "deploy"))
ap.add_argument("--kubernetes-version", default="1.33.0")
args = ap.parse_args()

schema_root = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
strict_dir = os.path.join(schema_root, "v%s-local-strict" % args.kubernetes_version)
if not os.path.isdir(strict_dir):
    sys.exit("validate_k8s: kubernetes-validate has no schemas for %s" % args.kubernetes_version)
with open(os.path.join(strict_dir, "_definitions.json")) as f:
    k8s_defs = json.load(f)
registry = referencing.Registry().with_resource(
    k8s_defs["$id"], referencing.Resource.from_contents(k8s_defs)
)
with open(os.path.join(args.deploy_dir, "kserve", "inferenceservice.schema.json")) as f:
    isvc_schema = json.load(f)
isvc_validator = jsonschema.Draft202012Validator(isvc_schema, registry=registry)


def containers_of(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return doc["spec"]["template"]["spec"]["containers"]
    if kind == "InferenceService":
        return doc["spec"]["predictor"]["containers"]
    return []


def slimnn_rules(doc, where):
    for c in containers_of(doc):
        if "serve" not in c.get("args", []):
            raise ValueError("%s: container '%s' does not run `slimnn serve`" % (where, c.get("name")))
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            got = c.get(probe, {}).get("httpGet", {}).get("path")
            if got != path:
                raise ValueError("%s: %s should GET %s, not %s" % (where, probe, path, got))


files = sorted(glob.glob(os.path.join(args.deploy_dir, "**", "*.yaml"), recursive=True))
if not files:
    sys.exit("validate_k8s: no manifests under %s" % args.deploy_dir)
failed = False
for path in files:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        where = "%s: %s/%s" % (path, doc.get("kind"), doc.get("metadata", {}).get("name"))
        try:
            if doc.get("kind") == "InferenceService":
                errors = sorted(isvc_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
                if errors:
                    e = errors[0]
                    raise ValueError("%s at %s" % (e.message, "/".join(map(str, e.absolute_path))))
            else:
                kubernetes_validate.validate(doc, args.kubernetes_version, strict=True)
            slimnn_rules(doc, where)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError, ValueError) as e:
            print("FAIL %s: %s" % (where, getattr(e, "message", e)))
            failed = True
            continue
        print("ok   %s" % where)
sys.exit(1 if failed else 0)
