"""A test OTLP receiver built on the official protocol definitions
(opentelemetry-proto): HTTP/protobuf (POST /v1/traces, /v1/logs) and gRPC
(TraceService, LogsService), on loopback ports of its own.

Prints {"http": port, "grpc": port} once listening. Every export is decoded
and appended to RECORDS (one JSON object per span or log record, ids in hex,
attribute values as plain JSON); the raw protobuf bytes of every export are
appended to RAW, so a test can search the whole export for a string.
Runs until its standard input closes.
"""

import gzip
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

RECORDS, RAW = sys.argv[1], sys.argv[2]
LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def spans(request, transport):
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "signal": "traces", "transport": transport, "resource": resource,
                    "scope": ss.scope.name,
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                    "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                    "status": {"code": s.status.code, "message": s.status.message},
                    "attributes": attributes(s.attributes),
                    "events": [{"name": e.name, "attributes": attributes(e.attributes)} for e in s.events],
                })
    return out


def logs(request, transport):
    out = []
    for rl in request.resource_logs:
        resource = attributes(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                out.append({
                    "signal": "logs", "transport": transport, "resource": resource,
                    "event_name": r.event_name, "severity_text": r.severity_text,
                    "body": value(r.body), "attributes": attributes(r.attributes),
                })
    return out


def record(raw, items):
    with LOCK:
        with open(RAW, "ab") as f:
            f.write(raw)
        with open(RECORDS, "a") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")


class Http(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces":
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            record(body, spans(request, "http"))
            reply = trace_service_pb2.ExportTraceServiceResponse()
        elif self.path == "/v1/logs":
            request = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
            record(body, logs(request, "http"))
            reply = logs_service_pb2.ExportLogsServiceResponse()
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = reply.SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        record(request.SerializeToString(), spans(request, "grpc"))
        return trace_service_pb2.ExportTraceServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        record(request.SerializeToString(), logs(request, "grpc"))
        return logs_service_pb2.ExportLogsServiceResponse()


def main():
    http = ThreadingHTTPServer(("127.0.0.1", 0), Http)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"http": http.server_address[1], "grpc": grpc_port}), flush=True)
    sys.stdin.read()
    server.stop(0)
    http.shutdown()


main()
