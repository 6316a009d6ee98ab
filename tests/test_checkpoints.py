"""Checkpoint import/export: round trips through every layout, positional-table resizing, error messages."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from staticprune.models import SegmentationModel, build_model, get_spec
from staticprune.models.checkpoints import (
    CheckpointError,
    convert_state_dict,
    detect_layout,
    load_checkpoint,
    read_state_dict,
    to_layout,
)
from staticprune.models.vit import resize_pos_embed

SEG_SIZE = (32, 48)  # non-square 2x3 grid
SEGVIT_SIZE = (64, 64)
K = 3


def _narrow_segvit(size, seed):
    """segvit-vit-b-atm's exact structure and names at ViT-T width (ATM head dim 96, head dim 32): fast to build."""
    spec = get_spec("segvit-vit-b-atm")
    spec = dataclasses.replace(spec, vit=dataclasses.replace(spec.vit, dim=192, heads=3), atm_dim=96, atm_heads=3)
    torch.manual_seed(seed)
    return SegmentationModel(spec, size, K).eval()


def _build(name, size, seed):
    if name == "segvit-narrow":
        return _narrow_segvit(size, seed)
    return build_model(name, size, num_classes=K, seed=seed)


def _outputs(model, size, seed=0):
    img = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(img)[0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and avoids OpenMP spinning on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sources(_one_thread):
    """Source models (seed 0), built once; tests never modify them."""
    return {
        "segmenter-vit-t-linear": build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=0),
        "segmenter-vit-t-mask": build_model("segmenter-vit-t-mask", SEG_SIZE, num_classes=K, seed=0),
        "segvit-vit-b-atm": build_model("segvit-vit-b-atm", SEGVIT_SIZE, num_classes=K, seed=0),
        "segvit-narrow": _narrow_segvit(SEGVIT_SIZE, seed=0),
    }


ROUND_TRIPS = [
    ("segmenter-vit-t-linear", "segmenter"),
    ("segmenter-vit-t-linear", "timm"),
    ("segmenter-vit-t-linear", "native"),
    ("segmenter-vit-t-mask", "segmenter"),
    ("segmenter-vit-t-mask", "timm"),
    ("segmenter-vit-t-mask", "native"),
    ("segvit-vit-b-atm", "mmseg"),
    ("segvit-narrow", "mmseg"),
    ("segvit-narrow", "native"),
]


IGNORED = {
    "native": [],
    "timm": ["head.bias", "head.weight"],
    "segmenter": ["encoder.head.bias", "encoder.head.weight"],
    "mmseg": ["decode_head.loss_decode.criterion.empty_weight"],
}


@pytest.mark.parametrize("name,layout", ROUND_TRIPS)
def test_round_trip_through_file(sources, tmp_path, name, layout):
    src = sources[name]
    size = src.image_size
    path = tmp_path / f"{layout}.pth"
    torch.save(to_layout(src, layout), path)

    dst = _build(name, size, seed=1)
    assert not torch.equal(_outputs(dst, size), _outputs(src, size))

    assert detect_layout(read_state_dict(path)) == layout
    report = load_checkpoint(dst, path)
    assert report.layout == layout
    assert report.loaded == len(src.state_dict())
    assert not report.resized_pos_embed and not report.kept_init
    assert sorted(report.ignored) == IGNORED[layout]
    loaded = dst.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert (_outputs(dst, size) - _outputs(src, size)).abs().max().item() == 0.0


def test_files_look_like_the_official_ones(sources):
    seg = to_layout(sources["segmenter-vit-t-mask"], "segmenter")
    assert seg["n_cls"] == K
    assert seg["model"]["encoder.head.weight"].shape == (1000, 192)
    assert {"encoder.pos_embed", "decoder.cls_emb", "decoder.proj_patch", "decoder.mask_norm.weight"} <= set(seg["model"])

    mm = to_layout(sources["segvit-vit-b-atm"], "mmseg")
    sd = mm["state_dict"]
    assert "meta" in mm
    for key in ["backbone.patch_embed.projection.weight", "backbone.layers.0.ln1.weight",
                "backbone.layers.11.attn.attn.in_proj_weight", "backbone.layers.3.attn.attn.out_proj.bias",
                "backbone.layers.0.ffn.layers.0.0.weight", "backbone.layers.0.ffn.layers.1.weight",
                "decode_head.input_proj_1.weight", "decode_head.decoder_3.layers.2.multihead_attn.q.weight",
                "decode_head.q.weight", "decode_head.class_embed.bias"]:
        assert key in sd, key
    assert not any(k.startswith("backbone.ln1.") or k.startswith("backbone.blocks.") for k in sd)
    assert torch.equal(sd["decode_head.loss_decode.criterion.empty_weight"], torch.tensor([1.0, 1.0, 1.0, 0.1]))

    timm = to_layout(sources["segmenter-vit-t-linear"], "timm")
    assert {"patch_embed.proj.weight", "blocks.11.mlp.fc2.bias", "norm.weight", "head.weight", "decoder.head.weight"} <= set(timm)


def test_wrappers_and_training_only_keys(sources):
    src = sources["segmenter-vit-t-linear"]
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    # mmseg file of a Segmenter-backbone model (final norm -> backbone.ln1), with an auxiliary head
    ckpt = to_layout(src, "mmseg")
    assert "backbone.ln1.weight" in ckpt["state_dict"]
    ckpt["state_dict"]["auxiliary_head.conv_seg.weight"] = torch.zeros(K, 8, 1, 1)
    ckpt["state_dict"]["auxiliary_head.loss_decode.criterion.empty_weight"] = torch.ones(K + 1)
    report = load_checkpoint(dst, ckpt)
    assert report.layout == "mmseg"
    assert sorted(report.ignored) == ["auxiliary_head.conv_seg.weight", "auxiliary_head.loss_decode.criterion.empty_weight"]
    assert torch.equal(_outputs(dst, SEG_SIZE), _outputs(src, SEG_SIZE))
    # DistributedDataParallel's module. prefix inside a Segmenter file
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    ddp = {"model": {"module." + k: v for k, v in to_layout(src, "segmenter")["model"].items()}, "epoch": 3}
    assert load_checkpoint(dst, ddp).layout == "segmenter"
    assert torch.equal(_outputs(dst, SEG_SIZE), _outputs(src, SEG_SIZE))


@pytest.mark.parametrize("layout", ["segmenter", "timm"])
def test_pos_embed_resized_bilinear_for_segmenter(layout):
    src = build_model("segmenter-vit-t-linear", (512, 512), num_classes=K, seed=0)  # 32x32 grid
    ckpt = to_layout(src, layout)
    dst = build_model("segmenter-vit-t-linear", (32, 64), num_classes=K, seed=1)  # 2x4 grid
    report = load_checkpoint(dst, ckpt)
    assert report.resized_pos_embed
    assert (report.pos_grid_from, report.pos_grid_to, report.pos_mode) == ((32, 32), (2, 4), "bilinear")
    expected = resize_pos_embed(src.backbone.pos_embed.detach(), (32, 32), (2, 4), mode="bilinear")
    assert expected.shape == (1, 1 + 8, 192)
    assert torch.equal(dst.backbone.pos_embed.detach(), expected)
    assert torch.equal(dst.backbone.pos_embed[:, 0], src.backbone.pos_embed[:, 0])  # CLS row kept apart
    assert torch.equal(dst.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)
    assert "resized 32x32 -> 2x4" in str(report)


@pytest.mark.parametrize("layout", ["mmseg", "native"])
def test_pos_embed_resized_bicubic_for_segvit(sources, layout):
    src = sources["segvit-narrow"]  # 4x4 grid
    dst = _narrow_segvit((32, 48), seed=1)  # 2x3 grid
    report = load_checkpoint(dst, to_layout(src, layout))
    assert report.resized_pos_embed and report.pos_mode == "bicubic"
    expected = resize_pos_embed(src.backbone.pos_embed.detach(), (4, 4), (2, 3), mode="bicubic")
    assert torch.equal(dst.backbone.pos_embed.detach(), expected)


def test_pos_grid_for_non_square_training_crops():
    src = build_model("segmenter-vit-t-linear", (32, 48), num_classes=K, seed=0)  # 2x3: 6 rows, not square
    dst = build_model("segmenter-vit-t-linear", (64, 64), num_classes=K, seed=1)
    ckpt = to_layout(src, "segmenter")
    with pytest.raises(CheckpointError, match=r"not a square grid; pass pos_grid"):
        load_checkpoint(dst, ckpt)
    with pytest.raises(CheckpointError, match=r"pos_grid=3x3 gives 9 positions"):
        load_checkpoint(dst, ckpt, pos_grid=(3, 3))
    report = load_checkpoint(dst, ckpt, pos_grid=(2, 3))
    assert report.pos_grid_from == (2, 3)
    expected = resize_pos_embed(src.backbone.pos_embed.detach(), (2, 3), (4, 4), mode="bilinear")
    assert torch.equal(dst.backbone.pos_embed.detach(), expected)
    # same row count, other grid: only pos_grid can tell, and then it resizes
    dst = build_model("segmenter-vit-t-linear", (48, 32), num_classes=K, seed=1)  # 3x2
    assert not load_checkpoint(dst, ckpt).resized_pos_embed
    assert load_checkpoint(dst, ckpt, pos_grid=(2, 3)).resized_pos_embed


def test_shape_mismatch_message_is_one_line():
    dst = build_model("segmenter-vit-t-mask", SEG_SIZE, num_classes=K, seed=1)
    big = build_model("segmenter-vit-s-mask", SEG_SIZE, num_classes=K, seed=0)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, to_layout(big, "segmenter"))
    msg = str(info.value)
    assert "\n" not in msg
    n = len(dst.state_dict()) - 2  # the LayerNorms over K classes (mask_norm) match
    assert f"shape mismatch {n} (backbone.cls_token: checkpoint 1x1x384 vs model 1x1x192" in msg
    assert "segmenter-vit-t-mask" in msg and "missing" not in msg and "unexpected" not in msg
    assert "384 wide (ViT-S), the model's 192 (ViT-T)" in msg
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # untouched on error


def test_missing_and_unexpected_keys_are_listed(sources):
    dst = build_model("segmenter-vit-t-mask", SEG_SIZE, num_classes=K, seed=1)
    sd = dict(to_layout(sources["segmenter-vit-t-mask"], "native"))
    del sd["decoder.cls_emb"]
    del sd["backbone.blocks.3.mlp.fc1.bias"]
    sd["decoder.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, sd)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing 2 keys (backbone.blocks.3.mlp.fc1.bias, decoder.cls_emb)" in msg
    assert "unexpected 1 key (decoder.extra.weight)" in msg
    assert "shape mismatch" not in msg


def test_class_count_hint(sources):
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=5, seed=1)
    ckpt = to_layout(sources["segmenter-vit-t-linear"], "segmenter")
    with pytest.raises(CheckpointError, match=r"shape mismatch 2 \(decoder\.head\.weight: checkpoint 3x192 vs model 5x192.*num_classes=3"):
        load_checkpoint(dst, ckpt)
    report = load_checkpoint(dst, ckpt, backbone_only=True)
    assert sorted(report.kept_init) == ["decoder.head.bias", "decoder.head.weight"]
    assert "decoder.head.weight" in report.ignored


def test_decoder_kind_hint(sources):
    dst = build_model("segmenter-vit-t-mask", SEG_SIZE, num_classes=K, seed=1)
    ckpt = to_layout(sources["segmenter-vit-t-linear"], "segmenter")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, ckpt)
    msg = str(info.value)
    assert "missing 33 keys (decoder.cls_emb, decoder.proj_patch, decoder.proj_classes, ...)" in msg
    assert "unexpected 2 keys (decoder.head.weight, decoder.head.bias)" in msg
    assert "the checkpoint has a linear decoder, the model a mask decoder" in msg


def test_timm_layout_needs_backbone_only_without_decoder(sources):
    src = sources["segmenter-vit-t-mask"]
    timm = {k: v for k, v in to_layout(src, "timm").items() if not k.startswith("decoder.")}
    dst = build_model("segmenter-vit-t-mask", SEG_SIZE, num_classes=K, seed=1)
    with pytest.raises(CheckpointError, match="timm layout, which carries only the backbone.*backbone_only=True"):
        load_checkpoint(dst, timm)
    decoder_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("decoder.")}
    report = load_checkpoint(dst, timm, backbone_only=True)
    assert report.layout == "timm" and "head.weight" in report.ignored
    assert set(report.kept_init) == set(decoder_before)
    for k, v in dst.state_dict().items():
        expected = decoder_before[k] if k.startswith("decoder.") else src.state_dict()[k]
        assert torch.equal(v, expected), k


def test_timm_distilled_token_is_dropped(sources):
    src = sources["segmenter-vit-t-linear"]
    timm = to_layout(src, "timm")
    pos = timm["pos_embed"]
    timm["pos_embed"] = torch.cat([pos[:, :1], torch.full_like(pos[:, :1], 7.0), pos[:, 1:]], dim=1)
    timm["dist_token"] = torch.zeros(1, 1, 192)
    timm["head_dist.weight"] = torch.zeros(1000, 192)
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    load_checkpoint(dst, timm)
    assert torch.equal(dst.backbone.pos_embed, src.backbone.pos_embed)


def test_segmenter_distilled_is_refused(sources):
    ckpt = to_layout(sources["segmenter-vit-t-linear"], "segmenter")
    ckpt["model"]["encoder.dist_token"] = torch.zeros(1, 1, 192)
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    with pytest.raises(CheckpointError, match="DeiT-distilled encoders are not supported"):
        load_checkpoint(dst, ckpt)


def test_unreadable_and_missing_files(tmp_path):
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    missing = tmp_path / "nope.pth"
    for path in (junk, empty, missing, tmp_path):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(dst, path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(missing)


class _Pickled:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1)}, "meta": _Pickled()}, path)
    with pytest.raises(CheckpointError, match=r"pickles Python objects .*_Pickled.* weights-only load refuses") as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_detect_layout_and_convert():
    assert detect_layout({"backbone.blocks.0.norm1.weight": torch.zeros(1)}) == "native"
    assert detect_layout({"module.blocks.0.norm1.weight": torch.zeros(1)}) == "timm"
    assert detect_layout({"encoder.cls_token": torch.zeros(1)}) == "segmenter"
    assert detect_layout({"backbone.layers.0.ln1.weight": torch.zeros(1)}) == "mmseg"
    assert detect_layout({"layers.0.ln1.weight": torch.zeros(1)}) == "mmseg"  # bare converted backbone
    with pytest.raises(CheckpointError, match="cannot tell the layout"):
        detect_layout({"foo.weight": torch.zeros(1)})

    model = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    mm = to_layout(model, "mmseg")["state_dict"]
    assert convert_state_dict(mm, "mmseg", model).keys() == model.state_dict().keys()
    bare = {k[len("backbone."):]: v for k, v in mm.items() if k.startswith("backbone.")}
    conv = convert_state_dict(bare, "auto", model, backbone_only=True)
    assert set(conv) == {k for k in model.state_dict() if k.startswith("backbone.")}


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_never_escape_as_another_exception(tmp_path, seed):
    import random

    from staticprune.models.checkpoints import CheckpointError, read_state_dict

    rng = random.Random(seed)
    junk = tmp_path / f"junk{seed}.pth"
    junk.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 64, 300]))))
    with pytest.raises(CheckpointError, match=f"junk{seed}.pth"):
        read_state_dict(junk)
