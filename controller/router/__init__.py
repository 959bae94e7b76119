"""`dynamollm-router`: the OpenAI-compatible front door. Classifies each request, routes it to its class's
pool by the controller's routing table, holds a deadline-ordered queue per pool, measures TTFT/TBT and
reports arrivals and completions to the controller."""
