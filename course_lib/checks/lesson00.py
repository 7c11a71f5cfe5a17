"""The "check yourself" cell of lesson 0 (notebooks/00_welcome.ipynb).

The learner writes ``snr_db(alphas_cumprod)`` and ``first_below(alphas_cumprod, level_db)``; the checks
run them on the course's three schedules and on random ones, against references computed in float64.
"""

from __future__ import annotations

import torch

from course_tools.checking import Exercise, ExerciseResult, run_in_notebook
from course_lib.schedules import NoiseSchedule, cosine_betas, linear_betas, sd_schedule


def snr_db(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """10 log10(alpha_bar / (1 - alpha_bar)), elementwise."""
    ab = alphas_cumprod.double()
    return 10 * torch.log10(ab / (1 - ab))


def first_below(alphas_cumprod: torch.Tensor, level_db: float = 0.0) -> int:
    """The first timestep whose SNR is at or below ``level_db``; len(alphas_cumprod) if there is none."""
    below = (snr_db(alphas_cumprod) <= level_db).nonzero()
    return int(below[0]) if len(below) else len(alphas_cumprod)


def _schedules() -> dict:
    return {
        "linear": NoiseSchedule.from_betas(linear_betas(1000)).alphas_cumprod,
        "cosine": NoiseSchedule.from_betas(cosine_betas(1000)).alphas_cumprod,
        "SD scaled-linear": sd_schedule().alphas_cumprod,
    }


L00 = Exercise("l00_snr", "Lesson 0: SNR and its 0 dB crossing", targets=("snr_db", "first_below"))


@L00.check("snr_db(alphas_cumprod) is 10 log10(alpha_bar / (1 - alpha_bar)) for every timestep", points=2,
           hint="Work elementwise on the whole tensor: 10 * torch.log10(ab / (1 - ab)).")
def _(run, learner):
    for name, ab in _schedules().items():
        got = run.call(learner.snr_db, ab.clone(), label=f"snr_db(<{name} alphas_cumprod>)")
        run.close(got, snr_db(ab), f"snr_db(<{name} alphas_cumprod>)", rtol=1e-4, atol=1e-3, kind="tensor")


@L00.check("first_below finds the first timestep at or below a level, on any schedule", points=2,
           hint="(snr_db(ab) <= level_db).nonzero() lists the timesteps below the level; take the first one.")
def _(run, learner):
    for name, ab in _schedules().items():
        got = run.call(learner.first_below, ab.clone(), 0.0, label=f"first_below(<{name}>, 0.0)")
        run.equal(int(run.number(got, f"first_below(<{name}>, 0.0)")), first_below(ab, 0.0), f"first_below(<{name}>, 0.0)")
    rng = run.rng(0)
    for k in range(2):
        betas = torch.sort(torch.tensor(rng.uniform(1e-4, 0.03, size=200), dtype=torch.float32)).values
        ab = torch.cumprod(1 - betas, 0)
        level = float(rng.uniform(-10, 10))
        got = run.call(learner.first_below, ab.clone(), level, label=f"first_below(<random schedule {k}>, {level:.2f})")
        run.equal(int(run.number(got, "first_below(...)")), first_below(ab, level), f"first_below(<random schedule {k}>, {level:.2f})")


@L00.check("Verify: the cosine schedule crosses 0 dB later than the linear one, and SD's lies between", points=1,
           hint="Compute first_below(ab, 0.0) for each of the three schedules and compare.")
def _(run, learner):
    s = _schedules()
    at = {name: int(run.number(run.call(learner.first_below, ab.clone(), 0.0), f"first_below(<{name}>, 0.0)"))
          for name, ab in s.items()}
    run.expect(at["linear"] < at["SD scaled-linear"] < at["cosine"], "linear < SD scaled-linear < cosine",
               ", ".join(f"{k}: {v}" for k, v in at.items()))


def check_yourself(snr_db_fn, first_below_fn) -> ExerciseResult:
    """Run lesson 0's checks on your two functions: a table of checks, or a one-line error while one fails."""
    return run_in_notebook(L00, (snr_db_fn, first_below_fn))
