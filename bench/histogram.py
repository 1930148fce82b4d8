#!/usr/bin/env python3
"""Quantiles of grpc_server_handling_seconds between two /metrics scrapes.

  histogram.py BEFORE AFTER METHOD [CODE ...]
prints, for each code, the calls and p50/p99 (linear inside a bucket).
"""
import re
import sys

LINE = re.compile(r'^grpc_server_handling_seconds_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def buckets(path, method, code):
    out = {}
    for line in open(path):
        m = LINE.match(line.strip())
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in m["labels"].split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("grpc_method") != method or labels.get("grpc_code") != code:
            continue
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        out[le] = float(m["value"])
    return out


def quantile(cum, q):
    total = cum[-1][1]
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in cum:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            width = n - prev_n
            frac = (rank - prev_n) / width if width else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_n = le, n
    return prev_le


def main():
    before, after, method, *codes = sys.argv[1:]
    for code in codes or ["OK"]:
        b, a = buckets(before, method, code), buckets(after, method, code)
        cum = sorted((le, a[le] - b.get(le, 0.0)) for le in a)
        if not cum or cum[-1][1] == 0:
            print(f"{method} {code}: no calls")
            continue
        p50, p99 = quantile(cum, 0.50) * 1000, quantile(cum, 0.99) * 1000
        print(f"{method} {code}: {int(cum[-1][1])} calls, p50 {p50:.2f} ms, p99 {p99:.2f} ms")


main()
