"""Teacher protocol and the OpenAI-compatible teacher client (paper Sec. 4.1, "proprietary VLM").

Two teachers fit the curation jobs (:mod:`egm.curation.jobs`, :mod:`egm.curation.failures`):

* :class:`OpenAITeacher`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI,
  vLLM ``serve``, SGLang, LiteLLM, ...). The image goes as a base64 data URL in an ``image_url``
  content part, after the prompt text.
* :class:`egm.curation.oracle.OracleTeacher`, the synthetic world's oracle, which answers from the
  sample itself (``--teacher_class egm.curation.oracle:OracleTeacher``).

Both implement :class:`Teacher`: a ``model`` string (part of the cache key) and
``complete(request) -> Reply``. ``complete`` raises :class:`TeacherError` when no reply came back
(the job records the sample as failed and a rerun asks again); any other exception aborts the job.
A reply that came back but is unusable (empty, not in the asked format) is *not* an error here:
it was paid for, so it is cached and the job's parser records it as a failure.

The API key is a :class:`Secret`: its ``repr`` (hence the config's), ``--print_config`` and
every error or log line this module writes show ``**********`` instead (an endpoint that echoes
the key in an error body is redacted too). The key never enters the reply cache, the job's
failures or stats files.

Retries are tenacity's (visible in the log and counted in :attr:`OpenAITeacher.retries`): the
``openai`` client itself runs with ``max_retries=0``. Retried: HTTP 408/409/429/5xx, timeouts and
connection errors, with exponential backoff and jitter (a ``Retry-After`` header, when present and
within ``backoff_max``, is waited out instead). Not retried: other 4xx (400 bad request, 401 key,
404 model, ...), which the next attempt would only repeat.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from PIL import Image
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from egm.curation.draw import Overlay, load_and_draw, to_data_url
from egm.data.manifest import Sample
from egm.errors import InputError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class TeacherRequest:
    """One question to the teacher about one item.

    ``fields`` are the values the prompt template was filled with (the description under
    verification, the 0-999 boxes, the expansion guidance, ...): an oracle answers from
    ``job``, ``sample`` and ``fields`` without looking at pixels. ``overlays`` are drawn on the
    sample's image only when a teacher asks for :meth:`images` (a cache hit never draws).
    """

    job: str                    # template name, e.g. "vanilla_reasoning"
    item_id: str                # cache key part: the sample id (failure analysis: "<tag>/<id>")
    prompt_key: str             # cache key part: template "name@version"
    sample: Sample
    prompt: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    overlays: tuple[Overlay, ...] = ()

    def images(self) -> list[Image.Image]:
        """The sample's image with the overlays drawn (one image per request)."""
        return [load_and_draw(self.sample.image, self.overlays)]


@dataclass(frozen=True)
class Reply:
    """The teacher's answer text and the tokens it cost (0 when unknown, e.g. an oracle)."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None


class TeacherError(RuntimeError):
    """No usable reply came back for a request (after retries, or a non-retryable API error)."""

    def __init__(self, msg: str, status: int | None = None):
        super().__init__(msg)
        self.status = status


class Secret(str):
    """A string (an API key) that never shows itself: ``repr`` and the CLI's dumps give the mask.

    It is still a ``str`` for the code that needs the value (the ``openai`` client). On the
    command line it parses from the plain key; the mask itself is refused, so a printed config
    fed back cannot silently send ``**********`` as the key.
    """

    MASK = "**********"

    def __repr__(self) -> str:
        return repr(self.MASK)


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by the mask."""
    return text.replace(secret, Secret.MASK) if secret else text


def _secret_from_cli(value: Any) -> Secret:
    if value == Secret.MASK:
        raise InputError("refusing the mask as an API key: give the key itself, or set EGM_TEACHER_API_KEY")
    return Secret(value)


def _register_secret_type() -> None:
    from jsonargparse.typing import register_type  # the CLI's parser (a core dependency)

    register_type(Secret, serializer=lambda v: Secret.MASK, deserializer=_secret_from_cli)


_register_secret_type()


@runtime_checkable
class Teacher(Protocol):
    """What a curation job needs from a teacher."""

    model: str

    def complete(self, request: TeacherRequest) -> Reply: ...


@dataclass(frozen=True)
class TeacherConfig:
    """Endpoint, limits and prices of an OpenAI-compatible teacher.

    Unset ``model``/``base_url``/``api_key`` come from ``EGM_TEACHER_MODEL``,
    ``EGM_TEACHER_BASE_URL`` (else ``OPENAI_BASE_URL``) and ``EGM_TEACHER_API_KEY`` (else
    ``OPENAI_API_KEY``); prefer the environment for the key so it never lands in a config file.
    ``api_key`` is held as a :class:`Secret` (masked in the repr and in ``--print_config``).
    """

    model: str | None = None
    base_url: str | None = None
    api_key: Secret | None = None
    timeout: float = 120.0              # seconds per HTTP request
    max_attempts: int = 6               # tenacity: first try + 5 retries
    backoff_initial: float = 2.0        # seconds; doubles per retry, plus up to this much jitter
    backoff_max: float = 60.0
    max_tokens: int = 512
    temperature: float = 0.0
    image_format: str = "png"           # png (lossless box colours) or jpeg (smaller uploads)
    price_input_per_1m: float = 0.0     # USD per 1M prompt tokens
    price_output_per_1m: float = 0.0    # USD per 1M completion tokens

    def __post_init__(self) -> None:
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            object.__setattr__(self, "api_key", Secret(self.api_key))

    def resolved(self) -> TeacherConfig:
        """Fill unset fields from the environment and validate (fails before any request)."""
        env = os.environ
        cfg = replace(
            self,
            model=self.model or env.get("EGM_TEACHER_MODEL"),
            base_url=self.base_url or env.get("EGM_TEACHER_BASE_URL") or env.get("OPENAI_BASE_URL"),
            api_key=self.api_key or env.get("EGM_TEACHER_API_KEY") or env.get("OPENAI_API_KEY"),
        )
        if not cfg.model:
            raise InputError("teacher.model is not set (config or EGM_TEACHER_MODEL)")
        if not cfg.api_key:
            raise InputError("teacher.api_key is not set (config, EGM_TEACHER_API_KEY or OPENAI_API_KEY)")
        bad = [f"{k} {req} (got {getattr(cfg, k)!r})" for k, req, ok in (
            ("max_attempts", ">= 1", cfg.max_attempts >= 1), ("timeout", "> 0", cfg.timeout > 0),
            ("backoff_initial", ">= 0", cfg.backoff_initial >= 0), ("backoff_max", ">= 0", cfg.backoff_max >= 0),
            ("max_tokens", ">= 1", cfg.max_tokens >= 1), ("temperature", ">= 0", cfg.temperature >= 0),
            ("price_input_per_1m", ">= 0", cfg.price_input_per_1m >= 0),
            ("price_output_per_1m", ">= 0", cfg.price_output_per_1m >= 0),
        ) if not ok]
        if bad:  # name the keys only: never the whole config, which holds the key
            raise InputError("teacher: need " + ", ".join(f"teacher.{b}" for b in bad))
        if cfg.image_format.lower() not in ("png", "jpeg", "jpg"):
            raise InputError(f"teacher.image_format must be png or jpeg, got {cfg.image_format!r}")
        return cfg


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def is_retryable(exc: BaseException) -> bool:
    """429 / 408 / 409 / 5xx, timeouts and connection errors are worth another attempt."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRY_STATUS or exc.status_code >= 500
    return False


def _retry_after(exc: BaseException | None) -> float | None:
    resp = getattr(exc, "response", None)
    value = resp.headers.get("retry-after") if resp is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenAITeacher:
    """A :class:`Teacher` over ``openai.OpenAI(...).chat.completions`` (thread-safe)."""

    def __init__(self, config: TeacherConfig):
        import openai

        self.config = config.resolved()
        self.model: str = self.config.model  # type: ignore[assignment]
        self.client = openai.OpenAI(
            base_url=self.config.base_url, api_key=self.config.api_key, timeout=self.config.timeout, max_retries=0
        )
        self._lock = threading.Lock()
        self.retries: Counter[str] = Counter()  # reason ("429", "500", "timeout", ...) -> retries made
        exp = wait_exponential_jitter(
            initial=self.config.backoff_initial, max=self.config.backoff_max, jitter=self.config.backoff_initial
        )

        def wait(state: RetryCallState) -> float:
            after = _retry_after(state.outcome.exception() if state.outcome else None)
            if after is not None and after <= self.config.backoff_max:
                return after
            return exp(state)

        self._retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self.config.max_attempts),
            wait=wait,
            before_sleep=self._on_retry,
            reraise=True,
        )

    def _on_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = str(_status(exc)) if _status(exc) else type(exc).__name__
        with self._lock:
            self.retries[reason] += 1
        log.warning("teacher: attempt %d failed (%s: %s); retrying in %.1fs", state.attempt_number, reason,
                    redact(str(exc), self.config.api_key), state.next_action.sleep if state.next_action else 0.0)

    def _redact(self, text: str) -> str:
        return redact(text, self.config.api_key)

    def messages(self, request: TeacherRequest) -> list[dict[str, Any]]:
        """The chat messages of a request: prompt text, then each image as a data URL."""
        content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt}]
        for im in request.images():
            url = to_data_url(im, self.config.image_format)
            content.append({"type": "image_url", "image_url": {"url": url}})
        return [{"role": "user", "content": content}]

    def complete(self, request: TeacherRequest) -> Reply:
        import openai

        messages = self.messages(request)
        try:
            resp = self._retrying.copy()(
                self.client.chat.completions.create,
                model=self.model,
                messages=messages,
                max_tokens=self.config.max_tokens,
                temperature=self.config.temperature,
            )
        except openai.APIError as e:  # `from None`: the cause's text may echo the key, unredacted
            raise TeacherError(self._redact(f"{type(e).__name__}: {e}"), status=_status(e)) from None
        except ValueError as e:  # a 200 whose body is not JSON (a broken proxy/server): no reply
            raise TeacherError(self._redact(f"unreadable response body: {e}")) from None
        if not getattr(resp, "choices", None):
            raise TeacherError(self._redact(f"response without choices: {str(resp)[:200]}"))
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        return Reply(
            text=(choice.message.content or "") if choice.message else "",
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=choice.finish_reason,
        )


@dataclass
class UsageMeter:
    """Thread-safe request, token and cost counters of one job run.

    ``saved_*`` count what cache hits would have cost again (their recorded usage).
    """

    price_input_per_1m: float = 0.0
    price_output_per_1m: float = 0.0
    requests: int = 0
    cache_hits: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, reply: Reply, *, cached: bool) -> None:
        with self._lock:
            if cached:
                self.cache_hits += 1
                self.saved_input_tokens += reply.input_tokens
                self.saved_output_tokens += reply.output_tokens
            else:
                self.requests += 1
                self.input_tokens += reply.input_tokens
                self.output_tokens += reply.output_tokens

    def add_error(self) -> None:
        with self._lock:
            self.errors += 1

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens / 1e6 * self.price_input_per_1m + output_tokens / 1e6 * self.price_output_per_1m

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "cache_hits": self.cache_hits,
                "errors": self.errors,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cost_usd": round(self.cost(self.input_tokens, self.output_tokens), 6),
                "saved_cost_usd": round(self.cost(self.saved_input_tokens, self.saved_output_tokens), 6),
            }
