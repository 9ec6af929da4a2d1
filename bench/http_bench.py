#!/usr/bin/env python3
"""Measure decode throughput and latency of an OpenAI-compatible server over HTTP.

The same workload runs against `llmdoctor serve` and against llama.cpp's `llama-server`, so
their figures can be compared. Each configuration (one concurrency level) runs `--repeats`
times. In a run, every stream sends `--requests-per-stream` streaming `/v1/completions`
requests one after another, all streams at once. Every request is greedy, sets
`ignore_eos`, and has its own prompt from a fixed list, so each one generates exactly
`--max-tokens` tokens.

Tokens are counted as SSE chunks whose choice carries non-empty text. Both servers send one
such chunk per generated token. The count is checked against `usage.completion_tokens`,
and every mismatch is reported. Metrics of one run:

- decode tok/s: tokens after the first token of each request, divided by the time from the
  first token of the run (any request) to its last token (any request);
- total tok/s: all tokens divided by the time from the first request sent to the last
  response finished;
- TTFT: from sending a request to its first token;
- ITL: the gap between consecutive tokens of one request.

Percentiles use the nearest rank, as `llmdoctor bench` does. Each reported figure is the
median of that figure over the runs. Standard library only, Python 3.11.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

# Completion prompts of 30 to 45 tokens (SmolLM2 tokenizer), sent unchanged to every server.
# The j-th request of stream s uses PROMPTS[(s + j * concurrency) % len(PROMPTS)], so no
# prompt repeats within a run of up to len(PROMPTS) requests.
PROMPTS = [
    "Explain in simple terms why the sky looks blue during the day and turns red and orange at sunset."
    " Use one everyday comparison that a ten-year-old would understand.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night."
    " The story should have a clear beginning, a surprise in the middle and a calm ending.",
    "Describe the main differences between a virus and a bacterium, and how each one makes people sick."
    " Mention how each one is usually treated and why antibiotics do not help against viruses.",
    "Give three practical tips for someone who wants to start running but has never exercised regularly."
    " Include how often to run in the first weeks and how to avoid common injuries.",
    "Summarize the causes of the French Revolution for a high school student preparing for an exam."
    " Cover the money problems of the state, the role of new ideas and the price of bread.",
    "What are the advantages and disadvantages of working from home compared with working in an office?"
    " Consider productivity, loneliness, commuting time and how managers keep track of work.",
    "Write a polite email to a landlord asking for the broken heating in the apartment to be repaired."
    " Keep the tone friendly but firm, and suggest two possible dates for a visit.",
    "Explain how a bill becomes a law in a parliamentary democracy, step by step, in plain language."
    " Start with who can propose a bill and end with what happens when it is published.",
    "Describe a typical day in the life of a honeybee worker, from morning until the hive goes quiet."
    " Include the tasks she does at different ages and how she communicates with other bees.",
    "List the ingredients and the steps needed to bake a simple loaf of bread at home without a machine."
    " Explain what the yeast does and how to tell when the dough has risen enough.",
    "Why do cats purr? Describe what scientists currently know and what is still uncertain about it."
    " Also explain whether purring always means that a cat is happy and relaxed.",
    "Write a product description for a waterproof backpack designed for cyclists who commute in the rain."
    " Mention the materials, the reflective details, the size and the price range.",
    "Compare trains and airplanes for a journey of five hundred kilometres in terms of cost, time and comfort."
    " End with a recommendation for a family of four travelling with a lot of luggage.",
    "Explain what compound interest is and show how a small monthly saving can grow over thirty years."
    " Use round numbers and explain the effect of starting ten years earlier.",
    "Tell a bedtime story about a small dragon who is afraid of the dark and learns to make friends."
    " The story should be gentle and end with the dragon falling asleep.",
    "Describe how the water cycle works, including evaporation, condensation, precipitation and collection."
    " Explain which of these steps are driven by the energy of the sun.",
    "What should a new manager do in the first month to earn the trust of a team that did not choose them?"
    " Give concrete actions for meetings, one-to-one talks and decisions about priorities.",
    "Write a short speech that a teacher could give to students on the last day of the school year."
    " It should thank the students, mention something they achieved together and wish them a good summer.",
    "Explain the difference between weather and climate, with an example of each from everyday life."
    " Then explain why a cold winter does not disprove a warming climate.",
    "Give advice to a student who feels overwhelmed by exams and does not know where to start revising."
    " Suggest a simple weekly plan and a way to check progress without extra stress.",
    "Describe the history of the bicycle, from the first wooden machines to modern electric bikes."
    " Mention at least three inventions that made cycling safer or more comfortable.",
    "Explain how vaccines train the immune system, and why booster doses are sometimes recommended."
    " Keep the explanation free of jargon and add one sentence about how vaccines are tested.",
    "Write a review of an imaginary restaurant that serves only soup, including the service and the prices."
    " Write it in the voice of a food critic who is hard to impress but secretly delighted.",
    "What are the main steps to plan a small vegetable garden on a balcony that gets only morning sun?"
    " Suggest five vegetables or herbs that grow well in partial shade and in containers.",
    "Explain why leaves change colour in autumn, and why some trees keep their green needles all winter."
    " Mention the pigments involved and the role of shorter days and colder nights.",
    "Describe how a search engine finds and ranks web pages when a user types a question into it."
    " Keep it at the level of a curious teenager, and say why two people may see different results.",
    "Write a letter from a grandmother to her grandson who has just moved to a new city for university."
    " She should give practical advice about money, food and making new friends.",
    "Explain the rules of chess to a beginner, starting with how each piece moves on the board."
    " Then describe the first three moves of a common opening and the idea behind them.",
    "What makes a good password, and why is it risky to use the same password on many different websites?"
    " Give an example of a strong password that is still easy to remember, and mention password managers.",
    "Describe the journey of a cup of coffee, from the farm where the beans grow to a cafe in a big city."
    " Include the harvest, drying, roasting, shipping and brewing, and who earns money at each step.",
    "Explain how the moon causes tides in the ocean, and why there are two high tides on most days."
    " Add a short note on why the tides are especially strong at full moon and new moon.",
    "Write a short dialogue between two friends deciding where to go on holiday with a limited budget."
    " They disagree at first, and each one gives two reasons for the place they prefer.",
]

# Prompt of the warm-up request, kept out of PROMPTS so that no measured prompt runs twice in a row.
WARMUP_PROMPT = "Write one sentence about the weather in spring."

# Percentiles reported for TTFT and ITL.
PERCENTILES = (0.5, 0.95)


class BenchError(Exception):
    """A failure that ends the benchmark with a one-line message and exit status 1."""


def percentile(values: list[float], q: float) -> float:
    """Return the nearest-rank `q` quantile of `values` (0.0 when empty), like `llmdoctor bench`."""
    if not values:
        return 0.0
    ordered = sorted(values)
    # Round half up, like Rust's f64::round in `llmdoctor bench` (Python's round() rounds half to even).
    rank = math.floor((len(ordered) - 1) * q + 0.5)
    return ordered[min(rank, len(ordered) - 1)]


@dataclass
class Endpoint:
    """The server under test: its parsed base URL and the headers every request carries."""

    base_url: str
    scheme: str
    host: str
    port: int
    path_prefix: str
    headers: dict[str, str]

    @classmethod
    def parse(cls, url: str, api_key: str | None) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchError(
                f"invalid --url {url!r}: expected http://HOST:PORT, e.g. http://127.0.0.1:8080"
            )
        default_port = 443 if parts.scheme == "https" else 80
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return cls(
            base_url=url.rstrip("/").removesuffix("/v1"),
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port or default_port,
            path_prefix=parts.path.rstrip("/").removesuffix("/v1"),
            headers=headers,
        )

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """Open a connection, raising BenchError with the fix when the server is unreachable."""
        if self.scheme == "https":
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.connect()
        except OSError as error:
            reason = error.strerror or str(error)
            raise BenchError(
                f"cannot connect to {self.base_url}: {reason}; start the server or fix --url"
            ) from None
        return connection


@dataclass
class RequestResult:
    """Timings of one streamed completion, in seconds of `time.perf_counter()`."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    finished: float = 0.0
    usage_tokens: int | None = None
    cached_prompt_tokens: int = 0


@dataclass
class RunStats:
    """Figures of one run."""

    decode_tokens_per_second: float
    total_tokens_per_second: float
    ttft_ms: dict[float, float]
    itl_ms: dict[float, float]
    usage_mismatches: int
    short_requests: int
    cached_prompt_tokens: int


def error_hint(status: int) -> str:
    """Return the likely fix for an HTTP error status."""
    if status in (401, 403):
        return "pass the server's key with --api-key"
    if status == 404:
        return "check --url, --model and --doctor against GET /v1/models"
    if status == 503:
        return "the server is loading or shutting down; retry when GET /health returns 200"
    if status == 429:
        return "the server's queue is full; lower --concurrency or raise the server's queue limit"
    return "check --model, --doctor and --max-tokens against this server's API"


def error_message(payload: str) -> str:
    """Extract `error.message` from an OpenAI-style error body, or return the body shortened."""
    try:
        body = json.loads(payload)
    except json.JSONDecodeError:
        return payload.strip()[:200] or "empty body"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    if isinstance(error, str):
        return error
    return payload.strip()[:200]


def stream_completion(
    connection: http.client.HTTPConnection,
    endpoint: Endpoint,
    body: dict,
) -> RequestResult:
    """Send one streaming completion request and time every token chunk of its response."""
    path = f"{endpoint.path_prefix}/v1/completions"
    url = f"{endpoint.base_url}/v1/completions"
    result = RequestResult(sent=time.perf_counter())
    try:
        connection.request("POST", path, body=json.dumps(body), headers=endpoint.headers)
        response = connection.getresponse()
        if response.status != 200:
            payload = response.read().decode("utf-8", errors="replace")
            raise BenchError(
                f"{url} returned HTTP {response.status}: {error_message(payload)}; {error_hint(response.status)}"
            )
        content_type = response.getheader("Content-Type", "")
        if "text/event-stream" not in content_type:
            response.read()
            raise BenchError(
                f"{url} responded to a streaming request with Content-Type {content_type!r}; "
                "the server must support `stream: true`"
            )
        read_events(response, url, result)
    except TimeoutError:
        raise BenchError(
            f"{url} timed out: no data for {connection.timeout:g} s; raise --timeout or check the server"
        ) from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise BenchError(
            f"connection to {url} failed mid-request ({error!r}); check the server's log"
        ) from None
    return result


def read_events(response: http.client.HTTPResponse, url: str, result: RequestResult) -> None:
    """Read SSE events into `result` until `data: [DONE]` or the end of the body."""
    data_lines: list[str] = []
    done = False
    while True:
        raw = response.readline()
        if not raw:
            break
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            data_lines.append(line[5:].removeprefix(" "))
            continue
        if line.startswith("error:"):
            # Not a standard SSE field, but some servers send stream errors this way. Treating it
            # like `data:` gets its message to the user.
            data_lines.append(line[6:].removeprefix(" "))
            continue
        if line or not data_lines:
            continue
        data = "\n".join(data_lines)
        data_lines = []
        if data == "[DONE]":
            result.finished = time.perf_counter()
            done = True
            continue
        handle_event(data, url, result)
    if not done:
        raise BenchError(f"{url} ended the stream without `data: [DONE]`: check the server's log")


def handle_event(data: str, url: str, result: RequestResult) -> None:
    """Record one SSE `data` payload: a token chunk, a usage chunk or an error."""
    now = time.perf_counter()
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise BenchError(f"{url} sent an event that is not JSON: {data[:120]!r}") from None
    if "error" in chunk:
        raise BenchError(
            f"{url} sent an error in the stream: {error_message(data)}. Check the server's log."
        )
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            result.token_times.append(now)
    usage = chunk.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        result.usage_tokens = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details") or {}
        result.cached_prompt_tokens = details.get("cached_tokens") or 0


def request_body(args: argparse.Namespace, prompt: str) -> dict:
    """Build the request body. Both llmdoctor and llama-server accept every field but `doctor`."""
    body = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.model:
        body["model"] = args.model
    if args.doctor:
        doctor = {"name": args.doctor}
        if args.beta is not None:
            doctor["beta"] = args.beta
        # llmdoctor's steering extension. NOTE: llama-server ignores unknown fields, so a
        # run with --doctor against it is silently unsteered.
        body["doctor"] = [doctor]
    return body


def run_stream(
    endpoint: Endpoint,
    args: argparse.Namespace,
    prompts: list[str],
    barrier: threading.Barrier,
    results: list[RequestResult],
    errors: list[Exception],
) -> None:
    """Send `prompts` one after another on one connection, starting when every stream is ready."""
    try:
        with contextlib.closing(endpoint.connect(args.timeout)) as connection:
            barrier.wait()
            for prompt in prompts:
                results.append(stream_completion(connection, endpoint, request_body(args, prompt)))
    except threading.BrokenBarrierError:
        pass
    except Exception as error:  # noqa: BLE001 - re-raised by the main thread
        errors.append(error)
        barrier.abort()


def run_once(endpoint: Endpoint, args: argparse.Namespace, concurrency: int) -> RunStats:
    """Run `concurrency` streams at once and compute the run's figures."""
    per_stream = args.requests_per_stream
    barrier = threading.Barrier(concurrency)
    results: list[list[RequestResult]] = [[] for _ in range(concurrency)]
    errors: list[Exception] = []
    threads = []
    for stream in range(concurrency):
        prompts = [
            PROMPTS[(stream + index * concurrency) % len(PROMPTS)] for index in range(per_stream)
        ]
        thread = threading.Thread(
            target=run_stream,
            args=(endpoint, args, prompts, barrier, results[stream], errors),
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

    requests = [request for stream in results for request in stream]
    return compute_stats(requests, args.max_tokens)


def compute_stats(requests: list[RequestResult], max_tokens: int) -> RunStats:
    """Compute one run's figures from its requests' timings."""
    with_tokens = [request for request in requests if request.token_times]
    if not with_tokens:
        raise BenchError(
            "no request produced a token chunk with text; check that the server streams `text`"
        )

    first_token = min(request.token_times[0] for request in with_tokens)
    last_token = max(request.token_times[-1] for request in with_tokens)
    decode_tokens = sum(len(request.token_times) - 1 for request in with_tokens)
    all_tokens = sum(len(request.token_times) for request in requests)
    run_start = min(request.sent for request in requests)
    run_end = max(request.finished for request in requests)

    ttft = [(request.token_times[0] - request.sent) * 1e3 for request in with_tokens]
    itl = [
        (later - earlier) * 1e3
        for request in with_tokens
        for earlier, later in zip(request.token_times, request.token_times[1:])
    ]
    counts = [len(request.token_times) for request in requests]
    return RunStats(
        decode_tokens_per_second=decode_tokens / max(last_token - first_token, 1e-9),
        total_tokens_per_second=all_tokens / max(run_end - run_start, 1e-9),
        ttft_ms={q: percentile(ttft, q) for q in PERCENTILES},
        itl_ms={q: percentile(itl, q) for q in PERCENTILES},
        usage_mismatches=sum(
            1
            for request in requests
            if request.usage_tokens is not None and request.usage_tokens != len(request.token_times)
        ),
        short_requests=sum(1 for count in counts if count != max_tokens),
        cached_prompt_tokens=sum(request.cached_prompt_tokens for request in requests),
    )


def summarize(args: argparse.Namespace, concurrency: int, runs: list[RunStats]) -> dict:
    """Combine the runs of one configuration into medians, as one flat record."""

    def median(values: list[float]) -> float:
        return round(percentile(values, 0.5), 2)

    record = {
        "label": args.label,
        "url": args.url,
        "model": args.model,
        "doctor": args.doctor,
        "beta": args.beta,
        "concurrency": concurrency,
        "requests_per_stream": args.requests_per_stream,
        "max_tokens": args.max_tokens,
        "runs": len(runs),
        "decode_tokens_per_second": median([run.decode_tokens_per_second for run in runs]),
        "total_tokens_per_second": median([run.total_tokens_per_second for run in runs]),
    }
    for q in PERCENTILES:
        record[f"ttft_p{round(q * 100)}_ms"] = median([run.ttft_ms[q] for run in runs])
    for q in PERCENTILES:
        record[f"itl_p{round(q * 100)}_ms"] = median([run.itl_ms[q] for run in runs])
    record["usage_mismatches"] = sum(run.usage_mismatches for run in runs)
    record["short_requests"] = sum(run.short_requests for run in runs)
    record["cached_prompt_tokens"] = sum(run.cached_prompt_tokens for run in runs)
    return record


def warn_about(record: dict) -> None:
    """Print a warning to stderr for every check of `record` that failed."""
    where = f"{record['label']}, concurrency {record['concurrency']}"
    if record["usage_mismatches"]:
        print(
            f"warning ({where}): {record['usage_mismatches']} requests had a token-chunk count "
            "different from usage.completion_tokens, so the server may merge tokens into one chunk",
            file=sys.stderr,
        )
    if record["short_requests"]:
        print(
            f"warning ({where}): {record['short_requests']} requests did not produce --max-tokens "
            "token chunks; the server may not honour `ignore_eos`",
            file=sys.stderr,
        )
    if record["cached_prompt_tokens"]:
        print(
            f"warning ({where}): the server reused {record['cached_prompt_tokens']} cached prompt tokens, "
            "which lowers TTFT; start llama-server with --no-cache-prompt for a like-for-like comparison",
            file=sys.stderr,
        )


def print_table_header(args: argparse.Namespace) -> None:
    mode = "unsteered"
    if args.doctor:
        mode = f"doctor {args.doctor}"
        if args.beta is not None:
            mode += f" (beta {args.beta:g})"
    print(
        f"{args.label}: {args.url}, {mode}, max_tokens {args.max_tokens}, "
        f"{args.requests_per_stream} request(s) per stream, medians of {args.repeats} run(s)"
    )
    print(
        f"{'concurrency':>11} {'decode tok/s':>12} {'total tok/s':>11} "
        f"{'TTFT p50 ms':>11} {'TTFT p95 ms':>11} {'ITL p50 ms':>10} {'ITL p95 ms':>10}"
    )


def print_table_row(record: dict) -> None:
    print(
        f"{record['concurrency']:>11} {record['decode_tokens_per_second']:>12.1f} "
        f"{record['total_tokens_per_second']:>11.1f} {record['ttft_p50_ms']:>11.1f} "
        f"{record['ttft_p95_ms']:>11.1f} {record['itl_p50_ms']:>10.1f} {record['itl_p95_ms']:>10.1f}"
    )


def concurrency_list(text: str) -> list[int]:
    """Parse a list such as `1,8,16` into [1, 8, 16] for argparse."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return levels


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure streaming /v1/completions throughput and latency of an OpenAI-compatible server.",
    )
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8080",
        help="base URL of the server; a trailing /v1 is dropped (default: %(default)s)",
    )
    parser.add_argument(
        "--label",
        metavar="NAME",
        help="name of the server in the output (default: the URL's host:port)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="LEVELS",
        type=concurrency_list,
        default=[1, 8, 16],
        help="comma-separated numbers of concurrent streams (default: 1,8,16)",
    )
    parser.add_argument(
        "--requests-per-stream",
        metavar="N",
        type=positive_int,
        default=1,
        help="requests each stream sends one after another in a run (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        metavar="N",
        type=positive_int,
        default=64,
        help="tokens generated per request, at least 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        metavar="N",
        type=positive_int,
        default=3,
        help="runs per concurrency level; figures are medians over them (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="`model` field of each request (default: not sent, the server's default model)",
    )
    parser.add_argument(
        "--doctor", metavar="NAME", help="llmdoctor only: steer every request with this doctor"
    )
    parser.add_argument(
        "--beta", type=float, help="β of --doctor (default: the doctor's own default)"
    )
    parser.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=300.0,
        help="seconds to wait for each read from the server (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per concurrency level instead of a table",
    )
    args = parser.parse_args(argv)

    if args.max_tokens < 2:
        parser.error(
            "--max-tokens must be at least 2, because decode throughput counts the tokens after the first"
        )
    if args.beta is not None and not args.doctor:
        parser.error("--beta needs --doctor")
    busiest = max(args.concurrency) * args.requests_per_stream
    if busiest > len(PROMPTS):
        print(
            f"warning: a run of {busiest} requests reuses prompts, because the built-in list has {len(PROMPTS)}",
            file=sys.stderr,
        )
    if args.label is None:
        parts = urllib.parse.urlsplit(args.url)
        args.label = parts.netloc or args.url
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        endpoint = Endpoint.parse(args.url, args.api_key)

        with contextlib.closing(endpoint.connect(args.timeout)) as warmup:
            stream_completion(warmup, endpoint, request_body(args, WARMUP_PROMPT))

        if not args.json:
            print_table_header(args)
        for concurrency in args.concurrency:
            runs = [run_once(endpoint, args, concurrency) for _ in range(args.repeats)]
            record = summarize(args, concurrency, runs)
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print_table_row(record)
                sys.stdout.flush()
            warn_about(record)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
