"""A semantic cache's embeddings call, charged to the caller who caused it.

The rule (README, "Response caching"): the call is made on the caller's behalf, so it is one
request to the embeddings binding the cache names, charged to the **caller's tenant** on **that
binding's** quotas and budget, by the same charge rule as a request the caller sent there itself
(``extproc.admission``):

* before the call, one request and the text's estimated tokens (UTF-8 bytes / 4, an over-estimate)
  are reserved, priced at the binding's dearest backend; a tenant over a limit there gets no
  embeddings call at all (``EmbeddingMeter.reserve`` returns None) and its request simply misses
  the semantic lookup: the cache is an optimisation, never a reason to refuse a request;
* after it, the backend's reported prompt tokens are charged at the price of the backend that
  answered; an error answer costs the request and no tokens; a call that may have reached the
  backend and brought nothing back (a timeout, a broken answer, a cancel) costs the reservation;
  one that never connected is released;
* it counts in ``gen_ai_client_token_usage`` and ``crdgol_tokens_total`` under the embeddings
  binding, operation ``embeddings``, and the caller's tenant.
"""

from __future__ import annotations

import math

from extproc.admission import Admission, Outcome, QuotaExceeded
from extproc.cache_semantic import EmbeddingFailed, embedding_backend
from extproc.metrics import RequestLabels
from extproc.policy import Binding
from extproc.quota import Demand
from extproc.services import Services
from extproc.usage import Usage

__all__ = ["CallerMeter"]


class _Charge:
    def __init__(self, services: Services, admission: Admission, binding: Binding, tenant: str) -> None:
        self.services, self.admission, self.binding, self.tenant = services, admission, binding, tenant
        self.backend = embedding_backend(binding)

    def settle(self, tokens: int, failure: EmbeddingFailed | None) -> None:
        if failure is None:
            usage = Usage(input_tokens=tokens)
            self.admission.finish(Outcome.ANSWERED if tokens > 0 else Outcome.CUT_SHORT, usage, self.backend.id)
            labels = RequestLabels(
                tenant=self.services.current.metric_tenant(self.tenant),
                binding=self.binding.key,
                backend=self.backend.id,
                operation="embeddings",
                request_model=self.binding.model,
                response_model=self.backend.model,
            )
            self.services.metrics.record_usage(labels, tokens, 0)
        elif failure.status:
            self.admission.finish(Outcome.PROVIDER_ERROR, None, self.backend.id)
        elif failure.sent:
            self.admission.finish(Outcome.ABANDONED, None, self.backend.id)
        else:
            self.admission.release()


class CallerMeter:
    """``extproc.cache.EmbeddingMeter`` for one request of ``tenant`` (its qualified tenant)."""

    def __init__(self, services: Services, tenant: str) -> None:
        self.services = services
        self.tenant = tenant

    async def reserve(self, binding: Binding, text: str) -> _Charge | None:
        admission = Admission(self.services)
        estimate = math.ceil(len(text.encode()) / 4) + 1
        demand = Demand.used(estimate, 0, binding.max_price)
        try:
            await admission.admit(self.tenant, binding, {}, 0, demand=demand)
        except QuotaExceeded:
            return None
        return _Charge(self.services, admission, binding, self.tenant)

