"""Served-benchmark workloads: BENCH.md's `concurrency` and `agent`, and custom specs.

A `WorkloadSpec` says what to send; `build_jobs` turns it, for one load level and seed,
into concrete jobs whose token ids, lengths and tool pauses are all drawn up front, so
every engine given the same seed receives byte-identical work. Prompts are token-id
lists for `/v1/completions`.

Two kinds of job:

- `RequestJob`: one completion (prompt = shared prefix + its own ids).
- `SessionJob`: an agent session run client-side. Turn 1 sends shared prefix + task;
  each of the first `turns - 1` turns asks for `tool_call_len` tokens, then the client
  sleeps the tool pause, appends the call's tokens and a `tool_result_len`-token tool
  result, and sends the grown history again; the last turn asks for `final_answer_len`
  tokens. So `turns` counts requests per session, the final answer included (BENCH.md's
  16 x 6 agent workload then ends at ~3,800 tokens, inside a 4,096-token context).

A custom spec is YAML or JSON with the fields of `WorkloadSpec` (see `spec_from_dict`);
lengths are an int or one of `{uniform: [lo, hi]}`, `{choice: [a, b, ...]}`,
`{lognormal: {median: m, sigma: s}}`; the tool pause is `{median_s: m, sigma: s}`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from agentcpu.errors import AgentCPUError

# Ids every checkpoint we benchmark holds as ordinary tokens (see benchmarks/peers/).
DEFAULT_TOKEN_RANGE = (300, 900)
History = Literal["synthetic", "returned"]
Kind = Literal["requests", "sessions"]


class WorkloadError(AgentCPUError, ValueError):
    """A workload spec is malformed or names an unknown workload."""


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed, uniform [lo, hi], choice, or log-normal."""

    kind: Literal["fixed", "uniform", "choice", "lognormal"]
    values: tuple[float, ...]

    @classmethod
    def parse(cls, value: Any, name: str) -> LengthDist:
        if isinstance(value, LengthDist):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls._checked("fixed", (value,), name)
        if isinstance(value, dict) and len(value) == 1:
            kind, params = next(iter(value.items()))
            if kind == "uniform" and isinstance(params, list | tuple) and len(params) == 2:
                return cls._checked("uniform", tuple(params), name)
            if kind == "choice" and isinstance(params, list | tuple) and params:
                return cls._checked("choice", tuple(params), name)
            if kind == "lognormal" and isinstance(params, dict):
                return cls._checked(
                    "lognormal", (params.get("median"), params.get("sigma", 0.0)), name
                )
        raise WorkloadError(
            f"{name}: expected an int or {{uniform: [lo, hi]}} / {{choice: [...]}} / "
            f"{{lognormal: {{median, sigma}}}}, got {value!r}"
        )

    @classmethod
    def _checked(cls, kind, values: tuple, name: str) -> LengthDist:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise WorkloadError(f"{name}: {kind} parameters must be numbers, got {values!r}")
        if kind == "lognormal":
            if values[0] < 1 or values[1] < 0:
                raise WorkloadError(f"{name}: lognormal needs median >= 1 and sigma >= 0")
        elif min(values) < 1 or (kind == "uniform" and values[0] > values[1]):
            raise WorkloadError(f"{name}: lengths must be >= 1 (and lo <= hi), got {values!r}")
        return cls(kind, tuple(values))

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.values[0])
        if self.kind == "uniform":
            return rng.randint(int(self.values[0]), int(self.values[1]))
        if self.kind == "choice":
            return int(rng.choice(self.values))
        median, sigma = self.values
        return max(1, round(median * math.exp(sigma * rng.gauss(0.0, 1.0))))

    def typical(self) -> int:
        """The middle of the distribution: the value, the midpoint, the middle choice or
        the log-normal's median."""
        if self.kind == "uniform":
            return int(sum(self.values) / 2)
        if self.kind == "choice":
            return int(sorted(self.values)[len(self.values) // 2])
        return int(self.values[0])

    def describe(self) -> Any:
        if self.kind == "fixed":
            return int(self.values[0])
        if self.kind == "lognormal":
            return {"lognormal": {"median": self.values[0], "sigma": self.values[1]}}
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class PauseDist:
    """Log-normal tool pause in seconds; `median_s` 0 means no pause."""

    median_s: float = 0.0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.median_s < 0 or self.sigma < 0:
            raise WorkloadError(f"tool_pause needs median_s >= 0 and sigma >= 0, got {self}")

    def sample(self, rng: random.Random) -> float:
        if self.median_s == 0:
            return 0.0
        return self.median_s * math.exp(self.sigma * rng.gauss(0.0, 1.0))


@dataclass(frozen=True)
class Level:
    """One load level: closed loop with `concurrency` jobs in flight, or open loop at
    `rate` job arrivals per second (Poisson), optionally capped at `concurrency`."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"c={self.concurrency}"
        cap = f",max={self.concurrency}" if self.concurrency else ""
        return f"rate={self.rate:g}/s{cap}"

    @property
    def x(self) -> float:
        """Where this level sits on a throughput-vs-load plot."""
        return float(self.rate if self.rate is not None else self.concurrency or 0)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    kind: Kind = "requests"
    seed: int = 0
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    shared_prefix_len: int = 0
    # requests kind: prompt = shared prefix + prompt_len ids
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", (128,)))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", (256,)))
    requests_per_stream: int = 1  # closed loop: jobs per level = concurrency x this
    num_requests: int | None = None  # overrides the above; required with arrival_rate
    # sessions kind
    sessions: int = 16
    turns: int = 6
    task_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", (150,)))
    tool_call_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", (48,)))
    tool_result_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", (300,)))
    final_answer_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", (128,)))
    tool_pause: PauseDist = PauseDist()
    history: History = "synthetic"
    # load levels: closed loop at each concurrency, or open loop at each arrival rate
    concurrency: tuple[int, ...] = (1,)
    arrival_rate: tuple[float, ...] = ()
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.kind in ("requests", "sessions"),
            f"kind must be requests|sessions, got {self.kind!r}",
        )
        _check(
            self.history in ("synthetic", "returned"),
            f"history must be synthetic|returned, got {self.history!r}",
        )
        lo, hi = self.token_range
        _check(
            0 <= lo < hi, f"token_range must be [lo, hi) with 0 <= lo < hi, got {self.token_range}"
        )
        _check(self.shared_prefix_len >= 0, "shared_prefix_len must be >= 0")
        _check(self.requests_per_stream >= 1, "requests_per_stream must be >= 1")
        _check(self.num_requests is None or self.num_requests >= 1, "num_requests must be >= 1")
        _check(self.sessions >= 1 and self.turns >= 1, "sessions and turns must be >= 1")
        _check(all(c >= 1 for c in self.concurrency), "concurrency levels must be >= 1")
        _check(all(r > 0 for r in self.arrival_rate), "arrival rates must be > 0")
        _check(
            bool(self.concurrency or self.arrival_rate), "give concurrency or arrival_rate levels"
        )
        _check(self.max_in_flight is None or self.max_in_flight >= 1, "max_in_flight must be >= 1")
        _check(
            not (self.arrival_rate and self.kind == "requests" and self.num_requests is None),
            "an arrival_rate workload of kind requests needs num_requests",
        )

    def levels(self) -> list[Level]:
        if self.arrival_rate:
            return [Level(self.max_in_flight, rate) for rate in self.arrival_rate]
        return [Level(c) for c in self.concurrency]

    def jobs_per_level(self, level: Level) -> int:
        if self.kind == "sessions":
            return self.sessions
        if self.num_requests is not None:
            return self.num_requests
        return (level.concurrency or 1) * self.requests_per_stream

    def requests_per_level(self, level: Level) -> int:
        return self.jobs_per_level(level) * (self.turns if self.kind == "sessions" else 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, LengthDist):
                out[f.name] = value.describe()
            elif isinstance(value, tuple):
                out[f.name] = list(value)
        return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise WorkloadError(message)


# ---- jobs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestJob:
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Turn:
    """One request of a session; `tool_result` (with `pause_s`) follows unless last."""

    max_tokens: int
    synthetic_output: list[int]
    pause_s: float = 0.0
    tool_result: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SessionJob:
    session: int
    first_prompt: list[int]
    turns: list[Turn]


Job = RequestJob | SessionJob


def build_jobs(spec: WorkloadSpec, level: Level, seed: int | None = None) -> list[Job]:
    """The jobs of one level, fully drawn from `seed` (default: the spec's)."""
    rng = random.Random(spec.seed if seed is None else seed)
    prefix = _ids(rng, spec.token_range, spec.shared_prefix_len)
    count = spec.jobs_per_level(level)
    if spec.kind == "requests":
        return [_request_job(spec, rng, prefix) for _ in range(count)]
    return [_session_job(spec, rng, prefix, index) for index in range(count)]


def _ids(rng: random.Random, token_range: tuple[int, int], n: int) -> list[int]:
    lo, hi = token_range
    return [rng.randrange(lo, hi) for _ in range(n)]


def _request_job(spec: WorkloadSpec, rng: random.Random, prefix: list[int]) -> RequestJob:
    prompt = prefix + _ids(rng, spec.token_range, spec.prompt_len.sample(rng))
    return RequestJob(prompt, spec.output_len.sample(rng))


def _session_job(
    spec: WorkloadSpec, rng: random.Random, prefix: list[int], index: int
) -> SessionJob:
    task = _ids(rng, spec.token_range, spec.task_len.sample(rng))
    turns = []
    for number in range(1, spec.turns + 1):
        final = number == spec.turns
        out_len = (spec.final_answer_len if final else spec.tool_call_len).sample(rng)
        output = _ids(rng, spec.token_range, out_len)
        if final:
            turns.append(Turn(out_len, output))
        else:
            pause = spec.tool_pause.sample(rng)
            result = _ids(rng, spec.token_range, spec.tool_result_len.sample(rng))
            turns.append(Turn(out_len, output, pause, result))
    return SessionJob(index, prefix + task, turns)


# ---- built-in and custom specs -------------------------------------------------------

BUILTIN: dict[str, dict[str, Any]] = {
    "concurrency": {
        "kind": "requests", "prompt_len": 128, "output_len": 256,
        "concurrency": [1, 4, 16, 32, 64],
    },
    "agent": {
        "kind": "sessions", "sessions": 16, "turns": 6, "shared_prefix_len": 1800,
        "task_len": 150, "tool_call_len": 48, "tool_result_len": 300, "final_answer_len": 128,
        "tool_pause": {"median_s": 0.3, "sigma": 0.8}, "concurrency": [16],
    },
    # 64 sessions whose contexts together need about twice the KV budget that
    # `agentcpu bench agent --pressure` gives each engine (see pressure_kv_cache_gib)
    "agent-pressure": {
        "kind": "sessions", "sessions": 64, "turns": 6, "shared_prefix_len": 1800,
        "task_len": 150, "tool_call_len": 48, "tool_result_len": 300, "final_answer_len": 128,
        "tool_pause": {"median_s": 0.3, "sigma": 0.8}, "concurrency": [64],
    },
}  # fmt: skip


def final_context_tokens(spec: WorkloadSpec) -> int:
    """Tokens in one session's context after its last turn (typical lengths)."""
    middle = spec.turns - 1
    return (spec.shared_prefix_len + spec.task_len.typical()
            + middle * follow_up_new_tokens(spec) + spec.final_answer_len.typical())  # fmt: skip


def follow_up_new_tokens(spec: WorkloadSpec) -> int:
    """What a follow-up turn appends: the model's tool call and the tool's result."""
    return spec.tool_call_len.typical() + spec.tool_result_len.typical()


def mid_session_context_tokens(spec: WorkloadSpec) -> int:
    """The context a middle follow-up turn starts from (typical lengths)."""
    return (spec.shared_prefix_len + spec.task_len.typical()
            + (spec.turns - 1) // 2 * follow_up_new_tokens(spec))  # fmt: skip


def pressure_kv_cache_gib(spec: WorkloadSpec, kv_bytes_per_token: int, share: float = 0.5) -> float:
    """A KV budget holding `share` of all sessions' final contexts (the shared prefix
    counted once), so sessions waiting on tools compete for memory."""
    per_session = final_context_tokens(spec) - spec.shared_prefix_len
    tokens = spec.shared_prefix_len + spec.sessions * per_session
    return share * tokens * kv_bytes_per_token / 2**30

_LENGTH_FIELDS = (
    "prompt_len",
    "output_len",
    "task_len",
    "tool_call_len",
    "tool_result_len",
    "final_answer_len",
)
_TUPLE_FIELDS = ("token_range", "concurrency", "arrival_rate")


def spec_from_dict(data: dict[str, Any], default_name: str = "custom") -> WorkloadSpec:
    """Validate a plain mapping (parsed YAML/JSON) into a `WorkloadSpec`."""
    if not isinstance(data, dict):
        raise WorkloadError(f"a workload spec must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(WorkloadSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise WorkloadError(
            f"unknown workload fields: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = dict(data)
    values.setdefault("name", default_name)
    for name in _LENGTH_FIELDS:
        if name in values:
            values[name] = LengthDist.parse(values[name], name)
    for name in _TUPLE_FIELDS:
        if name in values:
            raw = values[name]
            values[name] = tuple(raw) if isinstance(raw, list | tuple) else (raw,)
    if "tool_pause" in values and not isinstance(values["tool_pause"], PauseDist):
        values["tool_pause"] = _pause(values["tool_pause"])
    if "arrival_rate" in values and "concurrency" not in values:
        values["concurrency"] = ()
    try:
        return WorkloadSpec(**values)
    except TypeError as exc:
        raise WorkloadError(f"bad workload spec: {exc}") from None


def _pause(value: Any) -> PauseDist:
    if not isinstance(value, dict) or set(value) - {"median_s", "sigma"}:
        raise WorkloadError(f"tool_pause must be {{median_s, sigma}}, got {value!r}")
    return PauseDist(float(value.get("median_s", 0.0)), float(value.get("sigma", 0.0)))


def load_workload(name_or_path: str, overrides: dict[str, Any] | None = None) -> WorkloadSpec:
    """A built-in workload by name, or a YAML/JSON spec file; `overrides` replace fields."""
    if name_or_path in BUILTIN:
        data = {"name": name_or_path, **BUILTIN[name_or_path]}
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise WorkloadError(
                f"no built-in workload or spec file {name_or_path!r}; built-in: {', '.join(BUILTIN)}"
            )
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
    merged = {**data, **(overrides or {})}
    if overrides and "arrival_rate" in overrides and "concurrency" not in overrides:
        merged.pop("concurrency", None)
    return spec_from_dict(merged)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["output_len=64", "concurrency=[1,4]"]` -> {"output_len": 64, "concurrency": [1, 4]}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise WorkloadError(f"override {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def level_seed(base_seed: int, round_index: int, level_index: int) -> int:
    """Fresh prompts per round and level (no engine's cache helps across them), the same
    for every engine within one round and level."""
    return base_seed * 1_000_003 + round_index * 1_009 + level_index
