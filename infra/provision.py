"""Creates the default stack's queues and tables on the emulator from
infra/stack.json (the same definition crates/settle-aws/src/provision.rs
reads), then prints the SETTLE_* variables as NAME=VALUE lines.

Usage: provision.py ENDPOINT [PREFIX] [--visibility SECONDS]
  PREFIX names a separate stack, e.g. for scripts/cost.py. --visibility
  sets the work and results queues' VisibilityTimeout instead of the
  stack's 180 s (6 x the functions' timeout, as Lambda's SQS event source
  asks), so that on the offline stack (infra/emulator.sh up --deployed) a
  batch that failed as a whole comes back in seconds."""
import argparse
import json
import os
import sys

import boto3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("endpoint")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--visibility", type=int)
    args = p.parse_args()
    endpoint, prefix = args.endpoint, args.prefix
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "stack.json")) as f:
        stack = json.load(f)
    kw = dict(endpoint_url=endpoint, region_name="us-east-1",
              aws_access_key_id="testing", aws_secret_access_key="testing")
    sqs = boto3.client("sqs", **kw)
    ddb = boto3.client("dynamodb", **kw)
    env, arns = {}, {}
    # Dead-letter queues first: the others name them in their policy.
    for key, q in sorted(stack["queues"].items(), key=lambda kv: "dead_letter" in kv[1]):
        attrs = dict(q["attributes"])
        if args.visibility is not None and "VisibilityTimeout" in attrs:
            attrs["VisibilityTimeout"] = str(args.visibility)
        if q.get("dead_letter"):
            attrs["RedrivePolicy"] = json.dumps({
                "deadLetterTargetArn": arns[q["dead_letter"]],
                "maxReceiveCount": q["max_receive_count"],
            })
        url = sqs.create_queue(QueueName=prefix + q["name"], Attributes=attrs)["QueueUrl"]
        arns[key] = sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        env[q["env"]] = url
    existing = set(ddb.list_tables()["TableNames"])
    for t in stack["tables"].values():
        name = prefix + t["name"]
        if name not in existing:
            schema = lambda h, r: [{"AttributeName": h, "KeyType": "HASH"},
                                   {"AttributeName": r, "KeyType": "RANGE"}]
            args = dict(
                TableName=name, BillingMode="PAY_PER_REQUEST",
                KeySchema=schema(t["hash_key"], t["range_key"]),
                AttributeDefinitions=[{"AttributeName": a, "AttributeType": ty}
                                      for a, ty in t["attributes"].items()],
            )
            if t["indexes"]:
                args["GlobalSecondaryIndexes"] = [{
                    "IndexName": ix["name"],
                    "KeySchema": schema(ix["hash_key"], ix["range_key"]),
                    "Projection": {"ProjectionType": ix["projection"]},
                } for ix in t["indexes"]]
            ddb.create_table(**args)
        env[t["env"]] = name
    for k, v in env.items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
