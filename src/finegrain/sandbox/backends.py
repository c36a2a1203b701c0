"""The sandbox's editor and judge behind the backend interfaces of :mod:`finegrain.llm.backends`.

- :class:`SandboxEditor` (``finegrain edit --backend sandbox --model oracle``): the oracle
  minimal editor, which rewrites exactly the flawed spans of the rejected response.
- :class:`SandboxJudge` (``finegrain winrate --judge sandbox --model gold``): a noisy
  Bradley-Terry judge on the gold reward (the same model as the simulated annotators).

Both work from the prompt and response TEXT alone (the prompt's spec is parsed from it), are
deterministic, and cost no tokens. They are backend ``sandbox`` of the registry: :func:`register`
is this package's ``finegrain.backends`` entry point (pyproject.toml), and runs when this module
is imported, so the backend is there without installed metadata too.
"""
from __future__ import annotations

from ..llm.backends import EditRequest, EditResult, JudgeRequest, JudgeResult, register_backend
from .annotators import Annotator
from .domain import gold_score, parse_prompt
from .oracle import apply_replacements, oracle_replacements


class SandboxEditor:
    """Oracle minimal editor: ``edit(req)`` fixes every flawed span of ``req.response``.

    ``EditResult.raw`` holds a JSON list of the replacements made (start, end, kind), and
    ``item_meta(id)`` adds ``gold_spans`` and ``flaw_kinds`` to that pair's ``edit_meta``, so the
    flawed spans of the rejected response travel with the edit as gold labels.
    """

    name = "sandbox"
    prompt_version = "oracle-v1"
    remote = False      # no per-request timeouts
    cacheable = False   # free and deterministic: nothing to save by caching

    def __init__(self, model: str = "oracle"):
        if model != "oracle":
            from ..errors import ConfigError

            raise ConfigError(f"the sandbox editor has one model, 'oracle' (got {model!r})")
        self.model = model
        self._meta: dict[str, dict] = {}

    def item_meta(self, item_id: str) -> dict:
        return self._meta.get(item_id, {})

    async def edit(self, req: EditRequest) -> EditResult:
        return self.edit_sync(req)

    def edit_sync(self, req: EditRequest) -> EditResult:
        import json

        try:
            spec = parse_prompt(req.prompt)
        except ValueError as e:
            return EditResult(text=None, error=str(e))
        reps = oracle_replacements(spec, req.response)
        raw = json.dumps([[r.start, r.end, r.kind] for r in reps])
        self._meta[req.id] = {"gold_spans": [[r.start, r.end] for r in reps], "flaw_kinds": [r.kind for r in reps]}
        return EditResult(text=apply_replacements(req.response, reps), raw=raw)


def gold_spans(prompt: str, response: str) -> list[tuple[int, int]]:
    """Gold flawed character spans of ``response`` (empty when the prompt is not a sandbox prompt)."""
    try:
        return gold_score(prompt, response).flawed_spans
    except ValueError:
        return []


class SandboxJudge:
    """Gold judge: prefers the output with the higher gold reward, through noisy BT.

    noise:        expected disagreement with the gold order (0 = exact judge; ties then give 1.5)
    temperature:  BT temperature; by default calibrated from ``noise`` on the domain's reference pairs
    seed:         the judge's draws depend on (seed, request id, texts) only
    """

    name = "sandbox"
    prompt_version = "gold-bt-v1"
    remote = False
    cacheable = False

    def __init__(self, model: str = "gold", noise: float = 0.25, seed: int = 0, temperature: float | None = None):
        if model != "gold":
            from ..errors import ConfigError

            raise ConfigError(f"the sandbox judge has one model, 'gold' (got {model!r})")
        self.model = model
        self.annotator = Annotator(noise=noise, seed=seed, temperature=temperature)

    async def judge(self, req: JudgeRequest) -> JudgeResult:
        return self.judge_sync(req)

    def judge_sync(self, req: JudgeRequest) -> JudgeResult:
        try:
            first, r1, r2 = self.annotator.prefers_first(req.id, req.instruction, req.output_1, req.output_2)
        except ValueError as e:
            return JudgeResult(preference=1.5, error=str(e))
        pref = 1.5 if first is None else (1.0 if first else 2.0)
        return JudgeResult(preference=pref, raw=f"gold rewards {r1:.4g} vs {r2:.4g}")


def register() -> None:
    """Register :class:`SandboxEditor` and :class:`SandboxJudge` as backend ``sandbox`` (free; judge model 'gold')."""
    register_backend("sandbox", editor=SandboxEditor, judge=SandboxJudge, default_judge_model="gold")


register()
