const P = JSON.parse(process.env.INTERCEPTOR_CLIENT_PARAMS);
const t0 = performance.now();
const ms = () => performance.now() - t0;
(async () => {
  try {
    const r = P.request;
    const init = {
      method: r.method,
      headers: r.headers,
      signal: AbortSignal.timeout(P.timeout * 1000),
    };
    if (r.body_hex !== null) init.body = Buffer.from(r.body_hex, "hex");
    const res = await fetch(r.url, init);
    const headers_ms = ms();
    const decoder = new TextDecoder();
    const events = [];
    let body = "";
    let pending = "";
    const take = (text) => {
      body += text;
      pending += text;
      let i;
      while ((i = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, i).replace(/\r$/, "");
        pending = pending.slice(i + 1);
        if (line.startsWith("data:")) events.push({ data: line.slice(5).trim(), at_ms: ms() });
      }
    };
    const reader = res.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      take(decoder.decode(value, { stream: true }));
    }
    take(decoder.decode());
    const out = { status: res.status, headers: [...res.headers], events, body, headers_ms, done_ms: ms() };
    process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
  } catch (e) {
    const cause = e && e.cause ? ` (cause: ${e.cause.code || ""} ${e.cause.message || e.cause})` : "";
    process.stdout.write(JSON.stringify({ error: `${e}${cause}` }) + "\n", () => process.exit(1));
  }
})();
