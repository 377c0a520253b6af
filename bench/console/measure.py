#!/usr/bin/env python3
"""Signs in to the console of a running `tandem server` and times the device list page.

usage: measure.py URL ADMIN_TOKEN REQUESTS DEVICES  -> JSON list of per-view results on stdout

The server's own time comes from its `Server-Timing: app;dur=MS` header; the wall time is
what this client saw. Each response must be a 200 with a device table, so an error page
cannot pass for a fast one.
"""
import http.client
import json
import re
import sys
import time
import urllib.parse

url, token, requests, devices = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host = urllib.parse.urlparse(url)
conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)


def request(method, path, body=None, cookie=None):
    headers = {}
    if cookie:
        headers["Cookie"] = cookie
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r, data


def cookie_of(r, name):
    for k, v in r.getheaders():
        if k.lower() == "set-cookie" and v.startswith(name + "="):
            return v.split(";", 1)[0]
    raise SystemExit(f"no {name} cookie")


r, page = request("GET", "/console/login")
login = cookie_of(r, "tandem_console_login")
csrf = re.search(rb'name="csrf" value="([0-9a-f]+)"', page).group(1).decode()
form = urllib.parse.urlencode({"token": token, "csrf": csrf, "next": "/console/devices"})
r, _ = request("POST", "/console/login", form, login)
if r.status != 303:
    raise SystemExit(f"sign-in answered {r.status}")
session = cookie_of(r, "tandem_console")

last = max(1, (devices + 49) // 50)
views = [
    ("first page", "/console/devices"),
    (f"page {last // 2} (offset)", f"/console/devices?page={last // 2}"),
    ("sorted by last check-in", "/console/devices?sort=last-checkin&order=desc"),
    ("search (substring)", "/console/devices?q=sim-1"),
    ("state filter + sort", "/console/devices?status=active&sort=hostname&page=3"),
]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


out = []
for name, path in views:
    server, wall, size = [], [], 0
    for _ in range(5):  # warm caches
        request("GET", path, cookie=session)
    for _ in range(requests):
        t0 = time.perf_counter()
        r, body = request("GET", path, cookie=session)
        wall.append((time.perf_counter() - t0) * 1000)
        if r.status != 200 or b'id="devices"' not in body:
            raise SystemExit(f"{path} answered {r.status}")
        timing = r.getheader("Server-Timing") or ""
        m = re.search(r"app;dur=([0-9.]+)", timing)
        if not m:
            raise SystemExit(f"{path}: no Server-Timing header")
        server.append(float(m.group(1)))
        size = len(body)
    out.append({
        "view": name, "devices": devices, "n": requests,
        "p50": pct(server, 50), "p99": pct(server, 99),
        "wall_p50": pct(wall, 50), "wall_p99": pct(wall, 99), "bytes": size,
    })
json.dump(out, sys.stdout)
