"""Exercise checks: seeded cases on the learner's functions and classes, with feedback per check.

Every exercise in ``solutions/`` (and in the generated ``exercises/``) ends with a checker cell::

    from course_lib.checks import check
    check("schedule_comparator", ScheduleComparator)

An `Exercise` (``course_lib/checks/*.py``) is a list of checks, each a small function with a name,
points and a hint. A check calls the learner's code only through `Run` (``run.call``,
``run.get``, ``run.vjp``), which goes through an agent (``course_tools/agent.py``) and gets plain
data back; then it compares with the check's own reference implementation (``run.close``,
``run.equal``, ``run.expect``). The first problem raises `Failed` with what was expected, what came
and, where the check knows the usual mistake, a hint.

- A check passes or fails as a whole and earns its points; an exercise's score is the sum.
- Wrong types or shapes, NaNs, exceptions in the learner's code, tensors changed in place and
  calls that run too long are all reported as feedback in the table, never as a traceback.
- Printed text is never looked at; warnings are recorded and never fail a check.
- Cases are drawn from seeds: a notebook uses `FEEDBACK_SEEDS`, the grader draws its own, so an
  answer written for one seed's numbers fails.

``docs/grading.md`` explains how the grader runs the same checks against a sandboxed kernel.
"""

from __future__ import annotations

import hashlib
import html
import math
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from course_tools.agent import LocalAgent, Probe, Ref, from_wire

FEEDBACK_SEEDS = (11, 22, 33)  # seeds of the checks run inside a notebook; the grader draws its own
DEFAULT_CALL_TIMEOUT = 10.0  # seconds one call into the learner's code may take


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
MAX_MESSAGE_CHARS = 1000  # a check's expected/got/hint text is cut to this: "got" can quote what a learner's code made


def _cut(text, limit: int = MAX_MESSAGE_CHARS):
    text = text if isinstance(text, str) or text is None else str(text)
    return text if text is None or len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


class Failed(Exception):
    """A check failed; raised by `Run` helpers inside a check function, caught by `Exercise.run`. The texts are cut
    to ``MAX_MESSAGE_CHARS`` each, so that a learner's object quoted in "got" cannot blow up a report."""

    def __init__(self, expected: str, got: str, hint: str | None = None):
        expected, got, hint = _cut(expected), _cut(got), _cut(hint)
        super().__init__(f"expected {expected}, got {got}")
        self.expected, self.got, self.hint = expected, got, hint


class KernelLost(Exception):
    """The learner's process had to be stopped (grader only): the checks cannot go on in it.

    kind: "timeout" | "kernel_died" | "out_of_memory"
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message
        self.partial: ExerciseResult | None = None


class ExerciseIncomplete(Exception):
    """Raised by `check` when checks fail, so that nbval and "Run all" stop on it.

    IPython shows `_render_traceback_` instead of a traceback: the table of checks, then one line.
    """

    def __init__(self, result: "ExerciseResult"):
        self.result = result
        failed = sum(not c.passed for c in result.checks)
        super().__init__(
            f"{result.exercise_id}: {failed} of {len(result.checks)} checks failed "
            f"({result.score:g}/{result.max_score:g} points)"
        )

    def _render_traceback_(self) -> list[str]:
        return [*self.result.render_text().splitlines(), "", f"ExerciseIncomplete: {self}"]


# ----------------------------------------------------------------------------------------------
# Results and feedback
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    name: str
    points: float
    earned: float
    passed: bool
    expected: str = ""
    got: str = ""
    hint: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class ExerciseResult:
    exercise_id: str
    title: str
    checks: list[CheckResult]
    status: str = "checked"  # checked | not_run | timeout | kernel_died | out_of_memory

    @property
    def score(self) -> float:
        return round(sum(c.earned for c in self.checks), 6)

    @property
    def max_score(self) -> float:
        return round(sum(c.points for c in self.checks), 6)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"exercise_id": self.exercise_id, "title": self.title, "status": self.status,
                "score": self.score, "max_score": self.max_score, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks]}

    def render_text(self) -> str:
        n_ok = sum(c.passed for c in self.checks)
        head = (f"{self.exercise_id} - {self.title}: {n_ok}/{len(self.checks)} checks passed, "
                f"{self.score:g}/{self.max_score:g} points")
        lines = [head, "-" * min(len(head), 100)]
        for c in self.checks:
            mark = "PASS" if c.passed else "FAIL"
            lines.append(f"  {mark}  {c.earned:g}/{c.points:g}  {c.name}")
            if not c.passed:
                lines.append(f"        expected: {c.expected}")
                lines.append(f"        got:      {c.got}")
                if c.hint:
                    lines.append(f"        hint:     {c.hint}")
        if self.passed:
            lines.append("All checks passed.")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        n_ok = sum(c.passed for c in self.checks)
        colour = "#1a7f37" if self.passed else "#cf222e"
        rows = []
        for c in self.checks:
            mark = "&#10004;" if c.passed else "&#10008;"
            detail = "" if c.passed else (
                f"<div><b>expected</b> {esc(c.expected)}</div><div><b>got</b> {esc(c.got)}</div>"
                + (f"<div><b>hint</b> {esc(c.hint)}</div>" if c.hint else ""))
            rows.append(f"<tr><td style='color:{'#1a7f37' if c.passed else '#cf222e'}'>{mark}</td>"
                        f"<td style='text-align:right'>{c.earned:g}/{c.points:g}</td>"
                        f"<td style='text-align:left'>{esc(c.name)}{detail}</td></tr>")
        return (f"<div><b style='color:{colour}'>{esc(self.exercise_id)} &middot; {esc(self.title)}: "
                f"{n_ok}/{len(self.checks)} checks passed, {self.score:g}/{self.max_score:g} points</b>"
                f"<table>{''.join(rows)}</table></div>")

    def __repr__(self) -> str:  # the text/plain form shown where HTML is not rendered
        return self.render_text()


# ----------------------------------------------------------------------------------------------
# Writing checks: Exercise (a set of checks) and Run (the helpers a check uses)
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckSpec:
    name: str
    points: float
    hint: str
    fn: Callable[["Run", SimpleNamespace], None]


class Exercise:
    """One exercise: the names it checks in the learner's notebook and its list of checks.

    Checks are declared with the `check` decorator, in the order they are reported::

        EX = Exercise("reparameterise", "The reparameterisation trick", targets=("reparameterise",))

        @EX.check("z has the shape and dtype of mean", points=1, hint="...")
        def _(run, learner):
            z = run.call(learner.reparameterise, mean, logvar)
            run.close(z, ...)
    """

    def __init__(self, id: str, title: str, targets: Sequence[str], call_timeout: float = DEFAULT_CALL_TIMEOUT):
        self.id, self.title, self.targets, self.call_timeout = id, title, tuple(targets), call_timeout
        self.checks: list[CheckSpec] = []
        self._setup: Callable | None = None

    def setup(self, fn: Callable) -> Callable:
        """Register a function ``fn(run, learner) -> dict`` whose entries are added to ``learner``
        for every check (for example an instance built once)."""
        self._setup = fn
        return fn

    def check(self, name: str, points: float = 1.0, hint: str = "") -> Callable:
        def register(fn: Callable) -> Callable:
            self.checks.append(CheckSpec(name, float(points), hint, fn))
            return fn

        return register

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.checks)

    def run(self, agent: Any, seeds: Sequence[int] = FEEDBACK_SEEDS) -> ExerciseResult:
        """Run every check once and collect the results. Raises KernelLost (with the partial
        result attached) only when the grader's sandbox had to stop the learner's process."""
        run = Run(agent, self, seeds)
        learner = SimpleNamespace(**{t: Ref(("name", t)) for t in self.targets})
        results: list[CheckResult] = []
        setup_failure: Failed | None = None
        try:
            if self._setup is not None:
                for key, value in (self._setup(run, learner) or {}).items():
                    setattr(learner, key, value)
        except Failed as err:
            setup_failure = err
        except KernelLost as lost:
            lost.partial = self._not_run(results, f"not run: {lost.message}", lost.kind)
            raise
        except Exception as err:  # a bug in the checks, not in the learner's code
            setup_failure = Failed("the setup of these checks to run", f"a checker error: {err!r}",
                                   "This is a bug in the course's checks; please report it.")
        for spec in self.checks:
            if setup_failure is not None:
                results.append(CheckResult(spec.name, spec.points, 0.0, False, setup_failure.expected,
                                           setup_failure.got, setup_failure.hint or spec.hint))
                continue
            run._warnings = []
            start = time.perf_counter()
            try:
                spec.fn(run, learner)
                results.append(CheckResult(spec.name, spec.points, spec.points, True,
                                           seconds=time.perf_counter() - start, warnings=run._warnings))
            except Failed as err:
                results.append(CheckResult(spec.name, spec.points, 0.0, False, err.expected, err.got,
                                           err.hint or spec.hint, time.perf_counter() - start, run._warnings))
            except KernelLost as lost:
                results.append(CheckResult(spec.name, spec.points, 0.0, False, "the call to finish",
                                           lost.message, spec.hint))
                lost.partial = self._not_run(results, f"not run: {lost.message}", lost.kind)
                raise
            except Exception as err:
                results.append(CheckResult(spec.name, spec.points, 0.0, False, "the check to run",
                                           f"a checker error: {err!r}",
                                           "This is a bug in the course's checks; please report it."))
        return ExerciseResult(self.id, self.title, results)

    def _not_run(self, done: list[CheckResult], why: str, status: str) -> ExerciseResult:
        rest = [CheckResult(s.name, s.points, 0.0, False, "the check to run", why, "")
                for s in self.checks[len(done):]]
        return ExerciseResult(self.id, self.title, done + rest, status=status)

    def not_run(self, why: str, status: str = "not_run") -> ExerciseResult:
        return self._not_run([], why, status)


class Run:
    """What a check function receives first: seeds, and helpers that call the learner's code and
    compare, each raising `Failed` with a precise expected/got on the first problem."""

    def __init__(self, agent: Any, exercise: Exercise, seeds: Sequence[int]):
        self.agent, self.exercise = agent, exercise
        tag = int(hashlib.sha256(exercise.id.encode()).hexdigest()[:8], 16)
        self.seeds = [int((s * 1_000_003 + tag) % 2**31) for s in seeds]
        self._warnings: list[str] = []

    # -- randomness ------------------------------------------------------------------------
    def rng(self, k: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seeds[k % len(self.seeds)] + 7919 * (k // len(self.seeds)))

    def generator(self, k: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seeds[k % len(self.seeds)] + 7919 * (k // len(self.seeds)))

    def randn(self, *shape: int, k: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator(k), dtype=dtype)

    # -- crossing into the learner's code ----------------------------------------------------
    def _request(self, request: dict, label: str, timeout: float | None, allow_inplace: bool = False) -> Any:
        limit = self.exercise.call_timeout if timeout is None else timeout
        reply = self.agent.request(request, limit)
        if reply.get("ok"):
            self._warnings += list(reply.get("warnings", []))
            if reply.get("mutated") and not allow_inplace:
                raise Failed(f"{label} to leave its input tensors unchanged",
                             f"it changed {', '.join(reply['mutated'])} in place",
                             "Build new tensors (x = x + y) instead of changing the caller's ones "
                             "(x += y, x.mul_(...), x[...] = ...).")
            return from_wire(reply["value"])
        err = reply["error"]
        kind = err["type"]
        if kind == "Timeout":
            raise Failed(f"{label} to finish within {limit:g} s", "it was still running and was stopped",
                         "Look for a loop that never ends, or a Python loop over elements that a tensor "
                         "operation would do at once.")
        if kind == "NameError" and not err.get("where"):
            raise Failed(f"{label.split('(')[0]} to be defined",
                         f"NameError: {err['message']}",
                         "Run the cell that defines it first, and check that it ran without errors.")
        if kind == "NotImplementedError":
            raise Failed(f"{label} to return a result", "NotImplementedError: not written yet"
                         + (f" ({err['message']})" if err["message"] else ""),
                         None)
        where = f" at {err['where']}" if err.get("where") else ""
        raise Failed(f"{label} to run without an error", f"{kind}: {err['message']}{where}", None)

    def call(self, target: Ref, *args: Any, timeout: float | None = None, label: str | None = None,
             allow_inplace: bool = False, **kwargs: Any) -> Any:
        """Call ``target(*args, **kwargs)`` in the learner's code and return the result as data.

        Fails when the call raises, runs past ``timeout`` seconds, or changes a tensor argument
        in place (unless ``allow_inplace``)."""
        label = label or f"{target.label()}({_args_label(args, kwargs)})"
        request = {"op": "call", "target": target, "args": list(args), "kwargs": kwargs}
        return self._request(request, label, timeout, allow_inplace)

    def raises(self, error: str, target: Ref, *args: Any, label: str | None = None, hint: str | None = None,
               **kwargs: Any) -> None:
        """Expect the call to raise the exception named ``error`` (for example "ValueError")."""
        label = label or f"{target.label()}({_args_label(args, kwargs)})"
        request = {"op": "call", "target": target, "args": list(args), "kwargs": kwargs}
        reply = self.agent.request(request, self.exercise.call_timeout)
        if reply.get("ok"):
            raise Failed(f"{label} to raise {error}", f"it returned {_describe(from_wire(reply['value']))}", hint)
        err = reply["error"]
        if err["type"] != error:
            raise Failed(f"{label} to raise {error}", f"{err['type']}: {err['message']}", hint)

    def make(self, probe: Probe) -> Ref:
        """Build a probe object on the learner's side and keep it; returns a Ref to it."""
        return self._request({"op": "make", "target": probe}, f"<{probe.name}>", None)

    def get(self, target: Ref, label: str | None = None) -> Any:
        """Read an attribute (``run.get(obj.alpha_bars)``) as data."""
        return self._request({"op": "get", "target": target}, label or target.label(), None)

    def describe(self, target: Ref) -> dict:
        return self._request({"op": "describe", "target": target}, target.label(), None)

    def vjp(self, target: Ref, *args: Any, wrt: Sequence[int], grad_output: Any,
            label: str | None = None, **kwargs: Any) -> dict:
        """Call target, then backpropagate ``grad_output``; returns output, arg_grads, param_grads."""
        label = label or f"{target.label()}(...) then backward()"
        request = {"op": "vjp", "target": target, "args": list(args), "kwargs": kwargs,
                   "wrt": list(wrt), "grad_output": grad_output}
        return self._request(request, label, None)

    # -- comparisons ---------------------------------------------------------------------------
    def expect(self, ok: bool, expected: str, got: str, hint: str | None = None) -> None:
        if not ok:
            raise Failed(expected, got, hint)

    def tensor(self, got: Any, label: str, shape: Sequence[int] | None = None,
               kind: Literal["tensor", "array", "any"] = "tensor", finite: bool = True) -> np.ndarray:
        """Check type, shape and finiteness; return the values as a float64 numpy array."""
        ok_types = {"tensor": (torch.Tensor,), "array": (np.ndarray,), "any": (torch.Tensor, np.ndarray)}[kind]
        noun = {"tensor": "a torch.Tensor", "array": "a numpy array", "any": "a tensor or array"}[kind]
        if not isinstance(got, ok_types):
            raise Failed(f"{label} to be {noun}" + (f" of shape {tuple(shape)}" if shape is not None else ""),
                         f"{_describe(got)}", _type_hint(got, kind))
        arr = _as_numpy(got)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise Failed(f"{label} of shape {tuple(shape)}", f"shape {tuple(arr.shape)}", None)
        if finite and arr.dtype != bool and arr.size and not np.all(np.isfinite(arr.astype(np.complex128 if np.iscomplexobj(arr) else np.float64))):
            bad = ~np.isfinite(arr.astype(np.float64))
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            kinds = "NaN" if np.isnan(arr.astype(np.float64)).any() else "inf"
            raise Failed(f"{label} to hold finite numbers",
                         f"{int(bad.sum())} of {arr.size} values are {kinds} (the first at index {first})",
                         "A NaN usually comes from 0/0, log(0) or sqrt of a negative number; print the "
                         "intermediate values around that index.")
        return arr.astype(np.float64) if arr.dtype != bool else arr

    def number(self, got: Any, label: str) -> float:
        """Accept a Python, numpy or one-element torch number; return it as a float."""
        if isinstance(got, bool) or not isinstance(got, (int, float, np.integer, np.floating, torch.Tensor, np.ndarray)):
            raise Failed(f"{label} to be a number", _describe(got), None)
        if isinstance(got, (torch.Tensor, np.ndarray)):
            if _as_numpy(got).size != 1:
                raise Failed(f"{label} to be a single number", _describe(got),
                             "Reduce it (.mean(), .sum()) or take .item() of a one-element tensor.")
            got = _as_numpy(got).reshape(()).item()
        if isinstance(got, complex):
            raise Failed(f"{label} to be a real number", _describe(got), None)
        try:
            value = float(got)
        except OverflowError:  # an integer too large for a float
            raise Failed(f"{label} to be a finite number", f"an integer of {len(str(got))} digits"[:80], None) from None
        if not math.isfinite(value):
            raise Failed(f"{label} to be a finite number", repr(value),
                         "A NaN usually comes from 0/0, log(0) or sqrt of a negative number.")
        return value

    def close(self, got: Any, expected: Any, label: str, rtol: float = 1e-5, atol: float = 1e-8,
              kind: Literal["tensor", "array", "any", "number"] = "any", hint: str | None = None) -> None:
        """Compare numbers, tensors or arrays (and lists/tuples/dicts of them) within tolerance."""
        if isinstance(expected, dict):
            if not isinstance(got, dict):
                raise Failed(f"{label} to be a dict with keys {_keys(expected)}", _describe(got), hint)
            if set(got) != set(expected):
                raise Failed(f"{label} with keys {_keys(expected)}", f"keys {_keys(got)}", hint)
            for key in expected:
                self.close(got[key], expected[key], f"{label}[{key!r}]", rtol, atol, kind, hint)
            return
        if isinstance(expected, (list, tuple)):
            if not isinstance(got, (list, tuple)) or len(got) != len(expected):
                raise Failed(f"{label} to be a sequence of {len(expected)} items", _describe(got), hint)
            for i, (g, e) in enumerate(zip(got, expected)):
                self.close(g, e, f"{label}[{i}]", rtol, atol, kind, hint)
            return
        if kind == "number" or isinstance(expected, (int, float, np.floating, np.integer)):
            value = self.number(got, label)
            if not math.isclose(value, float(expected), rel_tol=rtol, abs_tol=atol):
                raise Failed(f"{label} = {_num(expected)} (tolerance rtol {rtol:g}, atol {atol:g})",
                             f"{_num(value)}", hint)
            return
        want = _as_numpy(expected).astype(np.float64)
        have = self.tensor(got, label, shape=want.shape, kind=kind if kind != "number" else "any")
        err = np.abs(have - want)
        bound = atol + rtol * np.abs(want)
        if np.any(err > bound):
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(err - bound), err.shape))
            at = f" at index {idx}" if want.ndim else ""
            raise Failed(f"{label} within rtol {rtol:g}, atol {atol:g} of the reference"
                         f" ({_num(want[idx] if want.ndim else want)}{at})",
                         f"{_num(have[idx] if have.ndim else have)}{at}: max error {_num(err.max())}, "
                         f"{int((err > bound).sum())} of {err.size} values off", hint)

    def equal(self, got: Any, expected: Any, label: str, hint: str | None = None) -> None:
        """Exact equality for plain data (ints, strings, None, tuples, lists, dicts)."""
        if _plain(got) != _plain(expected):
            raise Failed(f"{label} = {expected!r}", _describe(got), hint)


# ----------------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------------
def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.resolve_conj().numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    return np.asarray(x)


def _plain(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _num(x: Any) -> str:
    x = float(x)
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.6g}"
    return f"{x:.4e}"


def _keys(d: dict) -> str:
    return "[" + ", ".join(repr(k) for k in list(d)[:8]) + (", ..." if len(d) > 8 else "") + "]"


def _args_label(args: Sequence, kwargs: dict) -> str:
    def short(v: Any) -> str:
        if isinstance(v, (torch.Tensor, np.ndarray)):
            return f"<{'tensor' if isinstance(v, torch.Tensor) else 'array'} {tuple(v.shape)}>"
        if isinstance(v, Ref):
            return v.label()
        if isinstance(v, Probe):
            return f"<{v.name}>"
        if isinstance(v, (list, tuple)) and len(v) > 4:
            return f"[{len(v)} items]"
        text = repr(v)
        return text if len(text) <= 30 else text[:27] + "..."

    parts = [short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _describe(x: Any) -> str:
    """A one-line description of a value for feedback: its type, shape and a few values."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {str(x.dtype).replace('torch.', '')}{_preview(_as_numpy(x))}"
    if isinstance(x, np.ndarray):
        return f"a numpy array of shape {x.shape}, dtype {x.dtype}{_preview(x)}"
    if isinstance(x, Ref):
        return f"an object of type {x.type_name}" if x.type_name else f"the object {x.label()}"
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, (int, float, np.integer, np.floating)):
        return f"{type(x).__name__} {_num(x)}"
    if isinstance(x, dict):
        return f"a dict with keys {_keys(x)}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_describe(v) if isinstance(v, (torch.Tensor, np.ndarray)) else repr(v)[:20] for v in x[:4])
        return f"a {type(x).__name__} of {len(x)} items: [{inner}{', ...' if len(x) > 4 else ''}]"
    text = repr(x)
    return f"{type(x).__name__} {text[:80]}"


def _preview(a: np.ndarray) -> str:
    if a.size == 0 or a.dtype == object:
        return ""
    flat = a.reshape(-1)
    try:
        vals = [_num(v) for v in (flat if flat.size <= 4 else flat[:3])]
    except (TypeError, ValueError):
        return ""
    return f", values [{', '.join(vals)}{', ...' if flat.size > 4 else ''}]"


def _type_hint(got: Any, kind: str) -> str | None:
    if kind == "tensor" and isinstance(got, np.ndarray):
        return "Convert with torch.from_numpy(...), or compute with torch functions throughout."
    if kind == "array" and isinstance(got, torch.Tensor):
        return "This exercise works in numpy: use np.* functions, or .numpy() at the end."
    if isinstance(got, (list, tuple)):
        return "Return a single tensor, not a Python list (torch.stack or torch.tensor builds one)."
    if got is None:
        return "The function returned None: is a `return` statement missing?"
    return None


# ----------------------------------------------------------------------------------------------
# Notebook entry point
# ----------------------------------------------------------------------------------------------
def run_in_notebook(exercise: Exercise, objects: Sequence[Any], seeds: Sequence[int] = FEEDBACK_SEEDS) -> ExerciseResult:
    """Run ``exercise``'s checks on objects defined in the notebook. When all pass, show the table;
    otherwise raise `ExerciseIncomplete`, which IPython shows as the table and one line (no traceback)."""
    if len(objects) != len(exercise.targets):
        raise TypeError(f"check({exercise.id!r}, ...) takes {len(exercise.targets)} object(s): "
                        f"{', '.join(exercise.targets)}")
    agent = LocalAgent(dict(zip(exercise.targets, objects)))
    result = exercise.run(agent, seeds)
    if not result.passed:
        raise ExerciseIncomplete(result)
    try:
        from IPython.display import display

        display(result)
    except ImportError:
        print(result.render_text())
    return result
