"""The gateway's paths, named once (metric labels, error shapes and idempotency
fingerprints depend on them)."""

CHAT_ROUTE = "/v1/chat/completions"
MESSAGES_ROUTE = "/v1/messages"
JOBS_ROUTE = "/v1/jobs"
MCP_ROUTE = "/mcp"
CONSOLE_ROUTE = "/console"
# The routes that answer from the data path, so always say what the cache did.
ANSWER_ROUTES = frozenset({CHAT_ROUTE, MESSAGES_ROUTE})
# Route labels are fixed strings (a path's ids become {id}): raw paths would explode
# metric cardinality.
LABELLED_ROUTES = frozenset(
    {
        *ANSWER_ROUTES,
        JOBS_ROUTE,
        "/v1/models",
        "/v1/usage",
        "/v1/estimate",
        "/v1/webhooks/secret",
        "/v1/me",
        "/v1/cache",
        "/v1/cache/invalidate",
        "/v1/providers",
        MCP_ROUTE,
        "/healthz",
        "/readyz",
        "/metrics",
    }
)
# Routes with an id in the path: (prefix, what follows the id, label).
TEMPLATED_ROUTES = (
    ("/v1/jobs/", "", "/v1/jobs/{id}"),
    ("/v1/jobs/", "/events", "/v1/jobs/{id}/events"),
    ("/v1/jobs/", "/cancel", "/v1/jobs/{id}/cancel"),
    ("/v1/streams/", "", "/v1/streams/{id}"),
    ("/v1/traces/", "", "/v1/traces/{id}"),
)
# Probes and scrapes are not traced: they would bury the request traces.
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


ADMIN_PREFIX = "/v1/admin/"
# Admin routes by their resource (ids in the path never become labels).
ADMIN_LABELS = ("teams", "keys", "audit")


def admin_route_label(path: str) -> str | None:
    if not path.startswith(ADMIN_PREFIX):
        return None
    resource = path[len(ADMIN_PREFIX) :].split("/", 1)[0]
    return ADMIN_PREFIX + resource if resource in ADMIN_LABELS else None


def route_label(path: str) -> str:
    """The route a path matched, as a metric and span label."""
    if path in LABELLED_ROUTES:
        return path
    if path == "/docs" or path.startswith("/docs/"):
        return "/docs"
    if path.startswith(MCP_ROUTE + "/"):
        return MCP_ROUTE
    if path == CONSOLE_ROUTE or path.startswith(CONSOLE_ROUTE + "/"):
        return CONSOLE_ROUTE
    admin = admin_route_label(path)
    if admin is not None:
        return admin
    for prefix, suffix, label in TEMPLATED_ROUTES:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            ident = rest.removesuffix(suffix) if suffix else rest
            if ident and "/" not in ident and (not suffix or rest.endswith(suffix)):
                return label
    return "unmatched"


def is_messages_path(path: str) -> bool:
    """Anthropic clients parse only their own error shape, on the route and beneath it
    (an SDK calling /v1/messages/count_tokens gets its 404 in that shape too)."""
    return path == MESSAGES_ROUTE or path.startswith(MESSAGES_ROUTE + "/")
