"""course_lib.lineage: the published configs of SD 1.5, 2.1, SDXL and SD 3, built on the meta device.

The counts are computed from the real diffusers / transformers classes, never typed in: the tests
assert relationships (the two ways of counting agree up to ties and buffers; widths that must match
do match) and magnitudes that the model cards and papers state (860M, 2.6B, ...).
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline

from course_lib import lineage as L


@pytest.fixture(scope="module")
def counts():
    """{release name: {role: Count}} for every release (all built on meta: about a second)."""
    return {r.name: {row.role: row.count for row in L.count_release(r)} for r in L.RELEASES.values()}


@pytest.fixture(scope="module")
def sdxl_unet():
    return L.SDXL_BASE.denoiser.build()


def test_the_largest_part_builds_on_meta_without_memory():
    t5 = L.SD3_MEDIUM.text_encoders[2].build()  # 4.7 billion parameters, 19 GB in float32 if it were real
    assert {p.device.type for p in t5.parameters()} == {"meta"}


def test_state_dict_is_parameters_plus_ties_plus_buffers(counts):
    for name, roles in counts.items():
        for role, c in roles.items():
            assert c.state_dict == c.parameters + c.tied + c.buffers, (name, role)


def test_the_two_counts_differ_exactly_where_expected(counts):
    t5 = counts["SD 3 medium"]["text encoder 3"]
    cfg = L.T5_V1_1_XXL
    assert t5.tied == cfg["vocab_size"] * cfg["d_model"]  # `shared` and `encoder.embed_tokens` are one tensor
    assert t5.tied_names == ("encoder.embed_tokens.weight",)
    mmdit = counts["SD 3 medium"]["denoiser"]
    tr = L.SD3_MEDIUM_TRANSFORMER
    width = tr["num_attention_heads"] * tr["attention_head_dim"]
    assert mmdit.buffers == tr["pos_embed_max_size"] ** 2 * width  # the stored sin-cos position table
    assert mmdit.buffer_names == ("pos_embed.pos_embed",)
    others = [c for n, roles in counts.items() for r, c in roles.items() if (n, r) not in
              {("SD 3 medium", "text encoder 3"), ("SD 3 medium", "denoiser")}]
    assert all(c.parameters == c.state_dict for c in others)


def test_magnitudes_stated_by_the_papers_and_model_cards(counts):
    unet15 = counts["SD 1.5"]["denoiser"].parameters
    unet21 = counts["SD 2.1"]["denoiser"].parameters
    xl = counts["SDXL base"]["denoiser"].parameters
    assert 855e6 < unet15 < 865e6  # "860M"
    assert unet15 < unet21 < 870e6  # only the cross-attention K/V inputs grow (768 -> 1024)
    assert 2.55e9 < xl < 2.65e9  # "2.6B"
    assert 2.9 < xl / unet15 < 3.1  # "3x larger"
    assert 2.0e9 < counts["SD 3 medium"]["denoiser"].parameters < 2.1e9  # "2B" (SD 3 medium)
    assert counts["SD 3 medium"]["denoiser"].parameters < xl  # SD 3 medium's denoiser is smaller than SDXL's
    assert 4.7e9 < counts["SD 3 medium"]["text encoder 3"].parameters < 4.8e9  # T5-XXL's encoder
    assert 80e6 < counts["SD 1.5"]["VAE"].parameters < 85e6
    assert 120e6 < counts["SD 1.5"]["text encoder"].parameters < 125e6  # CLIP ViT-L/14 text tower
    assert 300e6 < counts["SD 1.5"]["ControlNet"].parameters < 0.5 * unet15  # the copied encoder half


def test_text_widths_match_the_denoisers(counts):
    l14, bigg, t5 = L.CLIP_VIT_L14, L.OPENCLIP_VIT_BIGG14, L.T5_V1_1_XXL
    assert L.SD15_UNET["cross_attention_dim"] == l14["hidden_size"] == 768
    assert L.SD21_UNET["cross_attention_dim"] == L.OPENCLIP_VIT_H14_SD2["hidden_size"] == 1024
    assert L.SDXL_BASE_UNET["cross_attention_dim"] == l14["hidden_size"] + bigg["hidden_size"] == 2048
    assert L.SDXL_REFINER_UNET["cross_attention_dim"] == bigg["hidden_size"]
    n_base, n_refiner = 6, 5
    assert L.SDXL_BASE_UNET["projection_class_embeddings_input_dim"] == bigg["projection_dim"] + n_base * 256
    assert L.SDXL_REFINER_UNET["projection_class_embeddings_input_dim"] == bigg["projection_dim"] + n_refiner * 256
    tr = L.SD3_MEDIUM_TRANSFORMER
    assert tr["pooled_projection_dim"] == l14["projection_dim"] + bigg["projection_dim"]
    assert tr["joint_attention_dim"] == t5["d_model"] >= l14["hidden_size"] + bigg["hidden_size"]


def test_resolutions_and_latents():
    got = {r.name: (r.native_resolution, r.latent_channels, r.vae_scale_factor) for r in L.RELEASES.values()}
    assert got == {"SD 1.5": (512, 4, 8), "SD 2.1": (768, 4, 8), "SDXL base": (1024, 4, 8),
                   "SDXL refiner": (1024, 4, 8), "SD 3 medium": (1024, 16, 8)}
    assert L.SD3_MEDIUM.latent_shape(1024, 1024) == (16, 128, 128)
    assert L.sd3_token_count(1024, 1024) == 4096
    assert L.sd3_token_count(512, 768) == 32 * 48
    with pytest.raises(ValueError, match="multiples of 8"):
        L.SD15.latent_shape(500, 512)


def test_meta_forward_shapes():
    unet = L.SD15.denoiser.build()
    with torch.device("meta"):
        out = unet(torch.randn(2, 4, 64, 64), torch.tensor([10, 10]), encoder_hidden_states=torch.randn(2, 77, 768)).sample
    assert out.shape == (2, 4, 64, 64)
    mmdit = L.SD3_MEDIUM.denoiser.build()
    with torch.device("meta"):
        out = mmdit(hidden_states=torch.randn(1, 16, 64, 96), encoder_hidden_states=torch.randn(1, 77 + 256, 4096),
                    pooled_projections=torch.randn(1, 2048), timestep=torch.tensor([500.0])).sample
    assert out.shape == (1, 16, 64, 96)


def test_clip_has_77_positions_and_t5_has_none():
    clip = L.SDXL_BASE.text_encoders[1].build()
    with torch.device("meta"), pytest.raises(ValueError, match="77"):
        clip(input_ids=torch.zeros(1, 78, dtype=torch.long))
    t5 = L.SD3_MEDIUM.text_encoders[2].build()
    with torch.device("meta"):
        assert t5(input_ids=torch.zeros(1, 300, dtype=torch.long)).last_hidden_state.shape == (1, 300, 4096)


def test_breakdown_adds_up(counts, sdxl_unet):
    for release in (L.SD15, L.SD3_MEDIUM):
        for role, part in release.parts().items():
            kinds = L.breakdown(part.build())
            assert sum(kinds.values()) == counts[release.name][role].parameters, (release.name, role)
    kinds = L.breakdown(sdxl_unet)
    assert kinds["attention/transformer"] > kinds["ResNet blocks"] > 0


def test_add_time_ids_match_the_sdxl_pipelines(sdxl_unet):
    """The course's add_time_ids equal diffusers' pipelines' (called with a stand-in for the pipeline object)."""
    bigg = L.OPENCLIP_VIT_BIGG14["projection_dim"]
    fake = SimpleNamespace(unet=sdxl_unet)
    theirs = StableDiffusionXLPipeline._get_add_time_ids(fake, (800, 600), (16, 0), (1024, 1024), torch.float32,
                                                         text_encoder_projection_dim=bigg)
    ours = L.sdxl_add_time_ids((800, 600), (16, 0), (1024, 1024))
    assert torch.equal(ours, theirs)

    refiner = L.SDXL_REFINER.denoiser.build()
    fake = SimpleNamespace(unet=refiner, config=SimpleNamespace(requires_aesthetics_score=True))
    theirs, _ = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        fake, (1024, 1024), (0, 0), (1024, 1024), 6.0, 2.5, (1024, 1024), (0, 0), (1024, 1024), torch.float32,
        text_encoder_projection_dim=bigg)
    assert torch.equal(L.refiner_add_time_ids((1024, 1024), (0, 0), 6.0), theirs)


def test_added_embedding_input_is_what_the_unet_feeds_its_mlp(sdxl_unet):
    """On a tiny real "text_time" U-Net: add_embedding(our vector) equals the U-Net's own get_aug_embed."""
    assert sdxl_unet.add_embedding.linear_1.in_features == 1280 + 6 * 256
    tiny = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(2, 12, generator=g)
    ids = torch.cat([L.sdxl_add_time_ids((512, 512), (0, 0), (1024, 1024)),
                     L.sdxl_add_time_ids((1024, 768), (64, 32), (1024, 1024))])
    vector = L.added_embedding_input(ids, pooled, time_embed_dim=8)
    assert vector.shape == (2, 12 + 6 * 8)
    with torch.no_grad():
        theirs = tiny.get_aug_embed(emb=torch.zeros(2, 128), encoder_hidden_states=torch.zeros(2, 3, 16),
                                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        torch.testing.assert_close(tiny.add_embedding(vector), theirs)


def test_fmt_params():
    assert L.fmt_params(2_567_463_684) == "2.567B"
    assert L.fmt_params(859_520_964) == "859.52M"
    assert L.fmt_params(12_345) == "12.3K"


def test_markdown_table():
    assert L.markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n| --- | --- |\n| 1 | x\\|y |"


def test_check_yourself_passes_right_answers_and_stops_on_wrong_ones(counts):
    from course_lib.checks import check
    from course_lib.checks import lineage as lineage_checks
    from course_tools.checking import ExerciseIncomplete

    # the check's own references agree with what the lesson computes with course_lib.lineage
    ratio = counts["SDXL base"]["denoiser"].parameters / counts["SD 1.5"]["denoiser"].parameters
    assert ratio == pytest.approx(lineage_checks.SDXL_UNET_PARAMETERS / lineage_checks.SD15_UNET_PARAMETERS, rel=1e-9)
    for h, w in ((1024, 1024), (512, 768), (768, 1344)):
        assert lineage_checks.mmdit_sequence_length(h, w) == L.sd3_token_count(h, w) + 77 + 256
    assert torch.equal(lineage_checks.sdxl_time_ids((800, 600), (16, 0), (1024, 1024)),
                       L.sdxl_add_time_ids((800, 600), (16, 0), (1024, 1024)))
    assert not hasattr(L, "check_yourself")  # the library module holds no checker

    tokens = lambda h, w: (h // 16) * (w // 16) + 77 + 256  # noqa: E731
    ids = lambda o, c, t: torch.tensor([[*o, *c, *t]], dtype=torch.float32)  # noqa: E731
    assert check("lineage_numbers", ratio, tokens, ids) is None
    swapped = lambda o, c, t: torch.tensor([[*o, *t, *c]], dtype=torch.float32)  # noqa: E731
    with pytest.raises(ExerciseIncomplete):
        check("lineage_numbers", ratio, tokens, swapped)