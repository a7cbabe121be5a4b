#!/usr/bin/env python3
"""Checks the Starling chart offline with Helm's own engine and the Kubernetes schemas.

    check.py render [--values JSON] [--release NAME] [--namespace NS]
        Renders the chart (helm-python-sdk: Helm v4 as a library) and prints every object as
        one JSON list on stdout.
    check.py verify [--values JSON ...] [--kube-versions 1.32.0,1.37.0]
        For each values set: lints (strict) and renders the chart, then validates every
        object against the Kubernetes schema of each version (kubernetes-validate, strict:
        unknown fields are errors). Objects of CRDs (ServiceMonitor, PrometheusRule) have no
        schema there; they are listed as unchecked. Exits 1 on the first failure.
"""
import argparse
import json
import os
import sys

import yaml
from helm_python import chart as helm_chart
import kubernetes_validate

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starling")
CRD_GROUPS = ("monitoring.coreos.com/",)


def render(values, release="starling", namespace="starling"):
    c = helm_chart.Chart.load(CHART)
    manifests = c.render(values, name=release, namespace=namespace, is_install=True)
    objects = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(manifests[path]):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["metadata"]["annotations"].setdefault("starling.test/template", path)
                objects.append(doc)
    return objects


def verify(values_sets, versions):
    unchecked = set()
    for values in values_sets:
        report = helm_chart.lint(CHART, values, strict=True, namespace="starling",
                                 kube_version="v" + versions[-1])
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        if bad or report.get("errors"):
            print(f"lint failed with values {json.dumps(values)}:", file=sys.stderr)
            for m in bad:
                print(f"  {m.get('path')}: {m.get('error')}", file=sys.stderr)
            for e in report.get("errors") or []:
                print(f"  {e}", file=sys.stderr)
            return 1
        objects = render(values)
        for obj in objects:
            kind = f"{obj.get('apiVersion')}/{obj.get('kind')}"
            name = obj["metadata"].get("name")
            if obj.get("apiVersion", "").startswith(CRD_GROUPS):
                unchecked.add(kind)
                continue
            for v in versions:
                try:
                    kubernetes_validate.validate(obj, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = "/".join(str(p) for p in e.path)
                    print(f"{kind} {name} is invalid for Kubernetes {v} at {path}: {e.message}"
                          f" (values {json.dumps(values)})", file=sys.stderr)
                    return 1
        print(f"ok: {len(objects)} objects, values {json.dumps(values)}, Kubernetes {', '.join(versions)}")
    for k in sorted(unchecked):
        print(f"unchecked (a CRD, no schema here): {k}")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--values", default="{}")
    r.add_argument("--release", default="starling")
    r.add_argument("--namespace", default="starling")
    v = sub.add_parser("verify")
    v.add_argument("--values", action="append", default=[])
    v.add_argument("--kube-versions", default="1.32.0,1.37.0")
    a = p.parse_args()
    if a.cmd == "render":
        json.dump(render(json.loads(a.values), a.release, a.namespace), sys.stdout)
        return 0
    sets = [json.loads(x) for x in a.values] or [{}]
    return verify(sets, a.kube_versions.split(","))


if __name__ == "__main__":
    sys.exit(main())
