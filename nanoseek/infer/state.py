"""What the routes and the gate of one server share: the served model, its limits, the engine loop, metrics."""

from __future__ import annotations

import time
from typing import Any, Iterable

from .engine_loop import EngineLoop
from .gate import DEFAULT_MAX_BODY_BYTES, host_name
from .metrics import Metrics
from .protocol import APIError
from .streams import Admission
from .validation import RequestLimits, max_token_bytes


class ServerState:
    """One server's state: built by :func:`~nanoseek.infer.server.create_app`, kept in ``app.state.server``."""

    def __init__(self, engine, tokenizer, model_name: str, api_key: str | None, max_queue: int,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts: Iterable[str] | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.max_body_bytes = int(max_body_bytes)
        self.allowed_hosts = None if allowed_hosts is None else tuple(dict.fromkeys(
            host_name(h) for h in allowed_hosts))
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key or None
        self.max_seq_len = int(engine.max_seq_len)
        self.limits = RequestLimits(self.max_seq_len, int(engine.config.vocab_size), max_token_bytes(tokenizer))
        self.metrics = Metrics()
        self.loop = EngineLoop(engine, self.metrics)
        max_slots = int(getattr(engine, "max_slots", 0) or engine.cache.n_slots)
        eos_ids = frozenset(getattr(engine, "eos_token_ids", ()) or ())
        self.admission = Admission(self.loop, self.metrics, max_slots, max_queue, eos_ids)
        self.created = int(time.time())

    @property
    def in_flight(self) -> int:
        """Generations accepted and not finished (each choice of each prompt counts)."""
        return self.admission.in_flight

    def check_model(self, name: str | None) -> None:
        """404 for a model other than the one served (None: the served one)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist. This server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        """The served model as ``/v1/models`` lists it."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.max_seq_len}
