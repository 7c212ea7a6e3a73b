"""The shared SigLIP vision tower against transformers' SiglipVisionModel: loaded from a
safetensors file of its weights through Fovea's loader, outputs equal within 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig as HFSiglipVisionConfig
from transformers import SiglipVisionModel

from fovea.worker.loader import WeightLoadError, load_weights
from fovea.worker.models.vision.siglip import SiglipVisionConfig, SiglipVisionTower

HF_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)


@pytest.fixture(scope="module")
def reference() -> SiglipVisionModel:
    torch.manual_seed(0)
    model = SiglipVisionModel(HFSiglipVisionConfig(**HF_CONFIG)).eval()
    with torch.no_grad():  # random norms and biases too, so a skipped one shows
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def checkpoint(reference: SiglipVisionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's weights as a checkpoint, less the pooling head (not ours)."""
    out = tmp_path_factory.mktemp("siglip")
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(out / "model.safetensors"))
    return out


def _tower(checkpoint: Path, num_layers: int | None = None, **kw: bool) -> SiglipVisionTower:
    cfg = SiglipVisionConfig.from_hf(HF_CONFIG)
    tower = SiglipVisionTower(cfg, num_layers=num_layers, **kw).eval()
    load_weights(tower, str(checkpoint))
    return tower


def test_config_from_hf_defaults_and_fields(reference: SiglipVisionModel) -> None:
    cfg = SiglipVisionConfig.from_hf(reference.config.to_dict())
    assert cfg == SiglipVisionConfig(64, 96, 3, 4, 32, 8, 3, 1e-6, "gelu_pytorch_tanh")
    assert cfg.num_patches == 16 and cfg.head_dim == 16
    # An older hub config that saved only what differs from the defaults.
    assert SiglipVisionConfig.from_hf({"image_size": 384, "patch_size": 14}) == (
        SiglipVisionConfig(768, 3072, 12, 12, 384, 14)
    )
    with pytest.raises(ValueError, match="hidden_act"):
        SiglipVisionConfig.from_hf({"hidden_act": "relu6"})


def test_parameter_names_equal_transformers_but_fused_qkv(
    reference: SiglipVisionModel, checkpoint: Path
) -> None:
    tower = _tower(checkpoint)
    ref_names = {k for k in reference.state_dict() if not k.startswith("head.")}
    fused = {
        k.replace(f".{p}_proj.", ".qkv_proj.") for k in ref_names for p in "qkv" if f".{p}_" in k
    }
    plain = {k for k in ref_names if not any(f".{p}_proj." in k for p in "qkv")}
    assert set(tower.state_dict()) == plain | fused
    assert len(fused) == 3 * 2  # 3 layers, weight and bias


def test_all_layers_with_post_layernorm(reference: SiglipVisionModel, checkpoint: Path) -> None:
    tower = _tower(checkpoint)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(pixel_values=pixels).last_hidden_state
        got = tower(pixels)
    assert got.shape == (3, 16, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_truncated_tower_without_post_layernorm(
    reference: SiglipVisionModel, checkpoint: Path, num_layers: int, tmp_path: Path
) -> None:
    # The checkpoint's weights of layers not built must be dropped by the owner.
    skip = [f"encoder.layers.{i}." for i in range(num_layers, 3)] + ["post_layernorm."]
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(("head.", *skip))}
    save_file(state, str(tmp_path / "model.safetensors"))
    tower = _tower(tmp_path, num_layers=num_layers, post_layernorm=False)
    assert len(tower.encoder.layers) == num_layers and tower.post_layernorm is None
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # hidden_states[0] is the embeddings, [i] the output of layer i - 1.
        want = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[num_layers]
        got = tower(pixels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_wrong_image_size_and_extra_weights_are_errors(checkpoint: Path) -> None:
    tower = _tower(checkpoint)
    with pytest.raises(ValueError, match="positions"):
        tower(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="num_layers"):
        SiglipVisionTower(tower.cfg, num_layers=4)
    with pytest.raises(WeightLoadError, match=r"encoder\.layers\.2\.mlp\.fc1\.weight"):
        _tower(checkpoint, num_layers=2)
