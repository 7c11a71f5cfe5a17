"""Every check of the course, one module per idea, each with its own reference implementations.

There are two kinds, run the same way: the graded **exercises** of the notebooks in ``solutions/``
(and the generated ``exercises/``), and the short **check yourself** cells of the lessons in
``notebooks/``. A cell of either kind calls::

    from course_lib.checks import check
    check("schedule_comparator", ScheduleComparator)

with the check's id and the learner's objects, in the order of the check's ``targets``. It shows one
table of checks and returns nothing; while a check fails it stops with a one-line error (so that
"Run all" stops there too). The grader (``course_tools/grading``) runs the same `Exercise` objects
against a sandboxed kernel, for the graded exercises only (`EXERCISES`). The framework is
``course_tools/checking.py``; ``docs/grading.md`` is the instructor's guide.

| module | graded exercises (notebook in solutions/) | check yourself (lesson in notebooks/) |
| --- | --- | --- |
| recap | schedule_comparator, noise_predictor_evaluator, unet_analyser (00_recap_exercises) | snr_crossing (00_welcome) |
| vae | vae_compression, reparameterise (01_vae_exercises) | scaling_factor (01_vae_latent_space) |
| attention | cross_attention_head (02_cross_attention_exercises) | attention_heads (02_cross_attention) |
| clip | contrastive_loss (03_clip_exercises) | clip_context (03_clip) |
| guidance | cfg_simulator, guidance_rescale, rescale_in_v_space (04_guidance_exercises) | per_sample_guidance (04_classifier_free_guidance) |
| samplers | ddim_step_estimator, euler_step, dpmpp_2m_step (05_samplers_exercises) | timestep_spacing (05_ddim_and_samplers) |
| controlnet | zero_convolution, edge_map_from_mask (06_controlnet_exercises) | combine_controls (06_controlnet) |
| pipeline | guided_denoising_step (07_pipeline_exercises) | pipeline_shapes (07_complete_pipeline) |
| training | diffusion_training_step (07_pipeline_exercises) | |
| lineage | parameter_count (08_lineage_exercises) | lineage_numbers (08_sd_lineage) |
| editing | img2img_timesteps, inpaint_blend_step (09_editing_exercises) | ddim_inverse_step (09_editing) |
| personalize | lora_linear, textual_inversion_loss (10_personalize_exercises) | |
| flow | flow_matching_loss, flow_euler_sample (11_flow_matching_exercises) | |
"""

from __future__ import annotations

from typing import Any

from course_tools.checking import Exercise, run_in_notebook
from course_lib.checks import (attention, clip, controlnet, editing, flow, guidance, lineage, personalize, pipeline,
                               recap, samplers, training, vae)

# Two registries of the same shape on purpose: the grader must see only EXERCISES.
# The graded exercises, in the order of their notebooks: the grader scores these and only these.
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
        guidance.V_RESCALE,
        samplers.DDIM_ESTIMATOR,
        samplers.EULER,
        samplers.DPMPP_2M,
        controlnet.ZERO_CONV,
        controlnet.EDGE_MAP,
        pipeline.GUIDED_STEP,
        training.TRAINING_STEP,
        lineage.PARAMETER_COUNT,
        editing.IMG2IMG,
        editing.BLEND,
        personalize.LORA,
        personalize.TI_LOSS,
        flow.FM_LOSS,
        flow.EULER,
    )
}

# The lessons' "check yourself" cells, in lesson order: feedback for the learner, never graded.
CHECK_YOURSELF: dict[str, Exercise] = {
    ex.id: ex
    for ex in (
        recap.SNR_CROSSING,
        vae.SCALING_FACTOR,
        attention.ATTENTION_HEADS,
        clip.CLIP_CONTEXT,
        guidance.PER_SAMPLE_GUIDANCE,
        samplers.TIMESTEP_SPACING,
        controlnet.COMBINE_CONTROLS,
        pipeline.PIPELINE_SHAPES,
        lineage.LINEAGE_NUMBERS,
        editing.DDIM_INVERSE,
    )
}

# Every check by id: what `check` looks up. An id names one check, of one kind.
CHECKS: dict[str, Exercise] = {**EXERCISES, **CHECK_YOURSELF}


def is_graded(check_id: str) -> bool:
    """True for a graded exercise (solutions/, exercises/), False for a lesson's check-yourself cell."""
    if check_id not in CHECKS:
        raise ValueError(f"no check named {check_id!r}; the known ones are: {', '.join(CHECKS)}")
    return check_id in EXERCISES


def check(check_id: str, *objects: Any) -> None:
    """Run the checks named ``check_id`` on the objects you defined, in the order of the check's targets.

    Shows one table of results and returns None; when a check fails, stops with a one-line error
    (``ExerciseIncomplete``) after the table, so that "Run all" stops there too.
    """
    if check_id not in CHECKS:
        raise ValueError(f"no check named {check_id!r}: copy the id from the cell as the notebook gave it; "
                         f"the known ones are: {', '.join(CHECKS)}")
    run_in_notebook(CHECKS[check_id], objects)
