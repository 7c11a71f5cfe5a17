"""Checks of the recap of part 1: noise schedules, SNR, noise-predictor baselines, U-Net arithmetic.

| id | where | kind |
| --- | --- | --- |
| schedule_comparator | solutions/00_recap_exercises.ipynb | graded exercise |
| noise_predictor_evaluator | solutions/00_recap_exercises.ipynb | graded exercise |
| unet_analyser | solutions/00_recap_exercises.ipynb | graded exercise |
| snr_crossing | notebooks/00_welcome.ipynb | check yourself |

Each check keeps its own reference implementation here (float64 where it matters).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from course_tools.checking import Exercise, Run

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def linear_alpha_bars(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), betas linear from beta_start to beta_end (DDPM)."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_alpha_bars(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2),
    for t = 1..T, with every beta = 1 - alpha_bar(t)/alpha_bar(t-1) capped at max_beta (their Sec. 3.2;
    diffusers' "squaredcos_cap_v2")."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def snr_db(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), in decibels."""
    return 10 * torch.log10(alpha_bar / (1 - alpha_bar))


def zero_crossing(alpha_bars: torch.Tensor) -> int | None:
    """First t with alpha_bar_t <= 0.5 (SNR <= 0 dB), or None when it never gets there."""
    hits = torch.nonzero(torch.as_tensor(alpha_bars) <= 0.5)
    return int(hits[0]) if len(hits) else None


def timestep_bins(T: int) -> list[tuple[int, int]]:
    """Four equal bins of timesteps, inclusive: (0, T/4 - 1), ..., (3T/4, T - 1)."""
    w = T // 4
    return [(k * w, (k + 1) * w - 1 if k < 3 else T - 1) for k in range(4)]


def binned_mse(pred: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, T: int) -> dict:
    """Mean over the samples of each timestep bin of the per-sample MSE."""
    per_sample = ((pred.double() - noise.double()) ** 2).flatten(1).mean(1)  # (N,)
    out = {}
    for lo, hi in timestep_bins(T):
        mask = (timesteps >= lo) & (timesteps <= hi)
        out[(lo, hi)] = float(per_sample[mask].mean()) if mask.any() else float("nan")
    return out


def build_unet(in_ch: int, channels: list[int]) -> torch.nn.ModuleDict:
    """The toy U-Net of the analyser exercise as real layers (only counted, never run)."""
    layers = torch.nn.ModuleDict()
    prev = in_ch
    for i, c in enumerate(channels):
        layers[f"enc_{i + 1}"] = torch.nn.Conv2d(prev, c, 3, padding=1)
        prev = c
    layers["bottleneck"] = torch.nn.Conv2d(channels[-1], channels[-1], 3, padding=1)
    for i in reversed(range(len(channels))):
        c_up = channels[-1] if i == len(channels) - 1 else channels[i + 1]
        layers[f"dec_{i + 1}"] = torch.nn.ModuleList([
            torch.nn.ConvTranspose2d(c_up, channels[i], 4, stride=2, padding=1),
            torch.nn.Conv2d(2 * channels[i], channels[i], 3, padding=1),
        ])
    layers["head"] = torch.nn.Conv2d(channels[0], in_ch, 1)
    return layers


def unet_levels(in_ch: int, channels: list[int], input_res: int) -> list[dict]:
    """name, channels, resolution, params, memory_bytes (float32 output of the level, batch 1)."""
    def conv(ci: int, co: int, k: int) -> int:
        return co * ci * k * k + co

    levels, prev, L = [], in_ch, len(channels)
    for i, c in enumerate(channels):
        res = input_res // 2**i
        levels.append(dict(name=f"enc_{i + 1}", channels=c, resolution=res, params=conv(prev, c, 3)))
        prev = c
    levels.append(dict(name="bottleneck", channels=channels[-1], resolution=input_res // 2**L,
                       params=conv(channels[-1], channels[-1], 3)))
    for i in reversed(range(L)):
        c_up = channels[-1] if i == L - 1 else channels[i + 1]
        levels.append(dict(name=f"dec_{i + 1}", channels=channels[i], resolution=input_res // 2**i,
                           params=conv(c_up, channels[i], 4) + conv(2 * channels[i], channels[i], 3)))
    levels.append(dict(name="head", channels=in_ch, resolution=input_res, params=conv(channels[0], in_ch, 1)))
    for lv in levels:
        lv["memory_bytes"] = lv["channels"] * lv["resolution"] ** 2 * 4
    return levels


# ==============================================================================================
# Exercise 1: the schedule comparator
# ==============================================================================================
SCHEDULES = Exercise("schedule_comparator", "Noise schedule comparator", targets=("ScheduleComparator",))


@SCHEDULES.setup
def _(run: Run, learner) -> dict:
    return {"comp": run.call(learner.ScheduleComparator, label="ScheduleComparator()")}


@SCHEDULES.check("linear_schedule(T) is DDPM's alpha-bar, for several T and beta ranges", points=2,
                 hint="betas = torch.linspace(beta_start, beta_end, T); alpha_bar = torch.cumprod(1 - betas, 0).")
def _(run, learner):
    T_random = int(run.rng(0).integers(20, 3000))
    for T, kw in [(1000, {}), (200, {}), (T_random, {}), (1000, dict(beta_start=0.00085, beta_end=0.012))]:
        got = run.call(learner.comp.linear_schedule, T, **kw)
        run.close(got, linear_alpha_bars(T, **kw), f"linear_schedule({T}{', ...' if kw else ''})",
                  rtol=2e-4, atol=1e-7, kind="tensor")


@SCHEDULES.check("cosine_schedule(T) is the cosine alpha-bar with betas capped at 0.999", points=2,
                 hint="f(t) = cos²((t/T + s)/(1 + s)·π/2) for t = 0..T; beta_t = min(1 - f(t)/f(t-1), 0.999); "
                      "alpha_bar = cumprod(1 - beta) has T values. Without the cap the last alpha_bar is ~1e-15, "
                      "not ~2e-9.")
def _(run, learner):
    for T in (1000, 50, int(run.rng(1).integers(20, 3000))):
        got = run.call(learner.comp.cosine_schedule, T)
        run.close(got, cosine_alpha_bars(T), f"cosine_schedule({T})", rtol=2e-4, atol=1e-11, kind="tensor")


@SCHEDULES.check("signal_to_noise_ratio(alpha_bar) is 10·log10(alpha_bar / (1 - alpha_bar)), elementwise",
                 hint="Work elementwise on the tensor; alpha_bar = 0.5 is 0 dB.")
def _(run, learner):
    for k, shape in enumerate([(7,), (3, 4)]):
        ab = torch.rand(*shape, generator=run.generator(k), dtype=torch.float64) * 0.998 + 0.001
        got = run.call(learner.comp.signal_to_noise_ratio, ab)
        run.close(got, snr_db(ab), "signal_to_noise_ratio(alpha_bar)", rtol=1e-4, atol=1e-5, kind="tensor")
    half = run.call(learner.comp.signal_to_noise_ratio, torch.tensor([0.5]))
    run.close(half, np.zeros(1), "signal_to_noise_ratio(0.5)", atol=1e-6, kind="tensor")


@SCHEDULES.check("find_zero_crossing(alpha_bars) is the first t with alpha_bar <= 0.5, or None", points=2,
                 hint="Return the index of the first alpha_bar <= 0.5 (SNR <= 0 dB). When no value gets there, "
                      "return None: returning the last index would claim a crossing that never happened.")
def _(run, learner):
    cases = [linear_alpha_bars(1000), cosine_alpha_bars(1000), torch.linspace(0.99, 0.6, 50),
             torch.linspace(0.4, 0.1, 10), torch.tensor([0.9, 0.7, 0.5, 0.3])]
    rng = run.rng(2)
    for _ in range(2):
        n = int(rng.integers(5, 200))
        cases.append(torch.sort(torch.tensor(rng.random(n)), descending=True).values)
    for ab in cases:
        got = run.call(learner.comp.find_zero_crossing, ab)
        run.equal(got, zero_crossing(ab), f"find_zero_crossing(<{len(ab)} values from {float(ab[0]):.3g} "
                                          f"to {float(ab[-1]):.3g}>)")


@SCHEDULES.check("compare(T) returns both crossings and the delay", points=1,
                 hint='Return {"linear_crossing": ..., "cosine_crossing": ..., "delay": cosine - linear}, '
                      "from find_zero_crossing on both schedules for this T.")
def _(run, learner):
    for T in (1000, int(run.rng(3).integers(300, 3000))):
        got = run.call(learner.comp.compare, T)
        lin, cos = zero_crossing(linear_alpha_bars(T)), zero_crossing(cosine_alpha_bars(T))
        run.equal(got, {"linear_crossing": lin, "cosine_crossing": cos, "delay": cos - lin}, f"compare({T})")


@SCHEDULES.check("Verify: at T = 1000 the cosine schedule crosses 0 dB 237 steps later; at T = 100, 33 steps "
                 "earlier", points=1,
                 hint="The linear betas are per step: with T = 100 the schedule adds far less noise in total "
                      "(alpha_bar at the end is ~0.36), so it stays above 0 dB for most of its steps.")
def _(run, learner):
    for T in (1000, 100):
        got = run.call(learner.comp.compare, T)
        run.expect(isinstance(got, dict), f"compare({T}) to return a dict", f"{type(got).__name__}")
        want = zero_crossing(cosine_alpha_bars(T)) - zero_crossing(linear_alpha_bars(T))
        run.equal(got.get("delay"), want, f"compare({T})['delay']")


# ==============================================================================================
# Exercise 2: the noise-predictor evaluator
# ==============================================================================================
EVALUATOR = Exercise("noise_predictor_evaluator", "Noise-predictor evaluator", targets=("DiffusionEvaluator",))
_SMALL = dict(T=200, n_samples=400, img_shape=(1, 8, 8))


def _make(run: Run, learner, seed: int, **kw):
    args = {**_SMALL, **kw, "seed": seed}
    return run.call(learner.DiffusionEvaluator, label=f"DiffusionEvaluator(T={args['T']}, n_samples="
                    f"{args['n_samples']}, img_shape={args['img_shape']}, seed={seed})", **args)


def _data(run: Run, ev) -> dict:
    return {k: run.get(getattr(ev, k)) for k in ("alpha_bars", "clean", "noise", "timesteps", "noisy")}


@EVALUATOR.check("the data: shapes, timesteps in [0, T), x_t = sqrt(alpha_bar)·x_0 + sqrt(1 - alpha_bar)·noise",
                 points=2, hint="Index alpha_bars with each sample's timestep and reshape to (N, 1, 1, 1) before "
                               "multiplying, so each sample gets its own alpha_bar.")
def _(run, learner):
    for k, (T, n, shape) in enumerate([(200, 64, (1, 8, 8)), (100, 30, (3, 4, 4))]):
        ev = _make(run, learner, run.seeds[k], T=T, n_samples=n, img_shape=shape)
        d = _data(run, ev)
        run.close(d["alpha_bars"], linear_alpha_bars(T), "alpha_bars", rtol=2e-4, atol=1e-7, kind="tensor")
        clean = run.tensor(d["clean"], "clean", shape=(n, *shape))
        noise = run.tensor(d["noise"], "noise", shape=(n, *shape))
        t = run.tensor(d["timesteps"], "timesteps", shape=(n,))
        run.expect(t.min() >= 0 and t.max() < T and np.all(t == np.round(t)),
                   f"integer timesteps in [0, {T})", f"values from {t.min():g} to {t.max():g}")
        ab = linear_alpha_bars(T).numpy()[t.astype(int)].reshape(-1, *[1] * len(shape))
        run.close(d["noisy"], np.sqrt(ab) * clean + np.sqrt(1 - ab) * noise, "noisy", rtol=1e-4, atol=1e-5,
                  kind="tensor")


@EVALUATOR.check("the same seed gives the same data; another seed, other data",
                 hint="Draw everything from a torch.Generator seeded with `seed` (torch.Generator().manual_seed(seed)).")
def _(run, learner):
    a, b, c = (_data(run, _make(run, learner, s, n_samples=16)) for s in (run.seeds[0], run.seeds[0], run.seeds[1]))
    for key in ("clean", "noise", "timesteps"):
        run.close(a[key], b[key], f"{key} with the same seed", rtol=0, atol=0)
    run.expect(not np.array_equal(np.asarray(a["clean"]), np.asarray(c["clean"])),
               "different clean images for different seeds", "the same images")


def _zero_result(run, learner, k: int):
    ev = _make(run, learner, run.seeds[k])
    got = run.call(ev.evaluate_predictor, ev.zero_predictor, label="evaluate_predictor(zero_predictor)")
    d = _data(run, ev)
    return got, d


@EVALUATOR.check("evaluate_predictor(predictor) gives the mean per-sample MSE in each of the 4 timestep bins",
                 points=2, hint="Call the predictor once on all samples (predictor(self.noisy, self.timesteps)), "
                                "take each sample's MSE against self.noise, then average within each bin; the keys "
                                "are (lo, hi) tuples, inclusive: (0, 49), (50, 99), ... for T = 200.")
def _(run, learner):
    got, d = _zero_result(run, learner, 0)
    want = binned_mse(torch.zeros_like(d["noise"]), d["noise"], d["timesteps"], _SMALL["T"])
    run.close(got, want, "evaluate_predictor(zero_predictor)", rtol=1e-4, atol=1e-6, kind="number")


@EVALUATOR.check("Verify: predicting zero costs about 1 in every bin, at low t as much as at high t",
                 hint="The target is the noise itself, a standard normal at every t: its mean square is 1 "
                      "whatever the timestep. Only how it is mixed into x_t changes with t.")
def _(run, learner):
    got, _ = _zero_result(run, learner, 1)
    run.expect(isinstance(got, dict) and len(got) == 4, "a dict of 4 bins", f"{got!r}"[:100])
    values = [run.number(v, f"MSE in bin {k}") for k, v in got.items()]
    run.expect(all(0.85 < v < 1.15 for v in values), "every bin's MSE within 0.85..1.15",
               ", ".join(f"{v:.3f}" for v in values))


@EVALUATOR.check("the random predictor's MSE is about 2 in every bin",
                 hint="random_predictor returns fresh standard-normal noise: E[(a - b)²] = 2 for two independent "
                      "standard normals.")
def _(run, learner):
    ev = _make(run, learner, run.seeds[2])
    got = run.call(ev.evaluate_predictor, ev.random_predictor, label="evaluate_predictor(random_predictor)")
    run.expect(isinstance(got, dict) and len(got) == 4, "a dict of 4 bins", f"{got!r}"[:100])
    values = [run.number(v, f"MSE in bin {k}") for k, v in got.items()]
    run.expect(all(1.75 < v < 2.25 for v in values), "every bin's MSE within 1.75..2.25",
               ", ".join(f"{v:.3f}" for v in values))


@EVALUATOR.check("the perfect predictor scores exactly 0 in every bin, even when samples share a timestep",
                 points=2, hint="An oracle must look its answer up by sample, not by timestep: with 400 samples "
                                "and 200 timesteps many samples share a t, and the first match by t is the wrong "
                                "sample's noise. Return self.noise for the evaluator's own noisy set.")
def _(run, learner):
    ev = _make(run, learner, run.seeds[0])
    got = run.call(ev.evaluate_predictor, ev.perfect_predictor, label="evaluate_predictor(perfect_predictor)")
    run.expect(isinstance(got, dict) and len(got) == 4, "a dict of 4 bins", f"{got!r}"[:100])
    run.close(got, {k: 0.0 for k in timestep_bins(_SMALL["T"])}, "evaluate_predictor(perfect_predictor)",
              atol=1e-10, kind="number")


@EVALUATOR.check("gaussian_optimal_predictor(x_t, t) = sqrt(1 - alpha_bar_t)·x_t, and its MSE is alpha_bar",
                 points=2, hint="For clean data drawn from N(0, 1), E[noise | x_t] = sqrt(1 - alpha_bar_t)·x_t. "
                                "Its expected MSE is alpha_bar_t: the hard timesteps are the LOW ones.")
def _(run, learner):
    ev = _make(run, learner, run.seeds[1])
    d = _data(run, ev)
    T = _SMALL["T"]
    xt = run.randn(5, 1, 8, 8, k=3)
    t = torch.tensor([0, 10, 99, 150, 199])
    ab = linear_alpha_bars(T)[t].view(-1, 1, 1, 1)
    got = run.call(ev.gaussian_optimal_predictor, xt, t)
    run.close(got, torch.sqrt(1 - ab) * xt.double(), "gaussian_optimal_predictor(x_t, t)", rtol=1e-4, atol=1e-6,
              kind="tensor")
    res = run.call(ev.evaluate_predictor, ev.gaussian_optimal_predictor,
                   label="evaluate_predictor(gaussian_optimal_predictor)")
    ab_all = linear_alpha_bars(T)[torch.as_tensor(d["timesteps"]).long()].view(-1, 1, 1, 1)
    pred = torch.sqrt(1 - ab_all) * torch.as_tensor(d["noisy"]).double()
    run.close(res, binned_mse(pred, torch.as_tensor(d["noise"]), torch.as_tensor(d["timesteps"]), T),
              "evaluate_predictor(gaussian_optimal_predictor)", rtol=1e-3, atol=1e-6, kind="number")


# ==============================================================================================
# Exercise 3: the U-Net analyser
# ==============================================================================================
UNET = Exercise("unet_analyser", "U-Net analyser", targets=("UNetAnalyzer",))


def _configs(run: Run) -> list[tuple[int, list[int], int]]:
    rng = run.rng(4)
    depth = int(rng.integers(2, 5))
    chans = sorted(int(c) for c in rng.choice([8, 16, 24, 32, 48, 64, 96, 128], size=depth))
    return [(3, [64, 128, 256], 64), (3, [32, 64, 128, 256], 64), (int(rng.integers(1, 5)), chans, 2 ** int(rng.integers(depth, 8)))]


def _levels(run: Run, learner, in_ch: int, chans: list[int], res: int):
    an = run.call(learner.UNetAnalyzer, in_ch, chans, label=f"UNetAnalyzer({in_ch}, {chans})")
    got = run.call(an.analyze, res, label=f"UNetAnalyzer({in_ch}, {chans}).analyze({res})")
    run.expect(isinstance(got, list) and all(isinstance(x, dict) for x in got), "a list of dicts, one per level",
               f"{type(got).__name__}")
    return an, got


@UNET.check("conv_params(c_in, c_out, kernel) counts the weights and the bias",
            hint="A Conv2d has c_out·c_in·k·k weights and c_out biases.")
def _(run, learner):
    an = run.call(learner.UNetAnalyzer, 3, [8, 16], label="UNetAnalyzer(3, [8, 16])")
    rng = run.rng(5)
    for _ in range(4):
        ci, co, k = (int(v) for v in (rng.integers(1, 300), rng.integers(1, 300), rng.choice([1, 3, 4, 5])))
        want = sum(p.numel() for p in torch.nn.Conv2d(ci, co, k).parameters())
        run.equal(run.call(an.conv_params, ci, co, k), want, f"conv_params({ci}, {co}, {k})")


@UNET.check("analyze() lists enc_1.., bottleneck, dec_L..dec_1, head with their channels and resolutions",
            points=2, hint="Each encoder level halves the resolution after it; the bottleneck sits at "
                           "input_res / 2**L; each decoder level doubles it back; the 1x1 head maps to in_ch.")
def _(run, learner):
    for in_ch, chans, res in _configs(run):
        _, got = _levels(run, learner, in_ch, chans, res)
        want = unet_levels(in_ch, chans, res)
        run.equal([(g.get("name"), g.get("channels"), g.get("resolution")) for g in got],
                  [(w["name"], w["channels"], w["resolution"]) for w in want],
                  f"(name, channels, resolution) of UNetAnalyzer({in_ch}, {chans}).analyze({res})")


@UNET.check("the parameters of every level", points=2,
            hint="A decoder level has an up-convolution (ConvTranspose2d, kernel 4, from the level below to c_i) "
                 "and a 3x3 conv from 2·c_i (after concatenating the skip) to c_i.")
def _(run, learner):
    for in_ch, chans, res in _configs(run):
        _, got = _levels(run, learner, in_ch, chans, res)
        want = unet_levels(in_ch, chans, res)
        run.equal([g.get("params") for g in got], [w["params"] for w in want], f"params per level for {chans}")


@UNET.check("Verify against PyTorch: the total equals the real module's parameter count",
            hint="Build the layers with torch.nn and compare sum(p.numel() for p in module.parameters()).")
def _(run, learner):
    for in_ch, chans, res in _configs(run):
        _, got = _levels(run, learner, in_ch, chans, res)
        total = sum(run.number(g.get("params"), "params") for g in got)
        run.equal(int(total), sum(p.numel() for p in build_unet(in_ch, chans).parameters()),
                  f"total parameters for UNetAnalyzer({in_ch}, {chans})")


@UNET.check("memory_bytes is the float32 size of each level's output (batch 1)",
            hint="channels × resolution × resolution × 4 bytes.")
def _(run, learner):
    for in_ch, chans, res in _configs(run):
        _, got = _levels(run, learner, in_ch, chans, res)
        run.equal([g.get("memory_bytes") for g in got], [w["memory_bytes"] for w in unet_levels(in_ch, chans, res)],
                  f"memory_bytes per level for {chans} at {res}")


@UNET.check("decoder_share() is the fraction of parameters in the dec_* levels; Verify: it is over 0.7",
            hint="Sum the params of the levels whose name starts with 'dec_' and divide by the total.")
def _(run, learner):
    for in_ch, chans, res in _configs(run):
        an = run.call(learner.UNetAnalyzer, in_ch, chans, label=f"UNetAnalyzer({in_ch}, {chans})")
        got = run.call(an.decoder_share, res)
        lv = unet_levels(in_ch, chans, res)
        want = sum(x["params"] for x in lv if x["name"].startswith("dec_")) / sum(x["params"] for x in lv)
        run.close(got, want, f"decoder_share({res}) for {chans}", rtol=1e-9, kind="number")
        run.expect(want > 0.7, "a share over 0.7", f"{want:.3f}")


# ==============================================================================================
# Check yourself (notebooks/00_welcome.ipynb): SNR and its 0 dB crossing
# ==============================================================================================
# The learner writes ``snr_db(alphas_cumprod)`` and ``first_below(alphas_cumprod, level_db)``; the checks
# run them on the course's three schedules and on random ones, against references in float64.


def first_below(alphas_cumprod: torch.Tensor, level_db: float = 0.0) -> int:
    """The first timestep whose SNR is at or below ``level_db``; len(alphas_cumprod) if there is none."""
    below = (snr_db(alphas_cumprod.double()) <= level_db).nonzero()
    return int(below[0]) if len(below) else len(alphas_cumprod)


def _lesson_schedules() -> dict[str, torch.Tensor]:
    """The three schedules lesson 0 plots, as the course's library builds them."""
    from course_lib.schedules import NoiseSchedule, cosine_betas, linear_betas, sd_schedule

    return {
        "linear": NoiseSchedule.from_betas(linear_betas(1000)).alphas_cumprod,
        "cosine": NoiseSchedule.from_betas(cosine_betas(1000)).alphas_cumprod,
        "SD scaled-linear": sd_schedule().alphas_cumprod,
    }


SNR_CROSSING = Exercise("snr_crossing", "Check yourself: SNR and its 0 dB crossing", targets=("snr_db", "first_below"))


@SNR_CROSSING.check("snr_db(alphas_cumprod) is 10 log10(alpha_bar / (1 - alpha_bar)) for every timestep", points=2,
                    hint="Work elementwise on the whole tensor: 10 * torch.log10(ab / (1 - ab)).")
def _(run, learner):
    for name, ab in _lesson_schedules().items():
        got = run.call(learner.snr_db, ab.clone(), label=f"snr_db(<{name} alphas_cumprod>)")
        run.close(got, snr_db(ab.double()), f"snr_db(<{name} alphas_cumprod>)", rtol=1e-4, atol=1e-3, kind="tensor")


@SNR_CROSSING.check("first_below finds the first timestep at or below a level, on any schedule", points=2,
                    hint="(snr_db(ab) <= level_db).nonzero() lists the timesteps below the level; take the first one.")
def _(run, learner):
    for name, ab in _lesson_schedules().items():
        got = run.call(learner.first_below, ab.clone(), 0.0, label=f"first_below(<{name}>, 0.0)")
        run.equal(int(run.number(got, f"first_below(<{name}>, 0.0)")), first_below(ab, 0.0),
                  f"first_below(<{name}>, 0.0)")
    rng = run.rng(0)
    for k in range(2):
        betas = torch.sort(torch.tensor(rng.uniform(1e-4, 0.03, size=200), dtype=torch.float32)).values
        ab = torch.cumprod(1 - betas, 0)
        level = float(rng.uniform(-10, 10))
        label = f"first_below(<random schedule {k}>, {level:.2f})"
        got = run.call(learner.first_below, ab.clone(), level, label=label)
        run.equal(int(run.number(got, label)), first_below(ab, level), label)


@SNR_CROSSING.check("Verify: the cosine schedule crosses 0 dB later than the linear one, and SD's lies between",
                    points=1, hint="Compute first_below(ab, 0.0) for each of the three schedules and compare.")
def _(run, learner):
    at = {name: int(run.number(run.call(learner.first_below, ab.clone(), 0.0), f"first_below(<{name}>, 0.0)"))
          for name, ab in _lesson_schedules().items()}
    run.expect(at["linear"] < at["SD scaled-linear"] < at["cosine"], "linear < SD scaled-linear < cosine",
               ", ".join(f"{k}: {v}" for k, v in at.items()))
