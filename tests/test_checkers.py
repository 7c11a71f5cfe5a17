"""The checking framework (course_tools/checking.py, course_tools/agent.py) and the exercises' checks.

- Feedback, not tracebacks: wrong types and shapes, NaNs, exceptions, slow or endless code, tensors
  changed in place, missing names, and bugs in a check itself each give one row of feedback.
- A warning, or text on stderr, never fails a check.
- Every exercise's checks pass on its solution and fail, with feedback, on the generated stub; an
  answer tuned to the notebook's seeds fails under other seeds.
- The checks' reference implementations equal the libraries people use (diffusers, transformers,
  torch), so a learner is never graded against a wrong answer.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from course_tools.agent import LocalAgent, dumps, from_wire, loads, to_wire
from course_tools.checking import FEEDBACK_SEEDS, Exercise, ExerciseIncomplete, Run, run_in_notebook
from course_lib.checks import EXERCISES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hostile"))

# ----------------------------------------------------------------------------------------------
# A toy exercise: f(x) must return 2·x as a tensor
# ----------------------------------------------------------------------------------------------
TOY = Exercise("toy_double", "Double it", targets=("f",), call_timeout=1.0)


@TOY.check("f(x) = 2x", points=2, hint="multiply by two")
def _(run, learner):
    for k in range(2):
        x = run.randn(3, 4, k=k)
        run.close(run.call(learner.f, x), 2 * x, "f(x)", kind="tensor")


@TOY.check("f keeps the dtype", points=1)
def _(run, learner):
    got = run.call(learner.f, torch.ones(2, dtype=torch.float64))
    run.equal(str(got.dtype), "torch.float64", "the dtype of f(x)")


def grade(f) -> tuple[float, list]:
    result = TOY.run(LocalAgent({"f": f}))
    return result.score, result.checks


def first_failure(f):
    score, checks = grade(f)
    return next(c for c in checks if not c.passed)


def test_a_right_answer_gets_every_point():
    score, checks = grade(lambda x: x * 2)
    assert score == 3 and all(c.passed for c in checks)


@pytest.mark.parametrize("f, expected_in_got, hint_word", [
    (lambda x: (x * 2).numpy(), "numpy array", "torch.from_numpy"),  # wrong type
    (lambda x: [v * 2 for v in x], "list", "torch.stack"),  # a list
    (lambda x: None, "None", "return"),  # forgot to return
    (lambda x: (x * 2)[:2], "shape (2, 4)", ""),  # wrong shape
    (lambda x: x * 2 / 0 * 0, "NaN", "NaN"),  # NaN
    (lambda x: x * 2.1, "max error", "multiply by two"),  # out of tolerance
])
def test_wrong_answers_get_feedback(f, expected_in_got, hint_word):
    c = first_failure(f)
    assert expected_in_got in c.got and c.expected
    assert hint_word in c.hint


def test_an_exception_in_the_learners_code_is_one_line_with_its_place():
    def f(x):
        y = x * 2
        raise ValueError("bad input")

    c = first_failure(f)
    assert c.got.startswith("ValueError: bad input at line") and "raise ValueError" in c.got
    assert "Traceback" not in c.got


def test_endless_and_slow_code_is_stopped_and_reported():
    def endless(x):
        while True:
            pass

    def sleepy(x):
        time.sleep(5)
        return x * 2

    def stubborn(x):  # swallows ordinary exceptions; the alarm is a BaseException
        while True:
            try:
                time.sleep(0.05)
            except Exception:
                pass

    for f in (endless, sleepy, stubborn):
        start = time.monotonic()
        c = first_failure(f)
        assert "to finish within 1 s" in c.expected and "stopped" in c.got
        assert time.monotonic() - start < 6  # three calls at most, one second each


def test_warnings_and_stderr_never_fail_a_check(capsys):
    def noisy(x):
        warnings.warn("NNPACK is not supported on this hardware")
        print("a message on stderr", file=sys.stderr)
        print("and on stdout")
        return x * 2

    score, checks = grade(noisy)
    assert score == 3
    assert any("NNPACK" in w for w in checks[0].warnings)
    assert capsys.readouterr() == ("", "")  # the learner's printing is swallowed during checks


def test_changing_an_input_in_place_is_reported():
    c = first_failure(lambda x: x.mul_(2))
    assert "in place" in c.got and "argument 1" in c.got


def test_a_missing_name_says_run_the_cell():
    result = TOY.run(LocalAgent({}))
    assert result.score == 0
    assert all("f is not defined" in c.got and "Run the cell" in c.hint for c in result.checks)


def test_not_implemented_says_not_written_yet():
    def stub(x):
        raise NotImplementedError("f: write your code here")

    assert "not written yet" in first_failure(stub).got


def test_a_bug_in_a_check_is_reported_not_raised():
    ex = Exercise("buggy", "Buggy", targets=("f",))

    @ex.check("divides by zero")
    def _(run, learner):
        1 / 0

    result = ex.run(LocalAgent({"f": abs}))
    assert not result.passed and "checker error" in result.checks[0].got and "bug" in result.checks[0].hint


def test_the_learner_works_on_copies_of_the_checks_data():
    seen = []

    def f(x):
        seen.append(x)
        return x * 2

    ex = Exercise("copy", "Copies", targets=("f",))

    @ex.check("the reference is untouched")
    def _(run, learner):
        x = torch.ones(3)
        run.call(learner.f, x)
        seen[0].fill_(7)  # the learner keeps a reference and changes it later
        run.close(x, torch.ones(3), "the check's own tensor", rtol=0, atol=0)

    assert ex.run(LocalAgent({"f": f})).passed


def test_the_notebook_entry_point_raises_one_line():
    with pytest.raises(ExerciseIncomplete) as info:
        run_in_notebook(TOY, [lambda x: x * 3])
    lines = info.value._render_traceback_()  # what IPython shows instead of a traceback
    assert lines[-1].startswith("ExerciseIncomplete: toy_double: 1 of 2 checks failed")
    text = "\n".join(lines)
    assert "FAIL" in text and "expected:" in text and "got:" in text and "hint:" in text
    assert "Traceback" not in text and "File " not in text


def test_wire_round_trip_keeps_data_and_refuses_code():
    data = {"a": torch.arange(3), (0, 49): 1.5, "n": np.float32(2.5), "arr": np.ones((2, 2)), "s": [None, True, "x"]}
    back = from_wire(loads(dumps(to_wire(data, keep=lambda o: 1))))
    assert torch.equal(back["a"], data["a"]) and back[(0, 49)] == 1.5 and isinstance(back["n"], np.float32)
    assert np.array_equal(back["arr"], data["arr"]) and back["s"] == [None, True, "x"]
    assert from_wire(to_wire(object(), keep=lambda o: 7)).root == ("handle", 7)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    with pytest.raises(Exception):
        loads(pickle.dumps(Evil(), protocol=2))  # weights_only refuses arbitrary callables


def test_grading_seeds_differ_from_the_notebooks():
    run_nb = Run(None, TOY, FEEDBACK_SEEDS)
    run_grade = Run(None, TOY, (123456, 123457, 123458))
    assert not torch.equal(run_nb.randn(4), run_grade.randn(4))
    assert Run(None, TOY, FEEDBACK_SEEDS).seeds == run_nb.seeds  # and are reproducible


# ----------------------------------------------------------------------------------------------
# Every exercise: the solution passes, the stub fails with feedback (in this process, no kernel)
# ----------------------------------------------------------------------------------------------
def _namespace(folder: str, name: str) -> tuple[dict, list[str]]:
    nb = nbformat.read(ROOT / folder / name, as_version=4)
    ns: dict = {}
    exercises = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "checker" in cell.metadata.get("tags", []):
            exercises.append(cell.metadata["course"]["exercise"])
        elif not cell.id.endswith("explore"):
            exec(compile(cell.source, f"{name}:{cell.id}", "exec"), ns)
    return ns, exercises


NOTEBOOKS = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))


def test_every_exercise_has_a_check_cell():
    found = [c.metadata["course"]["exercise"] for n in NOTEBOOKS
             for c in nbformat.read(ROOT / "solutions" / n, as_version=4).cells if "checker" in c.metadata.get("tags", [])]
    assert sorted(found) == sorted(EXERCISES)
    assert len(EXERCISES) >= 14


CHECK_CALL = re.compile(r"""\bcheck\(\s*["']([^"']+)["']""")


def test_every_check_is_called_by_exactly_one_cell_of_the_right_kind():
    """One registry, one entry point: each id in CHECKS is named by one cell of the sources (graded
    exercises in solutions/, check-yourself cells in notebooks/), and no cell names an unknown id."""
    from course_lib.checks import CHECK_YOURSELF, CHECKS

    assert set(CHECKS) == set(EXERCISES) | set(CHECK_YOURSELF) and not set(EXERCISES) & set(CHECK_YOURSELF)
    assert len(CHECK_YOURSELF) >= 9
    calls: dict[str, list[str]] = {}
    for folder in ("solutions", "notebooks"):
        for path in sorted((ROOT / folder).glob("*.ipynb")):
            for cell in nbformat.read(path, as_version=4).cells:
                if cell.cell_type == "code":
                    for check_id in CHECK_CALL.findall(cell.source):
                        calls.setdefault(check_id, []).append(f"{folder}/{path.name}:{cell.id}")
    assert set(calls) == set(CHECKS), "ids named by cells vs ids in the registry"
    for check_id, cells in calls.items():
        assert len(cells) == 1, (check_id, cells)
        folder = cells[0].split("/")[0]
        assert folder == ("solutions" if check_id in EXERCISES else "notebooks"), (check_id, cells)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):  # the old entry points are gone from the lessons
        sources = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
        assert "check_yourself" not in sources and "checks.lesson" not in sources, path.name


def test_check_modules_are_named_by_idea_not_by_lesson_number():
    import importlib

    import course_lib.checks as checks

    modules = sorted(p.stem for p in Path(checks.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 9
    assert not [m for m in modules if re.search(r"\d", m) or m.startswith("lesson")], modules
    defined = [ex.id for name in modules for ex in vars(importlib.import_module(f"course_lib.checks.{name}")).values()
               if isinstance(ex, Exercise)]
    assert sorted(defined) == sorted(checks.CHECKS), "each check is defined once, in the module of its idea"


def test_check_shows_one_table_returns_nothing_and_refuses_unknown_ids(capsys):
    from course_lib.checks import check
    from course_lib.checks.recap import first_below, snr_db

    assert check("snr_crossing", snr_db, first_below) is None  # a cell's value would show the table a second time
    out = capsys.readouterr().out
    assert out.count("snr_crossing") == 1 and "3/3 checks passed" in out
    with pytest.raises(ValueError, match="no check named 'l00_snr'.*snr_crossing"):
        check("l00_snr", snr_db, first_below)
    with pytest.raises(ExerciseIncomplete):
        check("snr_crossing", snr_db, lambda ab, level_db=0.0: len(ab) - 1)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_solutions_pass_and_stubs_fail_with_feedback(name):
    sol, exercises = _namespace("solutions", name)
    stub, _ = _namespace("exercises", name)
    for ex_id in exercises:
        ex = EXERCISES[ex_id]
        good = ex.run(LocalAgent({t: sol[t] for t in ex.targets}))
        assert good.passed, good.render_text()
        bad = ex.run(LocalAgent({t: stub[t] for t in ex.targets}))
        assert bad.score == 0, bad.render_text()
        for c in bad.checks:
            assert c.expected and c.got and "checker error" not in c.got, (ex_id, c)


def test_an_answer_for_the_notebooks_seeds_fails_other_seeds():
    from corpus import one_seed_cheat

    ns: dict = {}
    exec(one_seed_cheat(), ns)
    ex = EXERCISES["unet_analyser"]
    assert ex.run(LocalAgent({"UNetAnalyzer": ns["UNetAnalyzer"]}), FEEDBACK_SEEDS).passed
    assert ex.run(LocalAgent({"UNetAnalyzer": ns["UNetAnalyzer"]}), (5, 6, 7)).score == 0


def test_the_articles_own_solution_fails_where_it_is_wrong():
    """Episode 84's own solution to the schedule exercise, graded: its two mistakes show, the rest passes."""
    from course_lib.checks import recap

    class ArticleComparator:  # no cap on beta; and a "crossing" at the last step when there is none
        def linear_schedule(self, T, beta_start=1e-4, beta_end=0.02):
            return torch.cumprod(1.0 - torch.linspace(beta_start, beta_end, T), dim=0)

        def cosine_schedule(self, T, s=0.008):
            steps = torch.arange(T + 1, dtype=torch.float32)
            f = torch.cos((steps / T + s) / (1 + s) * np.pi / 2) ** 2
            return (f / f[0])[1:]

        def signal_to_noise_ratio(self, a):
            return 10.0 * torch.log10(a / (1.0 - a))

        def find_zero_crossing(self, alpha_bars):
            return next((t for t in range(len(alpha_bars)) if alpha_bars[t] <= 0.5), len(alpha_bars) - 1)

    result = EXERCISES["schedule_comparator"].run(LocalAgent({"ScheduleComparator": ArticleComparator}))
    passed = {c.name.split(" ")[0]: c.passed for c in result.checks}
    assert passed["linear_schedule(T)"] and passed["signal_to_noise_ratio(alpha_bar)"]
    assert not passed["cosine_schedule(T)"] and not passed["find_zero_crossing(alpha_bars)"]
    assert recap.zero_crossing(recap.linear_alpha_bars(1000)) == 259  # the article's "around t = 250"


def _training_step_with(target: str = "eps", drop_what: str = "captions"):
    """A learner's training step written out by hand, right or with one of the usual mistakes."""

    def training_step(unet, z0, context, uncond_context, alpha_bar, generator, p_uncond):
        b = z0.shape[0]
        t = torch.randint(0, len(alpha_bar), (b,), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        drop = torch.rand(b, generator=generator) < p_uncond
        if drop_what == "captions":
            context = torch.where(drop[:, None, None], uncond_context, context)
        else:  # the mask applied to the latents
            z0 = z0 * (~drop).float()[:, None, None, None]
        ab = alpha_bar[t][:, None, None, None]
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        return torch.nn.functional.mse_loss(unet(z_t, t, context), eps if target == "eps" else z0)

    return training_step


def test_the_training_step_check_names_the_usual_mistakes():
    ex = EXERCISES["diffusion_training_step"]
    assert ex.run(LocalAgent({"training_step": _training_step_with()})).passed
    x0 = ex.run(LocalAgent({"training_step": _training_step_with(target="x0")}))
    assert x0.score == 3  # only the two checks that do not compare the loss's value pass
    assert "predicts the noise" in next(c for c in x0.checks if not c.passed).hint
    latents = ex.run(LocalAgent({"training_step": _training_step_with(drop_what="latents")}))
    failed = [c for c in latents.checks if not c.passed]
    assert [c.name.split(" ")[0] for c in failed] == ["with", "Verify:"]  # p_uncond = 0 is right, dropout is not
    assert all("drops latents, not captions" in c.hint for c in failed)


def test_the_dpmpp_2m_step_check_names_the_usual_mistakes():
    """Right: every point. First order only, h of the wrong sign, DPM-Solver's noise-prediction coefficients, the
    correction subtracted: each fails the step checks and the whole loop, with the hint that names it."""
    from course_lib.checks.samplers import dpmpp_2m_mistakes, dpmpp_2m_step

    ex = EXERCISES["dpmpp_2m_step"]
    result = ex.run(LocalAgent({"dpmpp_2m_step": dpmpp_2m_step}))
    assert result.passed, result.render_text()

    def mistake(word):
        def step(x, x0, x0_prev, sigma_prev, sigma, sigma_next):
            if sigma_next == 0:  # the last step right, so that only the mistake shows
                return dpmpp_2m_step(x, x0, x0_prev, sigma_prev, sigma, sigma_next)
            wrong = [v for k, v in dpmpp_2m_mistakes(x, x0, x0_prev, sigma_prev, sigma, sigma_next).items() if word in k]
            return wrong[0] if wrong else dpmpp_2m_step(x, x0, x0_prev, sigma_prev, sigma, sigma_next)
        return step

    for word, first_step_fails in [("first-order", False), ("wrong sign: h", True), ("noise prediction", True),
                                   ("correction has the wrong sign", False)]:
        result = ex.run(LocalAgent({"dpmpp_2m_step": mistake(word)}))
        failed = {c.name.split(":")[0]: c for c in result.checks if not c.passed}
        first, middle = "the first step (x0_prev = None) is first order", "a middle step is second order"
        assert (first in failed) == first_step_fails, (word, list(failed))
        assert middle in failed and word in failed[middle].hint, (word, failed.get(middle))
        assert any(name.startswith("Verify") for name in failed), (word, list(failed))
        assert not result.passed and result.score <= result.max_score - 4


def test_the_dpmpp_2m_step_reference_equals_diffusers():
    """The check's reference step, looped, equals DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2) with SD's settings, on the exact Gaussian-data model (including the last step to sigma = 0)."""
    from diffusers import DPMSolverMultistepScheduler

    from course_lib.checks.samplers import _dpm_loop, dpmpp_2m_step
    from course_lib.diffusers_bridge import diffusers_sampling_loop, sd_scheduler_config
    from course_lib.gaussian_model import gaussian_data_model
    from course_lib.schedules import make_timesteps, sd_schedule

    config = {**sd_scheduler_config(), "algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for n in (1, 3, 10):
        ref = diffusers_sampling_loop(DPMSolverMultistepScheduler.from_config(config), n, x,
                                      gaussian_data_model(sd_schedule(), 0.5))
        ours = _dpm_loop(dpmpp_2m_step, x, make_timesteps(n, spacing="trailing"))
        torch.testing.assert_close(ours.float(), ref, rtol=1e-4, atol=1e-5)


def test_the_training_step_reference_equals_diffusers_add_noise():
    """The check's reference noises latents as DDPMScheduler.add_noise (SD's betas) and course_lib.schedules do."""
    from diffusers import DDPMScheduler

    from course_lib.checks.training import training_step
    from course_lib.schedules import add_noise, sd_schedule

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    z0, context, uncond = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 3, 8, generator=g), torch.zeros(1, 3, 8)
    seen = {}

    def unet(z_t, t, ctx):
        seen.update(z_t=z_t, t=t, ctx=ctx)
        return torch.zeros_like(z_t)

    loss = training_step(unet, z0, context, uncond, scheduler.alphas_cumprod, torch.Generator().manual_seed(3), 0.5)
    replay = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (5,), generator=replay)
    eps = torch.randn(z0.shape, generator=replay)
    drop = torch.rand(5, generator=replay) < 0.5
    torch.testing.assert_close(seen["z_t"], scheduler.add_noise(z0, eps, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["z_t"], add_noise(z0, eps, t, sd_schedule()), rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["t"], t)
    assert torch.equal(seen["ctx"].abs().sum((1, 2)) == 0, drop)  # dropped rows read the (zero) empty prompt
    torch.testing.assert_close(loss, (eps**2).mean())  # a zero prediction costs the noise's mean square


def _edge_map_with(mistake: str | None = None):
    """A learner's edge map written out by hand: right, or with one of the usual mistakes."""
    import torch.nn.functional as F

    def edge_map_from_mask(labels):
        lab = labels.long()
        if mistake == "merged objects":  # "object or not" instead of each object's own label
            lab = (lab > 0).long()
        h, w = lab.shape[-2:]
        if mistake == "roll":  # neighbours by torch.roll: the border wraps round to the other side
            shifted = [lab.roll(s, d) for s, d in ((1, 1), (-1, 1), (1, 2), (-1, 2))]
        else:
            padded = F.pad(lab[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].long() if mistake == "replicate" \
                else F.pad(lab, (1, 1, 1, 1), value=-1)
            offsets = [(0, 1), (2, 1), (1, 0), (1, 2)]
            if mistake == "8 neighbours":
                offsets += [(0, 0), (0, 2), (2, 0), (2, 2)]
            shifted = [padded[:, dy:dy + h, dx:dx + w] for dy, dx in offsets]
        differs = torch.zeros(lab.shape, dtype=torch.bool)
        for other in shifted:
            differs |= other != lab
        if mistake == "outer boundary":  # background pixels next to an object
            return differs & (lab == 0) & torch.stack([o > 0 for o in shifted]).any(0)
        return differs & (lab > 0)

    return edge_map_from_mask


def test_the_edge_map_check_names_the_usual_mistakes():
    """Right: every point. Outer boundary, 8 neighbours, the border not outside (roll, replicate padding) and touching
    objects merged each fail their own check with the hint that names the mistake, and the check on real scenes."""
    ex = EXERCISES["edge_map_from_mask"]
    assert ex.run(LocalAgent({"edge_map_from_mask": _edge_map_with()})).passed
    expect = {"outer boundary": ("outermost pixels", "background"), "8 neighbours": ("only the 4 neighbours", "diagonal"),
              "roll": ("the image border", "torch.roll"), "replicate": ("the image border", "replicate"),
              "merged objects": ("touching objects", "merge")}
    for mistake, (check_words, hint_word) in expect.items():
        result = ex.run(LocalAgent({"edge_map_from_mask": _edge_map_with(mistake)}))
        failed = {c.name: c for c in result.checks if not c.passed}
        own = [c for name, c in failed.items() if check_words in name]
        assert own and hint_word in own[0].hint, (mistake, list(failed))
        assert not result.passed
        # torch.roll is right unless an object faces its own label across the image: only the border check sees it
        assert (mistake == "roll") != any(name.startswith("Verify") for name in failed), (mistake, list(failed))
    where = ex.run(LocalAgent({"edge_map_from_mask": _edge_map_with("outer boundary")})).checks[1].got
    assert "on the background beside an object" in where


def test_the_edge_map_reference_is_the_worlds():
    """The check's reference equals data.edge_map on rendered scenes' label maps, and those are the scenes' edge maps."""
    from course_lib import data
    from course_lib.checks.controlnet import _scene_labels, edge_map_from_mask

    scenes = data.generate(64, seed=3, object_counts=(0.2, 0.4, 0.4))
    labels = _scene_labels(scenes)
    assert torch.equal(data.edge_map(labels)[:, None], scenes.edges)
    assert torch.equal(edge_map_from_mask(labels)[:, None], scenes.edges)
    assert (scenes.n_objects > 1).sum() > 30 and scenes.edges.any()


# ----------------------------------------------------------------------------------------------
# The references equal the libraries
# ----------------------------------------------------------------------------------------------
def test_schedules_equal_diffusers():
    from diffusers import DDPMScheduler

    from course_lib.checks.recap import cosine_alpha_bars, linear_alpha_bars

    lin = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    cos = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(linear_alpha_bars(1000).float(), lin, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cosine_alpha_bars(1000).float(), cos, rtol=1e-5, atol=1e-9)


def test_guidance_rescale_equals_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as theirs

    from course_lib.checks.guidance import rescale_noise_cfg as ours

    g = torch.Generator().manual_seed(0)
    cond, guided = torch.randn(3, 4, 8, 8, generator=g), 5 * torch.randn(3, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(ours(guided, cond, phi).float(), theirs(guided, cond, phi), rtol=1e-5, atol=1e-6)


def test_cross_attention_equals_torch_sdpa():
    import torch.nn.functional as F

    from course_lib.checks.attention import cross_attention_head

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 12, generator=g), torch.randn(2, 7, 10, generator=g)
    wq, wk, wv = torch.randn(12, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out, _ = cross_attention_head(x, ctx, wq, wk, wv, mask)
    ref = F.scaled_dot_product_attention(x @ wq, ctx @ wk, ctx @ wv, attn_mask=mask[:, None, :])
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)


def test_clip_loss_equals_transformers():
    from transformers.models.clip import modeling_clip

    # the loss CLIPModel(return_loss=True) uses; renamed in transformers 5
    theirs = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    from course_lib.checks.clip import clip_loss, similarity_logits

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    logits_per_text = similarity_logits(img, txt, 100.0).T.float()
    torch.testing.assert_close(clip_loss(img, txt, 100.0).float(), theirs(logits_per_text), rtol=1e-5, atol=1e-5)


def test_kl_equals_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    from course_lib.checks.vae import kl_to_standard_normal

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar).float(), ref, rtol=1e-5, atol=1e-5)


def test_euler_and_ddim_steps_equal_diffusers_schedulers():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from course_lib.checks.samplers import ddim_step, euler_step, linear_alpha_bars, sigmas_from_alpha_bars

    g = torch.Generator().manual_seed(0)
    euler = EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    euler.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8, generator=g) * euler.init_noise_sigma
    for i, t in enumerate(euler.timesteps):
        eps = torch.randn(1, 4, 8, 8, generator=g)
        sigma, sigma_next = float(euler.sigmas[i]), float(euler.sigmas[i + 1])
        ours = euler_step(x, x - sigma * eps, sigma, sigma_next).float()
        x = euler.step(eps, t, x).prev_sample
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sigmas_from_alpha_bars(linear_alpha_bars()).float(),
                               ((1 - euler.alphas_cumprod) / euler.alphas_cumprod).sqrt(), rtol=1e-4, atol=1e-6)

    ddim = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(50)
    ab = linear_alpha_bars()
    x, eps, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), 501
    ref = ddim.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ddim_step(x, eps, float(ab[t]), float(ab[t - 20])).float(), ref, rtol=1e-5, atol=1e-5)


def test_parameter_counts_equal_diffusers_on_the_meta_device():
    from course_lib.checks.lineage import (SD15_UNET, SD15_UNET_PARAMETERS, SDXL_UNET, SDXL_UNET_PARAMETERS,
                                           count_parameters, meta_unet)

    assert count_parameters(meta_unet(SD15_UNET)) == SD15_UNET_PARAMETERS
    assert count_parameters(meta_unet(SDXL_UNET)) == SDXL_UNET_PARAMETERS
    assert math.isclose(SDXL_UNET_PARAMETERS / SD15_UNET_PARAMETERS, 2.99, abs_tol=0.01)


def test_the_rescale_in_v_space_check_catches_rescaling_the_noise_and_batch_wide_alpha_bar():
    """Right (the library's own function): every point. Rescaling eps itself fails the equality checks and the
    high-noise check; treating a (B,) alpha_bar as the first row's for the whole batch fails the per-sample case."""
    from course_lib.guidance import rescale_cfg_in_v_space, rescale_noise_cfg

    ex = EXERCISES["rescale_in_v_space"]
    result = ex.run(LocalAgent({"rescale_in_v_space": rescale_cfg_in_v_space}))
    assert result.passed, result.render_text()

    def in_eps_space(guided, cond, x_t, alpha_bar, phi):
        return rescale_noise_cfg(guided, cond, phi)

    result = ex.run(LocalAgent({"rescale_in_v_space": in_eps_space}))
    failed = {c.name: c for c in result.checks if not c.passed}
    assert "at high noise it is not the rescale of the noise itself" in failed
    assert any(name.startswith("equals the course's") for name in failed)
    assert any(name.startswith("Verify") for name in failed)

    def first_alpha_bar(guided, cond, x_t, alpha_bar, phi):
        ab = float(torch.as_tensor(alpha_bar).flatten()[0])
        return rescale_cfg_in_v_space(guided, cond, x_t, ab, phi)

    result = ex.run(LocalAgent({"rescale_in_v_space": first_alpha_bar}))
    assert [c.name for c in result.checks if not c.passed] == [
        next(c.name for c in result.checks if c.name.startswith("equals the course's"))]


def test_the_editing_references_equal_the_library_and_diffusers():
    """The checks' own img2img rule and blend step are course_lib.editing's and course_lib.inpainting's; the
    inverse DDIM step is undone by diffusers' DDIMScheduler step."""
    from diffusers import DDIMScheduler

    from course_lib import editing
    from course_lib.checks.editing import blend_step, ddim_inverse_step, img2img_timesteps, sd_alphas_cumprod

    for n, s in ((20, 0.75), (20, 0.68), (100, 0.29), (50, 1.0), (20, 0.04), (7, 0.5)):
        assert torch.equal(img2img_timesteps(n, s), editing.img2img_timesteps(n, s))
    g = torch.Generator().manual_seed(0)
    x, z, n = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    mask = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    ab = sd_alphas_cumprod()
    t = 451
    # inpaint_blend's blend: m * x + (1 - m) * (sqrt(ab) z + sqrt(1 - ab) n), with Python floats
    ref = mask * x + (1 - mask) * (math.sqrt(ab[t]) * z + math.sqrt(1 - ab[t]) * n)
    torch.testing.assert_close(blend_step(x, z, n, mask, ab, t).float(), ref, rtol=1e-6, atol=1e-6)

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(20)
    torch.testing.assert_close(sched.alphas_cumprod, ab)
    eps = torch.randn(2, 4, 16, 16, generator=g)
    x_t = ddim_inverse_step(x, eps, float(ab[451]), float(ab[501])).float()
    torch.testing.assert_close(sched.step(eps, 501, x_t, eta=0.0).prev_sample, x, rtol=1e-4, atol=1e-4)


def test_the_editing_checks_name_the_usual_mistakes():
    """Right answers pass; the strength rule rounded or off by one, the first timesteps instead of the last, no
    ValueError; the blend with the mask inverted or the known latent noised to t - 1 or t + 1: each fails the check
    that names it."""
    from course_lib import editing
    from course_lib.checks.editing import blend_step, ddim_inverse_step
    from course_lib.samplers import default_timesteps

    def failed(check_id, name, f):
        result = CHECKS[check_id].run(LocalAgent({name: f}))
        return {c.name: c for c in result.checks if not c.passed}, result

    from course_lib.checks import CHECKS

    assert not failed("img2img_timesteps", "img2img_timesteps", editing.img2img_timesteps)[0]
    assert not failed("inpaint_blend_step", "blend_step", blend_step)[0]
    assert not failed("ddim_inverse_step", "ddim_inverse_step", ddim_inverse_step)[0]

    def rounded(n, s):
        return default_timesteps(n)[n - round(n * s):]

    def one_more(n, s):
        return default_timesteps(n)[max(n - int(n * s) - 1, 0):]

    def first_ones(n, s):
        return default_timesteps(n)[:int(n * s)]

    def unchecked(n, s):
        return default_timesteps(n)[n - min(int(n * s), n):]

    fails, _ = failed("img2img_timesteps", "img2img_timesteps", rounded)
    rounding = next(name for name in fails if name.startswith("the count is rounded down"))
    assert "Round down" in fails[rounding].hint
    fails, _ = failed("img2img_timesteps", "img2img_timesteps", one_more)
    assert any(name.startswith("strength 0.75") for name in fails)
    fails, _ = failed("img2img_timesteps", "img2img_timesteps", first_ones)
    assert any("skips those and runs the last" in (c.hint or "") for c in fails.values())
    fails, _ = failed("img2img_timesteps", "img2img_timesteps", unchecked)
    assert list(fails) == ["a strength outside [0, 1] raises a ValueError"]

    def inverted(x_t, z, n, m, ab, t):
        return blend_step(x_t, z, n, 1 - m, ab, t)

    fails, _ = failed("inpaint_blend_step", "blend_step", inverted)
    first = next(iter(fails.values()))
    assert first.name.startswith("where the mask is 1") and "inverted" in first.got

    for shift in (-1, 1):
        def wrong_t(x_t, z, n, m, ab, t, shift=shift):
            return blend_step(x_t, z, n, m, ab, min(max(t + shift, 0), 999))

        fails, _ = failed("inpaint_blend_step", "blend_step", wrong_t)
        kept = next(c for name, c in fails.items() if name.startswith("where the mask is 0"))
        assert "neighbouring timestep" in kept.got

    def no_sqrt(x_t, z, n, m, ab, t):
        return m * x_t + (1 - m) * (ab[t] * z + (1 - ab[t]) * n)

    fails, _ = failed("inpaint_blend_step", "blend_step", no_sqrt)
    assert any(name.startswith("where the mask is 0") for name in fails)

    def forward_step_instead(x_s, eps, a_s, a_t):
        return ddim_inverse_step(x_s, eps, a_t, a_s)

    fails, _ = failed("ddim_inverse_step", "ddim_inverse_step", forward_step_instead)
    assert any(name.startswith("Verify") for name in fails)


# ----------------------------------------------------------------------------------------------
# Lesson 10: a LoRA layer by hand, and the loss textual inversion minimises
# ----------------------------------------------------------------------------------------------
class _LoRA(torch.nn.Module):
    """A learner's LoRA layer written out by hand: right as it stands, each subclass with one usual mistake."""

    check_rank = True

    def __init__(self, base, rank, alpha):
        super().__init__()
        if self.check_rank and not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"rank {rank} outside 1 ... min(in, out)")
        self.base = base.requires_grad_(False)
        self.scaling = self.scale(alpha, rank)
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.after_init()

    def scale(self, alpha, rank):
        return alpha / rank

    def after_init(self):
        pass

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)


class _RandomB(_LoRA):
    def after_init(self):
        torch.nn.init.normal_(self.lora_B, std=0.1)


class _ZeroA(_LoRA):
    def after_init(self):
        torch.nn.init.zeros_(self.lora_A)


class _RandnA(_LoRA):
    def after_init(self):
        torch.nn.init.normal_(self.lora_A)


class _AlphaOnly(_LoRA):
    def scale(self, alpha, rank):
        return alpha


class _RankOverAlpha(_LoRA):
    def scale(self, alpha, rank):
        return rank / alpha


class _NoScale(_LoRA):
    def scale(self, alpha, rank):
        return 1.0


class _BaseTrainable(_LoRA):
    def after_init(self):
        self.base.requires_grad_(True)


class _Buffers(_LoRA):
    def after_init(self):
        a, b = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        del self.lora_A, self.lora_B
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)


class _NoRankCheck(_LoRA):
    check_rank = False


class _OnlyMatrices(_LoRA):  # works on (B, in) batches only
    def forward(self, x):
        return self.base(x) + self.scaling * torch.einsum("bi,ri,or->bo", x, self.lora_A, self.lora_B)


class _Transposed(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.rand(base.in_features, rank) * 0.1)  # (in, r)
        self.lora_B = torch.nn.Parameter(torch.zeros(rank, base.out_features))  # (r, out)

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A @ self.lora_B)


class _PeftLayout(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def _failures(check_id, name, obj):
    from course_lib.checks import CHECKS

    result = CHECKS[check_id].run(LocalAgent({name: obj}))
    assert not [c for c in result.checks if "checker error" in c.got], result.render_text()
    return {c.name: c for c in result.checks if not c.passed}


def _the(fails, start):
    """The failed check whose name starts with ``start`` (KeyError when that check passed)."""
    found = [c for name, c in fails.items() if name.startswith(start)]
    if not found:
        raise KeyError(f"{start!r} did not fail; failed: {list(fails)}")
    return found[0]


def test_the_lora_references_equal_the_library_and_peft():
    """The checks' forward and their peft layer give what course_lib.personalize.LoRALinear gives with the same
    A and B, on a (B, L, in) batch; the linear probe is seeded and leaves the global RNG alone."""
    from course_lib.checks.personalize import lora_forward, peft_lora_linear
    from course_lib.personalize import LoRALinear
    from course_tools.agent import probe_linear

    state = torch.random.get_rng_state()
    base = probe_linear(3, 12, 20, True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(base.weight, probe_linear(3, 12, 20, True).weight)
    assert not torch.equal(base.weight, probe_linear(4, 12, 20, True).weight)
    ours = LoRALinear(base, 4, 6.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.3, generator=g)
    x = torch.randn(2, 5, 12, generator=g)
    theirs = peft_lora_linear(base, 4, 6.0, ours.lora_A.detach(), ours.lora_B.detach())
    with torch.no_grad():
        want = ours(x).double()
        torch.testing.assert_close(theirs(x).double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lora_forward(base, ours.lora_A, ours.lora_B, 6.0 / 4, x), want, rtol=1e-5, atol=1e-6)
        assert (want - base(x).double()).abs().max() > 0.05  # the update is not negligible


def test_the_lora_checks_name_the_usual_mistakes():
    """The library's layer and a hand-written one get every point; each usual mistake fails the check that names it,
    with its hint."""
    from course_lib.personalize import LoRALinear

    assert not _failures("lora_linear", "LoRALinear", LoRALinear)
    assert not _failures("lora_linear", "LoRALinear", _LoRA)

    fails = _failures("lora_linear", "LoRALinear", _RandomB)
    assert "B initialised randomly" in _the(fails, "it starts equal to the base layer").hint
    fails = _failures("lora_linear", "LoRALinear", _ZeroA)
    assert "A zero so nothing can learn" in _the(fails, "lora_A starts uniform").hint
    assert "gradient of B" in _the(fails, "lora_A starts uniform").hint
    fails = _failures("lora_linear", "LoRALinear", _RandnA)
    assert "kaiming_uniform_" in _the(fails, "lora_A starts uniform").hint
    for cls, named in ((_AlphaOnly, "alpha alone"), (_RankOverAlpha, "rank / alpha"), (_NoScale, "no scale")):
        fails = _failures("lora_linear", "LoRALinear", cls)
        scaled = _the(fails, "the update is scaled by alpha / rank")
        assert named in scaled.got and "Scale by alpha / rank" in scaled.hint, (cls.__name__, scaled)
        assert "it starts equal to the base layer: lora_B starts at zero" not in fails  # B = 0 hides the scale
    fails = _failures("lora_linear", "LoRALinear", _Transposed)
    assert "transposed" in _the(fails, "lora_A (rank, in_features)").hint
    fails = _failures("lora_linear", "LoRALinear", _PeftLayout)
    assert "peft wraps them" in _the(fails, "lora_A (rank, in_features)").hint
    fails = _failures("lora_linear", "LoRALinear", _BaseTrainable)
    assert list(fails) == ["the base layer is frozen: lora_A and lora_B are the only trainable tensors"]
    assert "Freeze the base layer" in next(iter(fails.values())).hint
    fails = _failures("lora_linear", "LoRALinear", _Buffers)
    assert "nn.Parameter" in _the(fails, "the base layer is frozen").hint
    fails = _failures("lora_linear", "LoRALinear", _NoRankCheck)
    assert list(fails) == ["a rank of 0, or one larger than min(in_features, out_features), raises a ValueError"]
    fails = _failures("lora_linear", "LoRALinear", _OnlyMatrices)
    assert list(fails) == [c.name for c in EXERCISES["lora_linear"].checks if c.name.startswith("equals peft")]


def _ti_loss_with(target="noise", roots=True, first_t=False, cut="", item=False):
    """A learner's textual-inversion loss written out by hand, right or with one of the usual mistakes."""

    def textual_inversion_loss(text_encoder, unet, ids, z0, t, noise, alphas_cumprod):
        if cut == "no_grad":
            with torch.no_grad():
                states = text_encoder(ids).last_hidden_state
        else:
            states = text_encoder(ids).last_hidden_state
            states = states.detach() if cut == "detach" else states
        ab = alphas_cumprod[t[0] if first_t else t].reshape(-1, 1, 1, 1)
        z_t = (ab.sqrt() * z0 + (1 - ab).sqrt() * noise) if roots else (ab * z0 + (1 - ab) * noise)
        loss = ((unet(z_t, t, states) - (noise if target == "noise" else z0)) ** 2).mean()
        return loss.item() if item else loss

    return textual_inversion_loss


def test_the_textual_inversion_reference_equals_the_library():
    """The checks' loss is course_lib.personalize.denoising_loss on the text tower's states; its gradient reaches the
    row that add_token added, as personalize.fit trains it, and only that row."""
    from course_lib import personalize
    from course_lib.checks.personalize import textual_inversion_loss
    from course_tools.agent import ProbeNewToken

    from course_lib.schedules import sd_schedule

    probe = ProbeNewToken()
    schedule = sd_schedule()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([20, 480, 930])
    with torch.no_grad():
        want = personalize.denoising_loss(probe.unet, probe.text_encoder(probe.ids).last_hidden_state, z0, t, eps,
                                          schedule)
        got = textual_inversion_loss(probe.text_encoder, probe.unet, probe.ids, z0, t, eps, schedule.alphas_cumprod)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    new_id = probe.text_encoder.token_embedding.base.num_embeddings  # the first id after the table
    assert (probe.ids == new_id).sum(dim=1).tolist() == [1, 1, 1]  # every caption uses the new token once
    res = probe.gradient(textual_inversion_loss, z0, t, eps, schedule.alphas_cumprod)
    assert res["keeps_graph"] and res["frozen_with_grad"] == 0
    assert res["grad"].shape == (1, 128) and res["grad"].abs().sum() > 0
    torch.testing.assert_close(res["loss"], got)


def test_the_textual_inversion_checks_name_the_usual_mistakes():
    """Right: every point. The clean latent as the target, no square roots, t[0] for the whole batch, text states cut
    from the graph (no_grad or detach), a Python float: each fails the check that names it, with its hint."""
    assert not _failures("textual_inversion_loss", "textual_inversion_loss", _ti_loss_with())

    fails = _failures("textual_inversion_loss", "textual_inversion_loss", _ti_loss_with(target="z0"))
    target = _the(fails, "the target is the noise")
    assert "clean latent z0" in target.got and "epsilon-prediction" in target.hint
    fails = _failures("textual_inversion_loss", "textual_inversion_loss", _ti_loss_with(roots=False))
    roots = _the(fails, "z_t = sqrt(alpha_bar) z0")
    assert "without square roots" in roots.got and "both factors take a square root" in roots.hint
    fails = _failures("textual_inversion_loss", "textual_inversion_loss", _ti_loss_with(first_t=True))
    own = _the(fails, "each sample is noised to its own timestep")
    assert "t[0]" in own.got and "(B, 1, 1, 1)" in own.hint
    assert not any(n.startswith(("a 0-dim", "the target", "z_t =")) for n in fails)  # one shared t: right
    for cut in ("no_grad", "detach"):
        fails = _failures("textual_inversion_loss", "textual_inversion_loss", _ti_loss_with(cut=cut))
        verify = [c.name for c in EXERCISES["textual_inversion_loss"].checks if c.name.startswith("Verify")]
        assert list(fails) == verify
        assert "torch.no_grad() or .detach()" in next(iter(fails.values())).hint
    fails = _failures("textual_inversion_loss", "textual_inversion_loss", _ti_loss_with(item=True))
    assert ".item()" in _the(fails, "a 0-dim tensor").hint


# ----------------------------------------------------------------------------------------------
# Lesson 11: the flow-matching loss, and Euler steps on the flow ODE
# ----------------------------------------------------------------------------------------------
def _fm_loss_with(target="noise - x0", path="data at 0", first_sigma=False, scalar_to_model=False, reduction="mean",
                  unshaped=False, cut="", item=False):
    """A learner's flow-matching loss written out by hand, right or with one of the usual mistakes."""

    def flow_matching_loss(velocity_fn, x0, noise, sigma):
        s = sigma[0] if first_sigma else sigma
        s_b = s if unshaped or s.dim() == 0 else s.reshape(-1, *[1] * (x0.dim() - 1))
        x_sigma = (1 - s_b) * x0 + s_b * noise if path == "data at 0" else s_b * x0 + (1 - s_b) * noise
        if cut == "no_grad":
            with torch.no_grad():
                v = velocity_fn(x_sigma, sigma)
        else:
            v = velocity_fn(x_sigma, s if scalar_to_model else sigma)
            v = v.detach() if cut == "detach" else v
        err = (v - (noise - x0 if target == "noise - x0" else x0 - noise)) ** 2
        loss = err.sum() if reduction == "sum" else err.flatten(1).sum(1).mean() if reduction == "per sample" \
            else err.mean()
        return loss.item() if item else loss

    return flow_matching_loss


def _euler_with(sign=1.0, at_next=False, skip_last=False, scalar=False, timestep_update=False, timestep_call=False,
                in_place=False, trajectory=False):
    """A learner's Euler sampler on the flow ODE written out by hand, right or with one of the usual mistakes."""

    def flow_euler_sample(velocity_fn, noise, sigmas):
        x, path = noise, [noise]
        for i in range(len(sigmas) - 1 - int(skip_last)):
            at = sigmas[i + 1] if at_next else sigmas[i]
            at = at if scalar else at.expand(x.shape[0])
            v = velocity_fn(x, 1000 * at if timestep_call else at)
            step = sign * (sigmas[i + 1] - sigmas[i]) * (1000 if timestep_update else 1) * v
            if in_place:
                x += step
            else:
                x = x + step
            path.append(x)
        return torch.stack(path) if trajectory else x

    return flow_euler_sample


def test_the_flow_references_equal_the_library_and_diffusers():
    """The checks' loss is course_lib.flow.flow_matching_loss given the same noise and sigma; their sampler is
    flow.euler_sample and diffusers' FlowMatchEulerDiscreteScheduler loop; the stand-in velocity is tests/test_dit.py's
    stand-in model at timestep 1000 sigma; the velocity probe is seeded, leaves the global RNG alone and refuses a
    sigma that is not (B,) noise levels."""
    from test_dit import stand_in_model

    from course_lib import flow
    from course_lib.checks import flow as checks
    from course_tools.agent import ProbeVelocity

    state = torch.random.get_rng_state()
    net = ProbeVelocity("mlp", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(net.mlp.net[0].weight, ProbeVelocity("mlp", seed=3).mlp.net[0].weight)
    assert not torch.equal(net.mlp.net[0].weight, ProbeVelocity("mlp", seed=4).mlp.net[0].weight)
    x0 = 2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    noise, sigma = torch.randn(x0.shape, generator=g), torch.rand(64, generator=g)  # what flow.flow_matching_loss draws
    torch.testing.assert_close(checks.flow_matching_loss(net, x0, noise, sigma),
                               flow.flow_matching_loss(net, x0, torch.Generator().manual_seed(5)))

    stand_in = ProbeVelocity("stand_in")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(stand_in(z, torch.tensor([0.3, 0.8])), stand_in_model(z, torch.tensor([300.0, 800.0])))
    for shift in (1.0, 3.0):
        for steps in (1, 4, 28):
            sigmas = flow.flow_sigmas(steps, shift)
            ours = checks.flow_euler_sample(stand_in, z, sigmas)
            torch.testing.assert_close(ours, flow.euler_sample(stand_in, z, sigmas))
            torch.testing.assert_close(ours, checks.scheduler_sample(z, steps, shift), atol=1e-5, rtol=1e-5)
    ring = ProbeVelocity("ring")
    points = torch.randn(5, 2, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ring(points, torch.full((5,), 0.4)), flow.GaussianMixture2D.ring().velocity(points, 0.4))
    with pytest.raises(ValueError, match=r"sigma of shape \(B,\)"):
        stand_in(z, torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"sigma of shape \(B,\)"):
        stand_in(z, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        stand_in(z, torch.tensor([500.0, 500.0]))
    assert [c[0] for c in stand_in.calls][-1] == 2  # the log keeps every call, refused ones included


def test_the_flow_matching_loss_checks_name_the_usual_mistakes():
    """Right: every point. The target x0 - noise, the path run backwards, sigma[0] for the batch, sigma not broadcast,
    a sum, the prediction cut from the graph, a Python float: each fails the check that names it, with its hint."""
    from course_lib.checks.flow import flow_matching_loss

    name = "flow_matching_loss"
    assert not _failures(name, name, _fm_loss_with())
    assert not _failures(name, name, flow_matching_loss)  # the checks' own reference

    fails = _failures(name, name, _fm_loss_with(target="x0 - noise"))
    sign = _the(fails, "the target is the velocity noise - x0")
    assert "the target x0 - noise" in sign.got and "points towards the noise" in sign.hint
    fails = _failures(name, name, _fm_loss_with(path="noise at 0"))
    path = _the(fails, "x_sigma = (1 - sigma) x0 + sigma noise")
    assert "sigma x0 + (1 - sigma) noise" in path.got and "sigma = 0 is the data" in path.hint
    fails = _failures(name, name, _fm_loss_with(first_sigma=True))
    own = _the(fails, "each sample at its own sigma[i]")
    assert "sigma[0] for the whole batch" in own.got and "(B, 1, ..., 1)" in own.hint
    assert not any(n.startswith(("a 0-dim", "the target", "x_sigma =")) for n in fails)  # one shared sigma: right
    fails = _failures(name, name, _fm_loss_with(first_sigma=True, scalar_to_model=True))
    assert "takes sigma of shape (B,)" in _the(fails, "each sample at its own sigma[i]").got
    assert "velocity_fn(x_sigma, sigma)" in _the(fails, "each sample at its own sigma[i]").hint
    fails = _failures(name, name, _fm_loss_with(unshaped=True))
    shape = _the(fails, "each sample at its own sigma[i]")
    assert "must match the size" in shape.got and "lines up with x0's *last* dimension" in shape.hint
    for reduction, what in (("sum", "the sum of the squared errors"), ("per sample", "each sample's squared errors")):
        fails = _failures(name, name, _fm_loss_with(reduction=reduction))
        mean = _the(fails, "the mean over every element")
        assert what in mean.got and "Average over every element" in mean.hint
    verify = [c.name for c in EXERCISES[name].checks if c.name.startswith("Verify")]
    for cut in ("no_grad", "detach"):
        fails = _failures(name, name, _fm_loss_with(cut=cut))
        assert list(fails) == verify
        assert "torch.no_grad() or .detach()" in next(iter(fails.values())).hint
    fails = _failures(name, name, _fm_loss_with(item=True))
    assert ".item()" in _the(fails, "a 0-dim tensor").hint


def test_the_flow_euler_checks_name_the_usual_mistakes():
    """Right (the checks' reference and the library's sampler too): every point. The step's sign, v at sigmas[i + 1],
    the last step skipped, a scalar sigma, the timestep in the update or in the call, noise changed in place, the whole
    trajectory returned: each fails the check that names it, with its hint; the ring's check catches the sign."""
    from course_lib import flow
    from course_lib.checks.flow import flow_euler_sample

    name = "flow_euler_sample"
    assert not _failures(name, name, _euler_with())
    assert not _failures(name, name, flow_euler_sample)
    assert not _failures(name, name, flow.euler_sample)

    fails = _failures(name, name, _euler_with(sign=-1.0))
    step = _the(fails, "each step is x + (sigma_next - sigma) v")
    assert "sign flipped" in step.got and "x moves against the velocity" in step.hint
    assert "mean radius" in _the(fails, "Verify: with the exact field").got
    assert "sign flipped" in _the(fails, "velocity_fn is called once per step").got
    fails = _failures(name, name, _euler_with(at_next=True))
    calls = _the(fails, "velocity_fn is called once per step")
    assert "v evaluated at sigmas[i + 1]" in calls.got and "where the step starts" in calls.hint
    assert "v evaluated at sigmas[i + 1]" in _the(fails, "equals diffusers'").got
    fails = _failures(name, name, _euler_with(skip_last=True))
    last = _the(fails, "the last step, down to sigma = 0, is taken")
    assert "the last step skipped" in last.got and "range(len(sigmas) - 1)" in last.hint
    assert "the last step skipped" in _the(fails, "velocity_fn is called once per step").got
    fails = _failures(name, name, _euler_with(scalar=True))
    calls = _the(fails, "velocity_fn is called once per step")
    assert "takes sigma of shape (B,)" in calls.got and "(B,) tensor of noise levels" in calls.hint
    assert len(fails) == len(EXERCISES[name].checks)
    fails = _failures(name, name, _euler_with(timestep_update=True))
    step = _the(fails, "each step is x + (sigma_next - sigma) v")
    assert "the timestep 1000 sigma in the update" in step.got and "with sigma in [0, 1]" in step.hint
    fails = _failures(name, name, _euler_with(timestep_call=True))
    assert "in [0, 1]" in _the(fails, "equals diffusers'").got and "1000 sigma" in _the(fails, "equals diffusers'").hint
    fails = _failures(name, name, _euler_with(in_place=True))
    assert "in place" in _the(fails, "equals diffusers'").got
    fails = _failures(name, name, _euler_with(trajectory=True))
    assert "not the whole trajectory" in _the(fails, "equals diffusers'").hint


def test_the_flow_euler_checks_score_samples_not_what_the_learners_process_reports():
    """The probe's log of calls and the ring's shape can be forged from the learner's side: a sampler that writes the
    log and returns points on the ring, without ever calling the velocity function, gets no point."""

    def forged(velocity_fn, noise, sigmas):
        velocity_fn.calls[:] = [(noise.shape[0], float(s), float(s)) for s in sigmas[:-1]]
        if tuple(noise.shape) == (2000, 2):
            return 2 * noise / noise.norm(dim=1, keepdim=True)  # every point on the ring, none where the ODE goes
        return noise.clone()

    fails = _failures("flow_euler_sample", "flow_euler_sample", forged)
    assert len(fails) == len(EXERCISES["flow_euler_sample"].checks)
    assert "point by point" in _the(fails, "Verify: with the exact field").expected


def test_a_number_the_learner_controls_cannot_raise_inside_a_check():
    from course_tools.checking import Failed, Run

    run = Run.__new__(Run)
    for bad in (complex(1, 2), 10 ** 400):
        try:
            run.number(bad, "x")
        except Failed as err:
            assert "x to be" in err.expected
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_a_failed_checks_texts_are_cut_so_a_learners_object_cannot_blow_up_a_report():
    from course_tools.checking import MAX_MESSAGE_CHARS, Failed

    err = Failed("a dict", "keys " + "x" * 10_000_000, "h" * 5000)
    assert len(err.got) < MAX_MESSAGE_CHARS + 60 and "more characters" in err.got
    assert len(err.hint) < MAX_MESSAGE_CHARS + 60 and len(str(err)) < 3 * MAX_MESSAGE_CHARS
    assert Failed("a", "b", None).hint is None and Failed("a", "b").got == "b"


def test_replacing_a_probes_method_is_reported_as_suspicious_code():
    """A probe runs in the learner's process, so a submission can replace its methods (a forged gradient() earned
    the gradient check of flow_matching_loss in an attack); the grader reports such code to the instructor."""
    import nbformat

    from course_tools.grading.executor import _suspicious_source

    for source in ("type(velocity_fn).gradient = fake", "velocity_fn.__class__.gradient = fake",
                   "setattr(type(velocity_fn), 'gradient', fake)", "from course_tools.agent import ProbeVelocity"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        assert _suspicious_source(nb), source
    assert not _suspicious_source(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = velocity_fn(x, s)")]))
