#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server, for the tests of Starling's in-cluster client.

It serves HTTPS with the given certificate, checks the bearer token, answers
GET /api/v1/nodes/NAME from --nodes (JSON: name -> labels), and takes
POST /api/v1/namespaces/NS/secrets: each posted object is validated against the Kubernetes
schema (kubernetes-validate, strict) before it is stored; a second Secret of the same name is
409 Conflict, as the real server answers. Every request is appended to --record as a JSON line.
It prints "ready PORT" once it listens.
"""
import argparse
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate

p = argparse.ArgumentParser()
p.add_argument("--cert", required=True)
p.add_argument("--key", required=True)
p.add_argument("--token", required=True)
p.add_argument("--nodes", required=True)
p.add_argument("--record", required=True)
p.add_argument("--kube-version", default="1.37.0")
args = p.parse_args()
nodes = json.loads(args.nodes)
secrets = {}


class Api(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def status(self, code, reason, message):
        self.answer(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": reason, "message": message, "code": code})

    def record(self, body=None):
        with open(args.record, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "body": body}) + "\n")

    def authorised(self):
        if self.headers.get("authorization") != "Bearer " + args.token:
            self.status(401, "Unauthorized", "bad token")
            return False
        return True

    def do_GET(self):
        self.record()
        if not self.authorised():
            return
        parts = self.path.split("/")
        if self.path.startswith("/api/v1/nodes/") and len(parts) == 5:
            name = parts[4]
            if name not in nodes:
                return self.status(404, "NotFound", f'nodes "{name}" not found')
            return self.answer(200, {"kind": "Node", "apiVersion": "v1",
                                     "metadata": {"name": name, "labels": nodes[name]}})
        self.status(404, "NotFound", self.path)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError as e:
            self.record(raw.decode(errors="replace"))
            return self.status(400, "BadRequest", f"not JSON: {e}")
        self.record(body)
        if not self.authorised():
            return
        parts = self.path.split("/")
        if len(parts) != 6 or parts[1:4] != ["api", "v1", "namespaces"] or parts[5] != "secrets":
            return self.status(404, "NotFound", self.path)
        try:
            kubernetes_validate.validate(body, args.kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            return self.status(422, "Invalid", f"schema: {e.message}")
        ns, name = parts[4], body["metadata"]["name"]
        if body["metadata"].get("namespace", ns) != ns:
            return self.status(400, "BadRequest", "namespace differs from the path")
        if (ns, name) in secrets:
            return self.status(409, "AlreadyExists", f'secrets "{name}" already exists')
        secrets[(ns, name)] = body
        self.answer(201, body)


server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(args.cert, args.key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", server.server_address[1], flush=True)
server.serve_forever()
