def run():
    host, port, _ = target(P["requests"][0]["url"])
    conn = http.client.HTTPSConnection(host, port, context=context(), timeout=P["timeout"])
    out = {"responses": []}
    for r in P["requests"]:
        _, _, path = target(r["url"])
        conn.request(r["method"], path, body=body_of(r), headers=dict(r["headers"]))
        # Before the response: http.client drops the socket once a
        # "connection: close" response is read.
        local_port = conn.sock.getsockname()[1]
        if "issuer" not in out:
            cert = conn.sock.getpeercert()
            out["issuer"] = dn(cert["issuer"])
            out["subject"] = dn(cert["subject"])
            out["tls_version"] = conn.sock.version()
            out["local_port"] = local_port
        resp = conn.getresponse()
        data = resp.read()
        out["responses"].append({
            "status": resp.status, "reason": resp.reason, "version": resp.version,
            "headers": resp.getheaders(), "body": data.decode("utf-8", "replace"),
            "local_port": local_port,
        })
    conn.close()
    return out

try:
    main()
except Exception as e:
    fail(e)
