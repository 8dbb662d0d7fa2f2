"""What extproc and the controller agree on for the workflow run API (defined once, here).

extproc authenticates a request to ``/v1/workflows/...``, then names the workflow route in the
route header and the caller's tenants (qualified, comma-separated) in ``TENANT_HEADER`` (overwriting whatever the client sent,
so it cannot be forged through the gateway); Envoy routes it to the controller's run API, which is
reachable only through Envoy (a Unix socket in the standalone stack) and trusts that header.
"""

from __future__ import annotations

PREFIX = "/v1/workflows"
# Route id of the run API: ':' cannot occur in a binding's route id (namespace.name).
ROUTE = "crdgol:workflows"
TENANT_HEADER = "x-crdgol-workflow-tenant"
# Names the step an egress request belongs to (its route carries the step's timeout and retries).
STEP_HEADER = "x-crdgol-workflow-step"
IDEMPOTENCY_HEADER = "idempotency-key"
# The SHA-256 (hex) of the API key the caller sent, set by extproc (removed for a JWT caller, so a
# client cannot send one): on a cluster the run API finds the Secret holding that key.
KEY_DIGEST_HEADER = "x-crdgol-workflow-key-digest"
# On a cluster the run API listens on TCP: Envoy's route to it adds this header with the
# controller's token, and the API serves nothing without it.
API_TOKEN_HEADER = "x-crdgol-workflow-api-token"
