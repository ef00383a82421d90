def run():
    r = P["request"]
    host, port, path = target(r["url"])
    conn = http.client.HTTPSConnection(host, port, context=context(), timeout=P["timeout"])
    conn.request(r["method"], path, body=body_of(r), headers=dict(r["headers"]))
    local_port = conn.sock.getsockname()[1]
    resp = conn.getresponse()
    headers_ms = ms()
    events, body = [], b""
    while True:
        line = resp.readline()
        if not line:
            break
        body += line
        if line.startswith(b"data:"):
            events.append({"data": line[5:].strip().decode("utf-8", "replace"), "at_ms": ms()})
    done_ms = ms()
    conn.close()
    return {"status": resp.status, "headers": resp.getheaders(), "events": events,
            "body": body.decode("utf-8", "replace"), "headers_ms": headers_ms,
            "done_ms": done_ms, "local_port": local_port}

try:
    main()
except Exception as e:
    fail(e)
