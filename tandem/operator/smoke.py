"""`helm test`'s check of a running cluster: /health answers, then one short completion
through the OpenAI API. Exit status 0 when both hold; the reason on stderr otherwise."""

from __future__ import annotations

import argparse
import os
import sys

import httpx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="The gateway's HTTP base URL.")
    parser.add_argument("--ca", help="CA bundle to verify a TLS gateway with.")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    key = next((k.strip() for k in os.environ.get("TANDEM_API_KEY", "").split(",")
                if k.strip()), None)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout,
                      verify=args.ca or True) as http:
        try:
            health = http.get("/health")
            if health.status_code != 200:
                print(f"/health answered {health.status_code}: {health.text}", file=sys.stderr)
                return 1
            model = http.get("/v1/models").json()["data"][0]["id"]
            reply = http.post("/v1/completions", json={
                "model": model, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0})
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            print(f"the gateway at {args.url} failed: {e!r}", file=sys.stderr)
            return 1
    if reply.status_code != 200:
        print(f"/v1/completions answered {reply.status_code}: {reply.text}", file=sys.stderr)
        return 1
    text = reply.json()["choices"][0]["text"]
    print(f"ok: {model} completed {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
