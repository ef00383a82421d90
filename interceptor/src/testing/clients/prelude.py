import base64, hashlib, http.client, json, os, socket, ssl, sys, time, urllib.parse

P = json.loads(os.environ["INTERCEPTOR_CLIENT_PARAMS"])
# A client still running 3 s past its own timeout (it is killed at 5 s) prints
# every thread's stack, to show where it hung.
import faulthandler
faulthandler.dump_traceback_later(P.get("timeout", 10) + 3, exit=False)
T0 = time.monotonic()

def ms():
    return (time.monotonic() - T0) * 1000.0

SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
         "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}

def dn(name):
    return ", ".join(f"{SHORT.get(k, k)}={v}" for rdn in name for (k, v) in rdn)

def context():
    ctx = ssl.create_default_context(cafile=P["ca_file"])
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

def target(url):
    u = urllib.parse.urlsplit(url)
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    return u.hostname, u.port or 443, path

def body_of(r):
    return bytes.fromhex(r["body_hex"]) if r["body_hex"] is not None else None

def main():
    print(json.dumps(run()))

def fail(e):
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(1)
