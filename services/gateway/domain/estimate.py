"""``POST /v1/estimate``: what a chat completion would cost, without calling a model.

The body is a chat completion request, checked exactly as ``/v1/chat/completions``
checks it (the model in the catalogue, the prompt and ``max_tokens`` within the
model's limits). The prompt is counted with the gateway's tokenizer, the one admission
counts with (``sluice.tokens``); the output is a range: at least one token (the answer's
end), at most ``max_tokens``, or, without it, what the gateway reserves for the
request (``SLUICE_GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS``, within the model's limits). The
price is the price table's (``config/prices.yaml``) in exact nano-USD per component, as
the ledger prices a request, with every input token at the fresh input rate (a
provider's prompt cache can only lower it). A cache hit would cost nothing; the
estimate is for a call to the provider. A model without a price says so (``priced:
false``) and gives no amount rather than zero.
"""

from __future__ import annotations

from typing import Any

from sluice.common.v1 import chat_pb2
from sluice.pricing import PriceTable

from services.gateway.domain.chat import ChatService
from services.gateway.domain.usage import usd

MIN_OUTPUT_TOKENS = 1


class Estimator:
    def __init__(self, chat: ChatService, prices: PriceTable | None) -> None:
        self.chat = chat
        self.prices = prices

    def estimate(self, request: chat_pb2.ChatRequest) -> dict[str, Any]:
        budget = self.chat.budget(request)
        low_out = min(MIN_OUTPUT_TOKENS, budget.reserve_tokens)
        high_out = budget.reserve_tokens
        answer: dict[str, Any] = {
            "object": "estimate",
            "model": request.model,
            "input_tokens": budget.prompt_tokens,
            "output_tokens": {"min": low_out, "max": high_out},
        }
        price = self.prices.price_for(request.model) if self.prices is not None else None
        if self.prices is None or price is None:
            answer.update(priced=False, cost_usd=None, cost_usd_nanos=None, price_version=None)
            return answer
        low, high = (
            self.prices.price(
                request.model,
                chat_pb2.Usage(input_tokens=budget.prompt_tokens, output_tokens=out),
            ).total_nanos
            for out in (low_out, high_out)
        )
        answer.update(
            priced=True,
            cost_usd={"min": usd(low), "max": usd(high)},
            cost_usd_nanos={"min": low, "max": high},
            price_version=self.prices.version,
        )
        return answer
