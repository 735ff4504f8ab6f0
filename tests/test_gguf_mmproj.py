"""`l4q export gguf --mmproj`: the vision tower and projector as llama.cpp's mmproj file, against
llama.cpp's own converter and against transformers through llama.cpp's mtmd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import llama_cpp_reference
from mtmd import image_embeddings
from test_gguf_export import L4Q_ONLY_KEYS, read_gguf

from cli.main import main
from llama4_quant import sources, walk
from llama4_quant.errors import UsageError
from llama4_quant.formats.gguf_mmproj import MmprojTarget
from llama4_quant.model import open_model


def converter_names(tensors: dict) -> dict:
    """The converter's tensors under l4q's names: its `attn_post_norm` is the pre-FFN norm that
    clip.cpp reads as `ln2` (see gguf_mmproj's docstring)."""
    return {name.replace(".attn_post_norm.", ".ln2."): t for name, t in tensors.items()}


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_mmproj_matches_llama_cpp_converter(model, qtype, tmp_path):
    src = sources.resolve(model)
    theirs = llama_cpp_reference().convert(src.path, tmp_path / "theirs.gguf", qtype.lower(), mmproj=True)
    opened = open_model(src)
    target = MmprojTarget(opened, tmp_path / "ours.gguf", qtype)
    walk.run(opened, [target], False)
    their_kv, their_t = read_gguf(theirs)
    our_kv, our_t = read_gguf(target.out)
    assert our_kv["general.architecture"] == "clip" and our_kv["clip.projector_type"] == "llama4"
    assert set(our_kv) - set(their_kv) == L4Q_ONLY_KEYS
    for key, value in their_kv.items():
        assert our_kv[key] == value, key
    their_t = converter_names(their_t)
    assert set(our_t) == set(their_t)
    for name, t in their_t.items():
        assert our_t[name] == t, name  # type, shape and bytes
    assert any(".ln2." in name for name in our_t) and not any("attn_post_norm" in name for name in our_t)


def sample_image(size: int) -> np.ndarray:
    """A deterministic RGB test image: colour gradients with noise."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), (x + y) * 255 // (2 * size - 2)], -1)
    noise = np.random.default_rng(0).integers(-20, 21, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def transformers_embeddings(model_dir, image: np.ndarray) -> np.ndarray:
    """Llama 4's vision tower + projector in transformers, float32, for one image of exactly the
    tower's image size (one tile, which Llama 4's processor neither resizes nor pairs with a
    thumbnail), normalised by the processor's mean and std."""
    from transformers import Llama4ForConditionalGeneration

    from llama4_quant.formats.gguf_mmproj import processor_config
    from llama4_quant.text import quiet_transformers

    with quiet_transformers():
        model = Llama4ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    processor = processor_config(model_dir)
    mean, std = (torch.tensor(processor[k]).reshape(3, 1, 1) for k in ("image_mean", "image_std"))
    pixels = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    with torch.no_grad():
        features = model.vision_model(pixels).last_hidden_state
        return model.multi_modal_projector(features.reshape(-1, features.shape[-1])).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def row_major(mtmd_tokens: np.ndarray) -> np.ndarray:
    """mtmd's Llama 4 pixel shuffle leaves the merged tokens column by column (it skips
    transformers' last transpose): the same tokens in transformers' row-major order."""
    side = int(round(len(mtmd_tokens) ** 0.5))
    return mtmd_tokens.reshape(side, side, -1).transpose(1, 0, 2).reshape(side * side, -1)


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_mtmd_image_embeddings_agree_with_transformers(model, tmp_path):
    """llama.cpp's mtmd loads l4q's mmproj beside l4q's text GGUF, and the image embeddings it
    computes agree with transformers' per token; llama.cpp's converter's own mmproj does not."""
    src = sources.resolve(model)
    text, vision = tmp_path / "text.gguf", tmp_path / "mmproj.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", model, "--type", "Q8_0", "--out", str(text), "--mmproj",
                                       "--mmproj-out", str(vision), "--quiet"])
    assert result.exit_code == 0, result.output
    size = open_model(src).config["vision_config"]["image_size"]
    image = sample_image(size)
    reference = transformers_embeddings(src.path, image)

    ours = row_major(image_embeddings(text, vision, image))
    assert ours.shape == reference.shape
    assert cosines(ours, reference).min() >= 0.999, cosines(ours, reference)

    theirs = llama_cpp_reference().convert(src.path, tmp_path / "theirs.gguf", "f16", mmproj=True)
    converted = row_major(image_embeddings(text, theirs, image))
    print(f"{model}: cosine per token, l4q {cosines(ours, reference)}, converter {cosines(converted, reference)}")
    assert cosines(converted, reference).min() < 0.99  # why l4q names the pre-FFN norm ln2


def test_mmproj_types_and_model_without_vision(small_model, tmp_path):
    with pytest.raises(UsageError, match="no vision tower"):
        MmprojTarget(open_model(sources.resolve(str(small_model))), tmp_path / "m.gguf", "F16").check()
    with pytest.raises(UsageError, match="unknown mmproj type"):
        MmprojTarget(open_model(sources.resolve("tiny")), tmp_path / "m.gguf", "Q4_K_M")
    result = CliRunner().invoke(main, ["export", "gguf", "tiny", "--mmproj-out", str(tmp_path / "m.gguf"), "--quiet"])
    assert result.exit_code != 0 and "--mmproj-out applies with --mmproj" in result.output


def test_quantize_writes_the_same_mmproj_beside_its_other_targets(tmp_path):
    alone, beside = tmp_path / "alone", tmp_path / "beside"
    for out, targets in ((alone, []), (beside, ["--to", "int4", "--gguf", "Q8_0"])):
        result = CliRunner().invoke(main, ["quantize", "--model", "tiny", *targets, "--mmproj", "--mmproj-type", "Q8_0",
                                           "--out-dir", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in beside.iterdir()) == ["mmproj-tiny-Q8_0.gguf", "tiny-Q8_0.gguf", "tiny-int4"]
    assert (alone / "mmproj-tiny-Q8_0.gguf").read_bytes() == (beside / "mmproj-tiny-Q8_0.gguf").read_bytes()
