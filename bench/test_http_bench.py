"""Tests of http_bench.py against a fake OpenAI-compatible server on 127.0.0.1.

Run with `python3 -m unittest discover bench` from the repository root.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sys
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_bench


class FakeCompletionServer(BaseHTTPRequestHandler):
    """A fake completion endpoint that streams one chunk per token, like llama-server and llmdoctor.

    The behaviour comes from the class attributes `merge_tokens` (send two tokens per chunk)
    and `error_in_stream` (send an OpenAI error event after the first token). A doctor named
    `missing` gets a 404 error body.
    """

    protocol_version = "HTTP/1.1"
    bodies: list[dict] = []
    merge_tokens = False
    error_in_stream = False

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        type(self).bodies.append(body)

        if self.path != "/v1/completions":
            self.send_json_error(404, f"no route for POST {self.path}")
            return
        doctors = body.get("doctor") or []
        if any(doctor["name"] == "missing" for doctor in doctors):
            self.send_json_error(404, "doctor `missing` is not loaded; loaded doctors: harmless")
            return

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        tokens = body["max_tokens"]
        step = 2 if self.merge_tokens else 1
        for _ in range(0, tokens, step):
            self.send_event(
                {"choices": [{"index": 0, "text": " tok" * step, "finish_reason": None}]}
            )
            if self.error_in_stream:
                self.send_event({"error": {"message": "engine failed", "type": "server_error"}})
                self.send_chunk(b"data: [DONE]\n\n")
                self.send_chunk(b"")
                return
        self.send_event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        self.send_event(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": tokens,
                    "total_tokens": tokens + 9,
                },
            }
        )
        self.send_chunk(b"data: [DONE]\n\n")
        self.send_chunk(b"")

    def send_event(self, payload: dict) -> None:
        self.send_chunk(f"data: {json.dumps(payload)}\n\n".encode())

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def send_json_error(self, status: int, message: str) -> None:
        payload = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error"}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class QuietServer(ThreadingHTTPServer):
    """A server that ignores clients closing early, as the benchmark does on an error event."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def run_main(args: list[str]) -> tuple[int, str, str]:
    """Run http_bench.main and return its exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = http_bench.main(args)
    return status, stdout.getvalue(), stderr.getvalue()


class HttpBenchTest(unittest.TestCase):
    def setUp(self):
        FakeCompletionServer.bodies = []
        FakeCompletionServer.merge_tokens = False
        FakeCompletionServer.error_in_stream = False
        self.server = QuietServer(("127.0.0.1", 0), FakeCompletionServer)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()

    def test_percentile_nearest_rank(self):
        values = [5.0, 1.0, 3.0, 2.0, 4.0]
        self.assertEqual(http_bench.percentile(values, 0.5), 3.0)
        self.assertEqual(http_bench.percentile(values, 0.0), 1.0)
        self.assertEqual(http_bench.percentile(values, 1.0), 5.0)
        self.assertEqual(http_bench.percentile([], 0.5), 0.0)

    def test_stats_follow_definitions(self):
        # Two requests sent at t=0 get tokens at 1, 2, 3 and at 2, 4. Both finish at 5.
        first = http_bench.RequestResult(
            sent=0.0, token_times=[1.0, 2.0, 3.0], finished=5.0, usage_tokens=3
        )
        second = http_bench.RequestResult(
            sent=0.0, token_times=[2.0, 4.0], finished=5.0, usage_tokens=3
        )
        stats = http_bench.compute_stats([first, second], max_tokens=3)

        # 3 tokens after each request's first token, from t=1 to t=4.
        self.assertAlmostEqual(stats.decode_tokens_per_second, 1.0)
        # 5 tokens from t=0 to t=5.
        self.assertAlmostEqual(stats.total_tokens_per_second, 1.0)
        self.assertEqual(stats.ttft_ms[0.5], 2000.0)
        self.assertEqual(stats.itl_ms[0.5], 1000.0)
        self.assertEqual(stats.itl_ms[0.95], 2000.0)
        self.assertEqual(stats.usage_mismatches, 1)
        self.assertEqual(stats.short_requests, 1)

    def test_json_records_per_concurrency(self):
        status, stdout, stderr = run_main(
            [
                "--url",
                self.url,
                "--concurrency",
                "1,3",
                "--max-tokens",
                "5",
                "--repeats",
                "2",
                "--requests-per-stream",
                "2",
                "--json",
            ]
        )
        self.assertEqual(status, 0, stderr)
        self.assertEqual(stderr, "")
        records = [json.loads(line) for line in stdout.splitlines()]
        self.assertEqual([record["concurrency"] for record in records], [1, 3])
        for record in records:
            self.assertEqual(record["runs"], 2)
            self.assertEqual(record["usage_mismatches"], 0)
            self.assertEqual(record["short_requests"], 0)
            self.assertGreater(record["decode_tokens_per_second"], 0)
            self.assertGreater(record["itl_p95_ms"], 0)

        # Warm-up, then 2 runs of 1×2 requests and 2 runs of 3×2 requests.
        bodies = FakeCompletionServer.bodies
        self.assertEqual(len(bodies), 1 + 2 * 2 + 2 * 6)
        for body in bodies:
            self.assertEqual(body["temperature"], 0)
            self.assertIs(body["ignore_eos"], True)
            self.assertIs(body["stream"], True)
            self.assertEqual(body["stream_options"], {"include_usage": True})
            self.assertNotIn("doctor", body)
            self.assertNotIn("model", body)
        last_run_prompts = [body["prompt"] for body in bodies[-6:]]
        self.assertEqual(len(set(last_run_prompts)), 6)

    def test_doctor_and_model_fields(self):
        status, _, stderr = run_main(
            [
                "--url",
                self.url,
                "--concurrency",
                "1",
                "--max-tokens",
                "2",
                "--repeats",
                "1",
                "--doctor",
                "harmless",
                "--beta",
                "0.5",
                "--model",
                "patient",
            ]
        )
        self.assertEqual(status, 0, stderr)
        for body in FakeCompletionServer.bodies:
            self.assertEqual(body["doctor"], [{"name": "harmless", "beta": 0.5}])
            self.assertEqual(body["model"], "patient")

    def test_error_body_exits_with_message(self):
        status, stdout, stderr = run_main(
            ["--url", self.url, "--doctor", "missing", "--repeats", "1"]
        )
        self.assertEqual(status, 1)
        self.assertEqual(stdout, "")
        self.assertEqual(len(stderr.splitlines()), 1, stderr)
        self.assertIn(f"{self.url}/v1/completions returned HTTP 404", stderr)
        self.assertIn("doctor `missing` is not loaded", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_error_event_exits_with_message(self):
        FakeCompletionServer.error_in_stream = True
        status, _, stderr = run_main(["--url", self.url, "--repeats", "1"])
        self.assertEqual(status, 1)
        self.assertIn("sent an error in the stream: engine failed", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_server_down_exits_with_message(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        status, _, stderr = run_main(["--url", f"http://127.0.0.1:{port}", "--repeats", "1"])
        self.assertEqual(status, 1)
        self.assertIn(f"cannot connect to http://127.0.0.1:{port}", stderr)
        self.assertIn("start the server or fix --url", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_merged_tokens_warn(self):
        FakeCompletionServer.merge_tokens = True
        status, stdout, stderr = run_main(
            [
                "--url",
                self.url,
                "--concurrency",
                "2",
                "--max-tokens",
                "4",
                "--repeats",
                "1",
                "--json",
            ]
        )
        self.assertEqual(status, 0, stderr)
        record = json.loads(stdout)
        self.assertEqual(record["usage_mismatches"], 2)
        self.assertEqual(record["short_requests"], 2)
        self.assertIn("different from usage.completion_tokens", stderr)

    def test_trailing_v1_dropped(self):
        status, _, stderr = run_main(
            [
                "--url",
                f"{self.url}/v1/",
                "--concurrency",
                "1",
                "--max-tokens",
                "2",
                "--repeats",
                "1",
            ]
        )
        self.assertEqual(status, 0, stderr)


if __name__ == "__main__":
    unittest.main()
