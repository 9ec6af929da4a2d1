#!/usr/bin/env python3
"""Compares greedy decoding of llmdoctor and a llama.cpp server on the same GGUF file.

Both servers get the same prompt token ids (chat-formatted by llmdoctor's /tokenize) and
decode greedily with EOS ignored. For each prompt the script reports how many leading tokens
agree. Over the agreeing steps it also reports |Δ log p| of the chosen token. A near tie at
one step ends the agreeing prefix, so the log-probability gap is the steadier figure. Only the
standard library is used.

    python3 bench/greedy_agreement.py --llmdoctor http://127.0.0.1:8092 \
        --llamacpp http://127.0.0.1:8091 --max-tokens 48
"""

import argparse
import json
import statistics
import urllib.error
import urllib.request

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "Name three prime numbers and explain why they are prime.",
    "What causes the seasons on Earth?",
    "Give me a tip for learning a new language.",
    "Describe a cat to someone who has never seen one.",
]


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        raise SystemExit(f"request to {url} failed with HTTP {err.code}: {err.read().decode(errors='replace')}")


def ours(base, ids, max_tokens):
    """Returns llmdoctor's greedy tokens (as text pieces) and their log-probabilities."""
    body = {
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
        "ignore_eos": True,
    }
    logprobs = post(base + "/v1/completions", body)["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


def theirs(base, ids, max_tokens):
    """Returns llama.cpp's greedy tokens (as text pieces) and their log-probabilities."""
    body = {
        "prompt": ids,
        "n_predict": max_tokens,
        "temperature": 0,
        "n_probs": 1,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    steps = post(base + "/completion", body)["completion_probabilities"]
    return [s["token"] for s in steps], [s["logprob"] for s in steps]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmdoctor", required=True, help="llmdoctor server URL")
    parser.add_argument("--llamacpp", required=True, help="llama.cpp server URL")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    prefixes, diffs = [], []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = post(args.llmdoctor + "/tokenize", {"messages": messages})["tokens"]
        our_tokens, our_logprobs = ours(args.llmdoctor, ids, args.max_tokens)
        their_tokens, their_logprobs = theirs(args.llamacpp, ids, args.max_tokens)
        agree = 0
        for a, b in zip(our_tokens, their_tokens):
            if a != b:
                break
            agree += 1
        prefixes.append(agree)
        diffs.extend(abs(a - b) for a, b in zip(our_logprobs[:agree], their_logprobs[:agree]))
        print(f"{agree:3d}/{args.max_tokens} tokens agree: {question}")
    print(
        json.dumps(
            {
                "prompts": len(QUESTIONS),
                "max_tokens": args.max_tokens,
                "identical_outputs": sum(p == args.max_tokens for p in prefixes),
                "median_agreeing_prefix": statistics.median(prefixes),
                "mean_abs_logprob_diff": statistics.fmean(diffs) if diffs else None,
                "max_abs_logprob_diff": max(diffs) if diffs else None,
            }
        )
    )


if __name__ == "__main__":
    main()
