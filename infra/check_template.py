"""Checks that template.yaml builds the same queues and tables as
infra/stack.json, the definition the emulator and the tests create, so
that what is tested is what is deployed; and that its dashboard's body is
JSON and charts every metric the worker writes
(crates/settle-lambda/src/metrics.rs). Run by `make test`.

Usage: check_template.py [TEMPLATE] [STACK_JSON]   (exit 1 and a list of differences if they disagree)
"""
import json
import re
import sys

from cfnlint.decode import decode  # ships with cfn-lint, reads CloudFormation's !Ref/!GetAtt tags

# Each queue and table of stack.json, and its resource in the template.
QUEUES = {"work_dlq": "WorkDeadLetterQueue", "work": "WorkQueue",
          "results_dlq": "ResultsDeadLetterQueue", "results": "ResultsQueue"}
TABLES = {"items": "ItemsTable", "ledger": "LedgerTable"}


def resolve(value, params):
    """A literal, or the default of the parameter a !Ref names."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        return params[value["Ref"]]["Default"]
    return value


def check_dashboard(res, metrics_rs="crates/settle-lambda/src/metrics.rs"):
    """The dashboard's body, its ${...} substituted, must be JSON, and chart
    each metric name the worker's EMF lines declare."""
    body, _ = res["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    try:
        widgets = json.loads(re.sub(r"\$\{[^}]+\}", "x", body))["widgets"]
    except ValueError as e:
        return [f"Dashboard.DashboardBody is not JSON: {e}"]
    charted = {m[1] for w in widgets for m in w["properties"].get("metrics", []) if m[0] == "Settle"}
    with open(metrics_rs) as f:
        written = set(re.findall(r'\("(Item[A-Za-z]+)", "(?:Count|Milliseconds)"', f.read()))
    if not written:
        return [f"no metric names found in {metrics_rs}"]
    return [f"Dashboard: the worker writes {name}, which no widget charts" for name in sorted(written - charted)] + \
        [f"Dashboard: charts Settle/{name}, which the worker does not write" for name in sorted(charted - written)]


def main() -> int:
    template_path = sys.argv[1] if len(sys.argv) > 1 else "template.yaml"
    stack_path = sys.argv[2] if len(sys.argv) > 2 else "infra/stack.json"
    template, errors = decode(template_path)
    if errors:
        print(f"{template_path}: cannot read: {errors}")
        return 1
    with open(stack_path) as f:
        stack = json.load(f)
    res, params = template["Resources"], template.get("Parameters", {})
    diffs, compared = [], 0

    def same(what, want, got):
        nonlocal compared
        compared += 1
        if str(want).lower() != str(got).lower():
            diffs.append(f"{what}: {stack_path} says {want!r}, {template_path} says {got!r}")

    for key, logical in QUEUES.items():
        q, props = stack["queues"][key], res[logical]["Properties"]
        for attr, want in q["attributes"].items():
            same(f"{logical}.{attr}", want, resolve(props.get(attr), params))
        if q.get("dead_letter"):
            policy = props.get("RedrivePolicy", {})
            same(f"{logical}.RedrivePolicy.maxReceiveCount", q["max_receive_count"],
                 resolve(policy.get("maxReceiveCount"), params))
            same(f"{logical}.RedrivePolicy.deadLetterTargetArn", QUEUES[q["dead_letter"]],
                 policy.get("deadLetterTargetArn", {}).get("Fn::GetAtt", ["?"])[0])
    for key, logical in TABLES.items():
        t, props = stack["tables"][key], res[logical]["Properties"]
        attrs = {a["AttributeName"]: a["AttributeType"] for a in props["AttributeDefinitions"]}
        same(f"{logical}.AttributeDefinitions", t["attributes"], attrs)
        keys = {k["KeyType"]: k["AttributeName"] for k in props["KeySchema"]}
        same(f"{logical}.KeySchema", (t["hash_key"], t["range_key"]), (keys.get("HASH"), keys.get("RANGE")))
        same(f"{logical}.BillingMode", "PAY_PER_REQUEST", props.get("BillingMode"))
        indexes = {ix["IndexName"]: ix for ix in props.get("GlobalSecondaryIndexes", [])}
        same(f"{logical}.GlobalSecondaryIndexes", sorted(i["name"] for i in t["indexes"]), sorted(indexes))
        for ix in t["indexes"]:
            got = indexes.get(ix["name"], {})
            keys = {k["KeyType"]: k["AttributeName"] for k in got.get("KeySchema", [])}
            same(f"{logical}.{ix['name']}.KeySchema", (ix["hash_key"], ix["range_key"]),
                 (keys.get("HASH"), keys.get("RANGE")))
            same(f"{logical}.{ix['name']}.Projection", ix["projection"],
                 got.get("Projection", {}).get("ProjectionType"))
    diffs += check_dashboard(res)
    if diffs:
        print("template.yaml and infra/stack.json disagree:\n  " + "\n  ".join(diffs))
        return 1
    print(f"template.yaml mirrors infra/stack.json ({compared} settings compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
