"""Checkpoint import/export: round trips through every layout, positional-table resizing, error messages."""

from __future__ import annotations

import dataclasses
import json
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
    with pytest.raises(CheckpointError, match=r"not a square grid; pass --weights-grid HxW"):
        load_checkpoint(dst, ckpt)
    with pytest.raises(CheckpointError, match=r"--weights-grid 3x3 gives 9 positions"):
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
    with pytest.raises(CheckpointError, match=r"shape mismatch 2 \(decoder\.head\.weight: checkpoint 3x192 vs model 5x192.*pass --classes 3"):
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
    with pytest.raises(CheckpointError, match="timm layout, which carries only the backbone.*pass --backbone-only"):
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


def test_segmenter_distilled_into_a_vit_model_names_the_deit_model(sources):
    ckpt = to_layout(sources["segmenter-vit-t-linear"], "segmenter")
    ckpt["model"]["encoder.dist_token"] = torch.zeros(1, 1, 192)
    dst = build_model("segmenter-vit-t-linear", SEG_SIZE, num_classes=K, seed=1)
    with pytest.raises(CheckpointError, match="DeiT-distilled encoder .*use --model segmenter-deit-t-linear$"):
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


# ----------------------------------------------------------------------------------------------- DToP / STEP heads


def _dtop_model(seed: int, options: dict) -> SegmentationModel:
    from staticprune.methods import build_static_method

    model = _narrow_segvit(SEGVIT_SIZE, seed=seed)
    model.method = build_static_method("dtop", options, model)
    return model


def _trained_heads(method: torch.nn.Module, seed: int) -> None:
    """Stand-in for trained heads: unit-variance weights (confidences spread over (0, 1)), not the seeded init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in [*method.aux_heads, method.final_head]:
            for name, p in head.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[1] ** 0.5 if p.dim() >= 2 else 4.0))
            head.class_embed.weight.mul_(3.0)


def _official_dtop_checkpoint(model: SegmentationModel) -> dict:
    """An mmcv checkpoint in DToP's layout: mmseg backbone names, `auxiliary_head.{i}.*` and `decode_head.*`
    (PruneHead names), one loss buffer per head, no SegViT decoder."""
    sd = {k: v for k, v in to_layout(model, "mmseg")["state_dict"].items() if k.startswith("backbone.")}
    for k, v in model.method.state_dict().items():
        sd[k.replace("aux_heads.", "auxiliary_head.").replace("final_head.", "decode_head.")] = v.clone()
    for head in ("auxiliary_head.0", "auxiliary_head.1", "decode_head"):
        sd[f"{head}.loss_decode.criterion.empty_weight"] = torch.tensor([1.0, 0.1])
    return {"state_dict": sd, "meta": {"mmseg_version": "1.x"}}


DTOP_OPTIONS = {"threshold": 0.3, "keep_top_per_class": 1, "capacity_ratio": 1.0, "expose_decisions": True}


def _decisions(model: SegmentationModel) -> dict[str, torch.Tensor]:
    img = torch.randn(2, 3, *SEGVIT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = dict(zip(model.output_names(), model(img)))
    return {k: v for k, v in out.items() if k.startswith("decision_")}


def test_dtop_prune_heads_load_from_the_official_layout(tmp_path, monkeypatch):
    from staticprune.models.registry import MODELS
    from staticprune.pipeline import ModelConfig, build
    from staticprune.reference.dtop import reference_forward

    trained = _dtop_model(seed=0, options=DTOP_OPTIONS)
    _trained_heads(trained.method, seed=5)
    path = tmp_path / "dtop_iter_40000.pth"
    ckpt = _official_dtop_checkpoint(trained)
    assert {"auxiliary_head.1.decoder.layers.2.multihead_attn.k.weight", "decode_head.q.weight",
            "auxiliary_head.0.class_embed.bias", "decode_head.proj_norm.weight"} <= set(ckpt["state_dict"])
    assert not any(k.startswith("decode_head.input_proj_") for k in ckpt["state_dict"])
    torch.save(ckpt, path)

    # the CLI's path: the method is built first, the class count comes from the heads' queries (K = 3)
    monkeypatch.setitem(MODELS, "segvit-vit-t-atm", trained.spec)
    cfg = ModelConfig(model="segvit-vit-t-atm", size=SEGVIT_SIZE, classes=None, weights=str(path), method="dtop",
                      method_options=DTOP_OPTIONS)
    loaded = build(cfg)
    assert cfg.classes == K
    for k, v in trained.state_dict().items():
        if not k.startswith("decoder."):  # DToP does not use the SegViT decoder: it keeps its initialisation
            assert torch.equal(loaded.state_dict()[k], v), k

    random_heads = _dtop_model(seed=0, options=DTOP_OPTIONS)  # same backbone, heads from head_seed 0
    got, want, seeded = _decisions(loaded), _decisions(trained), _decisions(random_heads)
    exits = {k: int((v == 1).sum()) for k, v in got.items()}
    assert exits == {"decision_layer5": 0, "decision_layer7": 14}  # halting now follows the loaded heads
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert {k: int((v == 1).sum()) for k, v in seeded.items()} == {"decision_layer5": 0, "decision_layer7": 0}
    # the eager reference reads the same heads from the attached method
    img = torch.randn(2, 3, *SEGVIT_SIZE, generator=torch.Generator().manual_seed(0))
    ref = reference_forward(loaded, img, DTOP_OPTIONS)
    assert torch.equal(ref.decisions["layer7"].to(torch.int32), got["decision_layer7"])


def test_dtop_heads_from_a_native_state_dict_and_mismatched_exits():
    trained = _dtop_model(seed=0, options=DTOP_OPTIONS)
    _trained_heads(trained.method, seed=6)
    native = to_layout(trained, "native")
    assert "method.aux_heads.1.q.weight" in native and "method.final_head.class_embed.bias" in native
    dst = _dtop_model(seed=1, options=DTOP_OPTIONS)
    report = load_checkpoint(dst, native)
    assert not report.kept_init and report.loaded == len(native)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in native.items())

    one_exit = _dtop_model(seed=1, options={**DTOP_OPTIONS, "exit_layers": [7]})
    with pytest.raises(CheckpointError, match=r"unexpected \d+ keys \(method\.aux_heads\.1\..*the checkpoint has 2 "
                                              r"auxiliary prune head\(s\), the method 1 exit\(s\): .*exit_layers"):
        load_checkpoint(one_exit, _official_dtop_checkpoint(trained))
    plain = _narrow_segvit(SEGVIT_SIZE, seed=1)
    with pytest.raises(CheckpointError, match=r"holds DToP prune heads .* export it with --method dtop"):
        load_checkpoint(plain, _official_dtop_checkpoint(trained))
    report = load_checkpoint(plain, _official_dtop_checkpoint(trained), backbone_only=True)
    assert {"method.final_head.q.weight", "method.aux_heads.0.q.weight"} <= set(report.ignored)  # our names
    assert report.kept_init == [k for k in plain.state_dict() if k.startswith("decoder.")]


# ----------------------------------------------------------------------------------------------- DeiT, classes, CLI


def _deit_segmenter_checkpoint(path, size=(48, 48), decoder="mask") -> dict:
    """The official Segmenter zoo's DeiT variant at ViT-T width: encoder.dist_token, encoder.head_dist.*, a
    positional table with two prefix rows, n_cls; random weights."""
    src = build_model(f"segmenter-deit-t-{decoder}", size, num_classes=K, seed=4)
    ckpt = to_layout(src, "segmenter")
    model = ckpt["model"]
    assert model["encoder.dist_token"].shape == (1, 1, 192)
    assert model["encoder.pos_embed"].shape == (1, 2 + (size[0] // 16) * (size[1] // 16), 192)
    assert {"encoder.head_dist.weight", "encoder.head.weight"} <= set(model) and ckpt["n_cls"] == K
    torch.save(ckpt, path)
    return ckpt


def test_deit_distilled_checkpoint_resizes_both_prefix_rows(tmp_path):
    ckpt = _deit_segmenter_checkpoint(tmp_path / "deit.pth")
    dst = build_model("segmenter-deit-t-mask", (64, 80), num_classes=K, seed=1)
    report = load_checkpoint(dst, tmp_path / "deit.pth")
    assert report.pos_grid_from == (3, 3) and report.pos_grid_to == (4, 5)
    assert sorted(report.ignored) == ["encoder.head.bias", "encoder.head.weight", "encoder.head_dist.bias",
                                      "encoder.head_dist.weight"]
    pos = ckpt["model"]["encoder.pos_embed"]
    assert torch.equal(dst.backbone.pos_embed[:, :2], pos[:, :2])  # CLS and distillation rows kept apart
    assert torch.equal(dst.backbone.pos_embed, resize_pos_embed(pos, (3, 3), (4, 5), num_prefix=2))
    assert torch.equal(dst.backbone.dist_token, ckpt["model"]["encoder.dist_token"])
    vit = build_model("segmenter-vit-t-mask", (48, 48), num_classes=K, seed=1)
    with pytest.raises(CheckpointError, match="use --model segmenter-deit-t-mask$"):
        load_checkpoint(vit, ckpt)
    with pytest.raises(CheckpointError, match="missing 1 key \\(backbone.dist_token\\).*use --model segmenter-vit-t-mask"):
        load_checkpoint(build_model("segmenter-deit-t-mask", (48, 48), num_classes=K),
                        to_layout(build_model("segmenter-vit-t-mask", (48, 48), num_classes=K), "segmenter"))


def test_deit_distilled_export_verify_and_refusals(tmp_path, capsys):
    from staticprune.cli import main

    weights = tmp_path / "deit.pth"
    _deit_segmenter_checkpoint(weights, decoder="linear")  # trained at 48x48, exported at 32x48: resized
    base = ["--model", "segmenter-deit-t-linear", "--size", "32x48", "--weights", str(weights)]  # no --classes
    for method, opts in [("none", []), ("tome", ["--opt", "r=0,2,1", "--opt", "layers=1,2,3"]), ("g2tm", []),
                         ("lvtp", [])]:
        out = tmp_path / f"{method}.onnx"
        assert main(["export", *base, "--method", method, *opts, "-o", str(out)]) == 0, method
        meta = json.loads(next(p.value for p in onnx_load(out).metadata_props if p.key == "staticprune"))
        assert meta["classes"] == K and meta["mean"] == [0.485, 0.456, 0.406]
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "tome.onnx"), "--inputs", "1"]) == 0
    assert "PASS" in capsys.readouterr().out
    for method in ("algm", "cts", "dcts", "dtop", "step"):
        assert main(["export", *base, "--method", method, "-o", str(tmp_path / f"{method}.onnx")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"staticprune: error: method '{method}' cannot protect the two prefix tokens (CLS and "
                           "distillation token) of the DeiT-distilled 'segmenter-deit-t-linear'; use --method g2tm, "
                           "lvtp, tome or none, or a segmenter-vit-* model")
        assert not (tmp_path / f"{method}.onnx").exists()


def onnx_load(path):
    import onnx

    return onnx.load(str(path))


def test_cli_backbone_only_and_checkpoint_messages_in_cli_terms(tmp_path, capsys, sources):
    from staticprune.cli import main

    timm = tmp_path / "timm.pth"
    torch.save({k: v for k, v in to_layout(sources["segmenter-vit-t-mask"], "timm").items()
                if not k.startswith("decoder.")}, timm)
    base = ["export", "--model", "segmenter-vit-t-mask", "--size", "32x48", "--weights", str(timm)]
    assert main([*base, "--classes", "5", "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pass --backbone-only to load the backbone" in err and "backbone_only=True" not in err
    assert main([*base, "-o", str(tmp_path / "a.onnx")]) == 2
    assert "carries no decoder to read the class count from: pass --classes K" in capsys.readouterr().err
    assert main([*base, "--backbone-only", "-o", str(tmp_path / "a.onnx")]) == 2
    assert "give its class count with --classes K" in capsys.readouterr().err
    assert main([*base, "--backbone-only", "--classes", "5", "-o", str(tmp_path / "b.onnx")]) == 0
    meta = json.loads(next(p.value for p in onnx_load(tmp_path / "b.onnx").metadata_props if p.key == "staticprune"))
    assert meta["backbone_only"] is True and meta["classes"] == 5 and meta["weights"] == str(timm.resolve())
    seg = tmp_path / "seg.pth"
    torch.save(to_layout(sources["segmenter-vit-t-mask"], "segmenter"), seg)
    assert main(["export", "--model", "segmenter-vit-t-mask", "--size", "32x48", "--weights", str(seg),
                 "--classes", "7", "-o", str(tmp_path / "c.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("the checkpoint is for 3 classes: pass --classes 3 (or leave --classes out to read it from "
                        "the checkpoint), or --backbone-only to keep only the backbone")
    assert "num_classes" not in err
