"""Merges the JSON summaries of several load generators that ran one W4
storm together (scripts/bench-load.sh with LOADGENS): clients and events
add up, the time until all are back is the slowest one's, the fleet-wide
counters (requests, server CPU) come from the generator that watched the
servers (the first), divided by every generator's resumes."""
import json
import sys

runs = [json.load(open(p)) for p in sys.argv[1:]]
first = runs[0]
total = lambda k: sum(r.get(k, 0) or 0 for r in runs)
storms = [r["storm"] for r in runs]
resumed = sum(s["resumed"] for s in storms)
merged = {
    "scenario": "w4",
    "loadgens": len(runs),
    "clients": total("clients_reported"),
    "all_back": all(s["all_back"] for s in storms),
    "dropped": sum(s["dropped"] for s in storms),
    "resumed": resumed,
    "seconds_until_all_back": max(s["seconds_until_all_back"] for s in storms),
}
merged["resumes_per_s"] = round(resumed / max(merged["seconds_until_all_back"], 1e-3), 1)
# Resumes over time: the generators sample every 250 ms from the same moment.
timeline = {}
for s in storms:
    for t, n in s["resumed_over_time"]:
        key = round(round(t * 4) / 4, 2)
        timeline[key] = timeline.get(key, 0) + n
merged["resumed_over_time"] = sorted(timeline.items())
req = first["storm"].get("requests")
if req:
    # The counters are fleet-wide; the first generator's window covers the storm.
    widest = max((s["requests"] for s in storms if s.get("requests")), key=lambda r: r["js_api"] + r["edge_direct_gets"])
    merged["requests"] = {
        k: widest[k] for k in ("js_api", "nats_in_msgs", "edge_direct_gets", "edge_stream_infos", "edge_subject_counts")
    }
    if resumed:
        merged["requests"]["js_api_per_resume"] = round(widest["js_api"] / resumed, 2)
        merged["requests"]["edge_log_requests_per_resume"] = round(
            (widest["edge_direct_gets"] + widest["edge_stream_infos"] + widest["edge_subject_counts"]) / resumed, 2
        )
        merged["requests"]["nats_in_msgs_per_resume"] = round(widest["nats_in_msgs"] / resumed, 2)
merged["storm_cpu_seconds"] = first["storm"]["cpu_seconds"]
merged["bystander_latency_us"] = [s["bystander_latency_us"] for s in storms]
for k in ("expected", "unique", "lost", "unexpected", "duplicated", "out_of_order", "clients_failed", "retries", "resumed_not_recovered"):
    merged[k] = total(k)
merged["latency_us_p99_max"] = max(r["latency_us"].get("p99") or 0 for r in runs)
merged["rss_kib_before"] = first["storm"].get("rss_kib_before")
merged["rss_kib_after"] = first["storm"].get("rss_kib_after")
merged["rss_kib_end"] = first.get("rss_kib_end")
merged["load_average"] = first["storm"]["load_average"]
print(json.dumps(merged))
