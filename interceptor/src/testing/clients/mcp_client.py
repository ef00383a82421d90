# An MCP client on the official Python SDK (`mcp`): `streamable_http_client`
# and `ClientSession`, as agents use them. Parameters come as JSON in
# INTERCEPTOR_CLIENT_PARAMS:
#   url         the server's endpoint (https://mcp.example.test/mcp)
#   ca_file     the only CA trusted (https)
#   connect_to  "ip:port" to reach instead of what the URL's host resolves to
#               (the TLS name and Host stay the URL's); null: resolve it
#   timeout     seconds, per request
#   sessions    a list of sessions, each a list of steps run after initialize:
#               {"op": "list_tools"} or {"op": "call_tool", "name", "arguments"}
# Prints one JSON line per result: {"session", "op", ...} with the result, or
# with "error": {"code", "message", "data"} for a JSON-RPC error. Anything
# else that fails prints {"session", "op", "exception"} and exits 1. Every HTTP
# answer is a line too: {"http": {"session", "method", "rpc", "status",
# "content_type", "decision"}} (rpc: the JSON-RPC method of the request body;
# decision: the X-Akto-Guardrails-Decision header).
import asyncio, json, os, ssl, sys, traceback, urllib.parse

import httpcore
import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

P = json.loads(os.environ["INTERCEPTOR_CLIENT_PARAMS"])
URL = urllib.parse.urlsplit(P["url"])

if P.get("connect_to"):
    # Only where the TCP connection goes changes: httpx still sends the URL's
    # host name as SNI and Host, and checks the certificate against it.
    # httpcore's asyncio backend makes every connection httpx opens.
    to_host, to_port = P["connect_to"].rsplit(":", 1)
    to_addr = (to_host.strip("[]"), int(to_port))
    connect_tcp = httpcore.AnyIOBackend.connect_tcp

    async def connect_to(self, host, port, *args, **kwargs):
        if host == URL.hostname:
            host, port = to_addr
        return await connect_tcp(self, host, port, *args, **kwargs)

    httpcore.AnyIOBackend.connect_tcp = connect_to


def emit(line):
    print(json.dumps(line), flush=True)


def content_of(block):
    return block.model_dump(mode="json", exclude_none=True)


async def step(session, op):
    if op["op"] == "list_tools":
        listed = await session.list_tools()
        return {"tools": [t.model_dump(mode="json", exclude_none=True) for t in listed.tools]}
    if op["op"] == "call_tool":
        result = await session.call_tool(op["name"], op.get("arguments") or {})
        return {"name": op["name"], "is_error": bool(result.isError),
                "content": [content_of(c) for c in result.content],
                "structured": result.structuredContent}
    raise ValueError(f"unknown step {op['op']!r}")


def rpc_method(request):
    try:
        body = json.loads(request.content)
    except (ValueError, httpx.RequestNotRead):
        return None
    return body.get("method") if isinstance(body, dict) else [m.get("method") for m in body]


async def run_session(index, steps):
    verify = ssl.create_default_context(cafile=P["ca_file"]) if URL.scheme == "https" else False
    timeout = httpx.Timeout(P["timeout"], read=P["timeout"])

    async def log_response(response):
        emit({"http": {"session": index, "method": response.request.method, "rpc": rpc_method(response.request),
                       "status": response.status_code, "content_type": response.headers.get("content-type"),
                       "decision": response.headers.get("x-akto-guardrails-decision")}})

    async with httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=True,
                                 event_hooks={"response": [log_response]}) as http:
        async with streamable_http_client(P["url"], http_client=http) as (read, write, session_id):
            async with ClientSession(read, write) as session:
                op = {"op": "initialize"}
                try:
                    init = await session.initialize()
                    emit({"session": index, "op": "initialize", "server": init.serverInfo.name,
                          "protocol": init.protocolVersion, "session_id": session_id()})
                    for op in steps:
                        try:
                            out = await step(session, op)
                        except McpError as e:
                            out = {"error": {"code": e.error.code, "message": e.error.message,
                                             "data": e.error.data}}
                        emit({"session": index, "op": op["op"], **out})
                except Exception as e:
                    emit({"session": index, "op": op["op"], "exception": f"{type(e).__name__}: {e}"})
                    raise


async def main():
    for index, steps in enumerate(P["sessions"]):
        await run_session(index, steps)


try:
    asyncio.run(asyncio.wait_for(main(), P["timeout"] * 4))
except BaseException:
    traceback.print_exc()
    sys.exit(1)
