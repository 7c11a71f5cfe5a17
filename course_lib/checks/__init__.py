"""The checks of every exercise, one module per lesson, each with its own reference implementations.

A notebook's checker cell calls `check` with the exercise's id and the learner's objects; the
grader (``course_tools/grading``) runs the same `Exercise` objects against a sandboxed kernel. The
framework is ``course_tools/checking.py``; ``docs/grading.md`` is the instructor's guide.

| notebook (solutions/ and exercises/) | exercises |
| --- | --- |
| 00_recap_exercises | ex84_schedule_comparator, ex84_noise_predictor_evaluator, ex84_unet_analyzer |
| 01_vae_exercises | ex85_vae_compression, ex01_reparameterise |
| 02_cross_attention_exercises | ex02_cross_attention_head |
| 03_clip_exercises | ex03_contrastive_loss |
| 04_guidance_exercises | ex85_cfg_simulator, ex04_guidance_rescale |
| 05_samplers_exercises | ex85_ddim_step_estimator, ex05_euler_step |
| 06_controlnet_exercises | ex06_zero_convolution |
| 07_pipeline_exercises | ex07_guided_denoising_step |
| 08_lineage_exercises | ex08_parameter_count |
"""

from __future__ import annotations

from typing import Any

from course_tools.checking import Exercise, run_in_notebook
from course_lib.checks import (attention, clip, controlnet, guidance, lineage, pipeline, recap, samplers,
                               vae)

EXERCISES: dict[str, Exercise] = {
    ex.id: ex
    for ex in (
        recap.SCHEDULES,
        recap.EVALUATOR,
        recap.UNET,
        vae.COMPRESSION,
        vae.REPARAMETERISE,
        attention.HEAD,
        clip.CONTRASTIVE,
        guidance.CFG_SIMULATOR,
        guidance.RESCALE,
        samplers.DDIM_ESTIMATOR,
        samplers.EULER,
        controlnet.ZERO_CONV,
        pipeline.GUIDED_STEP,
        lineage.PARAMETER_COUNT,
    )
}


def check(exercise_id: str, *objects: Any) -> None:
    """Run the checks of one exercise on the objects you defined, show the table of results, and
    stop with a one-line error when a check fails (so that "Run all" stops there too)."""
    if exercise_id not in EXERCISES:
        raise KeyError(f"no exercise {exercise_id!r}; known: {', '.join(EXERCISES)}")
    run_in_notebook(EXERCISES[exercise_id], objects)
