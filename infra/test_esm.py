"""Unit tests of infra/esm.py's event building and batch-response rules
(the end-to-end run is crates/settle-cli/tests/cli_deployed.rs).
Run by `make test`: .venv/bin/python -m unittest infra/test_esm.py"""
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import esm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# A message as SQS ReceiveMessage (AttributeNames=All) returns it.
MESSAGE = {
    "MessageId": "7b2c1d3e-4f50-4a61-8b72-9c83d4e5f601",
    "ReceiptHandle": "AQEBhandle",
    "MD5OfBody": "70ba453a758a58549954bb2f95498fe7",
    "Body": '{"run":"r1","item":"a"}',
    "Attributes": {
        "ApproximateReceiveCount": "2",
        "SentTimestamp": "1795485600101",
        "SenderId": "AIDAEXAMPLE",
        "ApproximateFirstReceiveTimestamp": "1795485600513",
    },
}


class Records(unittest.TestCase):
    def test_a_record_has_the_keys_of_lambdas_sqs_event(self):
        with open(os.path.join(HERE, "events", "worker-sqs.json")) as f:
            fixture = json.load(f)["Records"][0]
        record = esm.sqs_record(MESSAGE, "arn:aws:sqs:us-east-1:123456789012:settle-work", "us-east-1")
        self.assertEqual(sorted(record), sorted(fixture))
        self.assertEqual(record["attributes"]["ApproximateReceiveCount"], "2")
        self.assertEqual(record["eventSource"], "aws:sqs")
        self.assertEqual(record["body"], MESSAGE["Body"])

    def test_message_attributes_take_lambdas_shape(self):
        m = dict(MESSAGE, MessageAttributes={"k": {"StringValue": "v", "DataType": "String"}})
        attrs = esm.sqs_record(m, "arn", "us-east-1")["messageAttributes"]
        self.assertEqual(attrs, {"k": {"stringValue": "v", "binaryValue": None,
                                       "stringListValues": [], "binaryListValues": [],
                                       "dataType": "String"}})


class BatchResponse(unittest.TestCase):
    ids = {"a", "b", "c"}

    def test_no_failures_deletes_all(self):
        for answer in (None, {}, {"batchItemFailures": []}, {"batchItemFailures": None}):
            self.assertEqual(esm.failed_ids(answer, self.ids), set(), answer)

    def test_named_failures_come_back(self):
        answer = {"batchItemFailures": [{"itemIdentifier": "b"}, {"itemIdentifier": "c"}]}
        self.assertEqual(esm.failed_ids(answer, self.ids), {"b", "c"})

    def test_an_unknown_or_empty_id_fails_the_whole_batch(self):
        for bad in ({"itemIdentifier": "z"}, {"itemIdentifier": ""}, {"itemIdentifier": None}, {}, "a"):
            with self.assertRaises(esm.InvokeError, msg=bad):
                esm.failed_ids({"batchItemFailures": [bad]}, self.ids)

    def test_an_answer_that_is_no_batch_response_fails_the_whole_batch(self):
        with self.assertRaises(esm.InvokeError):
            esm.failed_ids(["a"], self.ids)


class Invoke(unittest.TestCase):
    def test_an_unreachable_function_is_an_invoke_error(self):
        with self.assertRaises(esm.InvokeError):
            esm.invoke("http://127.0.0.1:9", "worker", {"Records": []}, 1)


class Schedule(unittest.TestCase):
    def test_each_tick_is_a_new_event(self):
        s = esm.Schedule({"tick_event": os.path.join(HERE, "events", "dispatcher-schedule.json"),
                          "region": "us-east-1"})
        a, b = s.event(), s.event()
        self.assertEqual(a["detail-type"], "Scheduled Event")
        self.assertNotEqual(a["id"], b["id"])
        self.assertRegex(a["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


if __name__ == "__main__":
    unittest.main()
