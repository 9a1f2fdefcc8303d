"""The chat endpoint as the labeller uses it: the `openai` client (whose own retries, with exponential backoff on
timeouts, connection errors and 408/409/429/5xx, are the retry policy), a preflight that names a wrong URL or model in
one line before any work, and a record of the time spent inside requests (for `outside_endpoint_fraction`)."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from pipeline.errors import SaepipeError

log = logging.getLogger(__name__)


class EndpointError(SaepipeError):
    """The endpoint cannot be used: unreachable, rejecting the key or the model, or failing after every retry."""


@dataclass(frozen=True)
class EndpointSpec:
    base_url: str
    model: str
    api_key: str | None
    timeout_s: float
    max_retries: int
    temperature: float


def resolve_endpoint(cfg, *, base_url: str | None = None, model: str | None = None) -> EndpointSpec:
    """The endpoint of an EndpointConfig, with what the environment supplies for unset fields."""
    from pipeline.errors import ConfigError

    url = base_url or cfg.base_url or os.environ.get("SAEPIPE_LABEL_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    name = model or cfg.model or os.environ.get("SAEPIPE_LABEL_MODEL")
    if not url:
        raise ConfigError("endpoint.base_url: unset (and no $SAEPIPE_LABEL_BASE_URL or $OPENAI_BASE_URL); give the "
                          "endpoint's API root, e.g. http://127.0.0.1:8000/v1, or endpoint.serve to start one here")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint.base_url: {url!r} is not an http(s) URL")
    if not name:
        raise ConfigError("endpoint.model: unset (and no $SAEPIPE_LABEL_MODEL); give the model name the endpoint "
                          "serves")
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return EndpointSpec(url.rstrip("/"), name, key, cfg.timeout_s, cfg.max_retries, cfg.temperature)


class Endpoint:
    def __init__(self, spec: EndpointSpec):
        import openai

        self.spec = spec
        # A local server takes any key; the client refuses to start without one.
        self._client = openai.OpenAI(base_url=spec.base_url, api_key=spec.api_key or "none",
                                     timeout=spec.timeout_s, max_retries=spec.max_retries)
        self._lock = threading.Lock()
        self.intervals: list[tuple[float, float]] = []  # (start, end) perf_counter of every request
        self.requests = 0

    def check(self) -> None:
        """One tiny request: the URL answers, the key is accepted, the model is known."""
        self.chat([{"role": "user", "content": "Say OK."}], max_tokens=1)

    def chat(self, messages: list[dict], *, max_tokens: int) -> str:
        """The answer's text ("" when the endpoint returns no content: a malformed answer, not an error)."""
        import openai

        start = time.perf_counter()
        try:
            response = self._client.chat.completions.create(model=self.spec.model, messages=messages,
                                                            max_tokens=max_tokens, temperature=self.spec.temperature)
        except openai.APITimeoutError:
            raise EndpointError(f"{self.spec.base_url}: no answer within {self.spec.timeout_s:g} s, "
                                f"{self.spec.max_retries} retries included (endpoint.timeout_s)") from None
        except openai.APIConnectionError as err:
            cause = " ".join(str(err.__cause__ or err).split())
            raise EndpointError(f"{self.spec.base_url}: endpoint unreachable after {self.spec.max_retries} retries "
                                f"({cause})") from None
        except openai.AuthenticationError as err:
            raise EndpointError(f"{self.spec.base_url}: rejected the API key (HTTP {err.status_code}); set it in "
                                "the variable endpoint.api_key_env names") from None
        except (openai.NotFoundError, openai.BadRequestError, openai.UnprocessableEntityError) as err:
            raise EndpointError(f"{self.spec.base_url}: refused model {self.spec.model!r} or the request (HTTP "
                                f"{err.status_code}: {_detail(err)})") from None
        except openai.APIStatusError as err:
            raise EndpointError(f"{self.spec.base_url}: HTTP {err.status_code} after {self.spec.max_retries} "
                                f"retries ({_detail(err)})") from None
        finally:
            with self._lock:
                self.intervals.append((start, time.perf_counter()))
                self.requests += 1
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        return (getattr(message, "content", None) or "") if message is not None else ""

    def busy_seconds(self, since: float = 0.0) -> float:
        """Wall time during which at least one request was in flight (overlapping requests counted once)."""
        with self._lock:
            spans = sorted((max(a, since), b) for a, b in self.intervals if b > since)
        total, end = 0.0, float("-inf")
        for a, b in spans:
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total


def _detail(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        text = (error.get("message") if isinstance(error, dict) else None) or body.get("detail") or body.get("message")
        if text:
            return " ".join(str(text).split())[:300]
    return " ".join(str(getattr(err, "message", err)).split())[:300]
