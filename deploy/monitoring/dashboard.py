"""Builds the interceptor's Grafana dashboard with Grafana's own
grafana-foundation-sdk types and prints it as JSON.

    python3 deploy/monitoring/dashboard.py > deploy/monitoring/interceptor-dashboard.json

Every query names a metric the interceptor exports (its admin API's
/metrics); the test suite checks them against a live scrape, and that the
committed JSON is what this script builds.
"""

import json
import sys

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def query(expr, legend):
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def series(title, description, unit, *queries, width=12):
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .min(0)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
    )
    for q in queries:
        panel = panel.with_target(q)
    return panel


def single(title, description, unit, expr):
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(query(expr, title))
    )


def build():
    rate = "[$__rate_interval]"
    return (
        dashboard.Dashboard("Interceptor")
        .uid("interceptor")
        .tags(["interceptor", "ai", "guardrails"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_row(dashboard.Row("Decisions"))
        .with_panel(single(
            "Blocked (1h)", "Requests, responses and streams refused by a guardrail in the last hour.", "short",
            'sum(increase(interceptor_guardrail_decisions_total{action="block"}[1h]))'))
        .with_panel(single(
            "Redacted (1h)", "Bodies rewritten by a guardrail (redaction, system instructions) in the last hour.", "short",
            'sum(increase(interceptor_guardrail_decisions_total{action="modify"}[1h]))'))
        .with_panel(single(
            "Let through on failure (1h)",
            "Checks a backend could not make, let through because the fail mode is open.", "short",
            'sum(increase(interceptor_guardrail_decisions_total{action="error"}[1h]))'))
        .with_panel(single(
            "Audit events lost (1h)", "Audit events dropped or not written to the audit file.", "short",
            "sum(increase(interceptor_audit_events_dropped_total[1h])) + sum(increase(interceptor_audit_write_errors_total[1h]))"))
        .with_panel(series(
            "Decisions per provider", "Guardrail decisions per second, by provider and decision.", "ops",
            query(f"sum by (provider, action) (rate(interceptor_guardrail_decisions_total{rate}))", "{{provider}} {{action}}")))
        .with_panel(series(
            "Blocks and redactions per rule", "Which rules refuse and rewrite, per second.", "ops",
            query(
                f'sum by (rule, action) (rate(interceptor_guardrail_decisions_total{{action=~"block|modify|alert", rule!=""}}{rate}))',
                "{{rule}} {{action}}")))
        .with_panel(series(
            "Guardrail latency", "Time the guardrails add to a check: p50 and p99.", "s",
            query(f"histogram_quantile(0.5, sum by (le) (rate(interceptor_guardrail_duration_seconds_bucket{rate})))", "p50"),
            query(f"histogram_quantile(0.99, sum by (le) (rate(interceptor_guardrail_duration_seconds_bucket{rate})))", "p99")))
        .with_panel(series(
            "Backend errors", "Failed calls to a guardrail backend (local engine, Akto), by kind.", "ops",
            query(f"sum by (backend, kind) (rate(interceptor_guardrail_backend_errors_total{rate}))", "{{backend}} {{kind}}")))
        .with_row(dashboard.Row("Connections"))
        .with_panel(series(
            "Connections", "Connections handled per second, by mode (intercept, guard, passthrough, plain) and outcome.", "ops",
            query(f"sum by (mode, outcome) (rate(interceptor_connections_total{rate}))", "{{mode}} {{outcome}}"),
            width=24))
        .with_panel(series(
            "Inspection budget refusals", "Bodies refused because the memory budget for inspection was spent.", "ops",
            query(f"sum(rate(interceptor_inspection_budget_refusals_total{rate}))", "refused")))
        .with_panel(series(
            "Passthrough copy fallbacks", "Passthrough connections relayed by copying because splicing failed.", "ops",
            query(f"sum(rate(interceptor_passthrough_copy_fallbacks_total{rate}))", "fallbacks")))
        .with_row(dashboard.Row("Workloads and tokens"))
        .with_panel(series(
            "Requests per workload", "Requests checked per second, by workload and decision.", "ops",
            query(
                f'sum by (workload, action) (rate(interceptor_workload_decisions_total{{direction="request"}}{rate}))',
                "{{workload}} {{action}}")))
        .with_panel(series(
            "Blocked and redacted per workload", "Requests, responses and streams refused or rewritten in the last hour, by workload.", "short",
            query(
                'sum by (workload, action) (increase(interceptor_workload_decisions_total{action=~"block|modify"}[1h]))',
                "{{workload}} {{action}}")))
        .with_panel(series(
            "Tokens per workload", "Tokens per second used by successful answers, by workload and kind (input, output).", "short",
            query(f"sum by (workload, kind) (rate(interceptor_tokens_total{rate}))", "{{workload}} {{kind}}")))
        .with_panel(series(
            "Tokens per model", "Tokens per second, by provider, model and kind.", "short",
            query(f"sum by (provider, model, kind) (rate(interceptor_tokens_total{rate}))", "{{provider}} {{model}} {{kind}}")))
        .with_panel(series(
            "Tokens per workload and model (1h)", "Tokens used in the last hour, by workload and model.", "short",
            query("sum by (workload, model) (increase(interceptor_tokens_total[1h]))", "{{workload}} {{model}}")))
        .with_panel(series(
            "OpenTelemetry export", "Spans and audit log records dropped (queue full) or lost to failed exports, per second.", "ops",
            query(f"sum by (signal) (rate(interceptor_otlp_dropped_total{rate}))", "dropped {{signal}}"),
            query(f"sum by (signal) (rate(interceptor_otlp_export_failures_total{rate}))", "failed {{signal}}")))
        .with_row(dashboard.Row("MCP tool calls"))
        .with_panel(series(
            "Tool calls", "MCP tool calls per second, by server, tool and decision.", "ops",
            query(f"sum by (server, tool, decision) (rate(interceptor_mcp_tool_calls_total{rate}))", "{{server}} {{tool}} {{decision}}")))
        .with_panel(series(
            "Tool definition changes", "Changed tool definitions (rug pulls) reported per server.", "short",
            query("sum by (server) (increase(interceptor_mcp_tool_changes_total[1h]))", "{{server}}")))
    )


if __name__ == "__main__":
    built = build().build()
    json.dump(json.loads(JSONEncoder(sort_keys=True).encode(built)), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
