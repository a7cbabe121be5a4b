#!/usr/bin/env python3
"""An OTLP trace receiver for the tests: OTLP/HTTP (protobuf, POST /v1/traces) and OTLP/gRPC
(TraceService/Export), both decoded with the OpenTelemetry protocol's own generated classes
(PyPI: opentelemetry-proto, grpcio). Every span received is appended to --out as one JSON line:
protocol, resource service.name and service.instance.id, name, trace/span/parent IDs (hex),
start and end (ns), and its attributes. Prints "ready HTTP_PORT GRPC_PORT" once both listen.
"""
import argparse
import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()
lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    x = getattr(v, kind)
    if kind == "array_value":
        return [value(e) for e in x.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in x.values}
    if kind == "bytes_value":
        return x.hex()
    return x


def record(req, protocol):
    lines = []
    for rs in req.resource_spans:
        res = {kv.key: value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "protocol": protocol,
                    "service": res.get("service.name"),
                    "instance": res.get("service.instance.id"),
                    "scope": ss.scope.name,
                    "name": s.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                }))
    with lock, open(args.out, "a") as f:
        for line in lines:
            f.write(line + "\n")


class Http(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        record(req, "http")
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class Grpc(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        record(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


http = ThreadingHTTPServer(("127.0.0.1", 0), Http)
threading.Thread(target=http.serve_forever, daemon=True).start()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Grpc(), server)
grpc_port = server.add_insecure_port("127.0.0.1:0")
server.start()
print("ready", http.server_address[1], grpc_port, flush=True)
server.wait_for_termination()
