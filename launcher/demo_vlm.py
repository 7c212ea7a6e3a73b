"""The built-in demo VLM `fovea-demo-vlm`: SmolLM2-135M-Instruct that sees simple pictures.

A `LlavaForConditionalGeneration` (transformers' LLaVA-1.5 format, so Fovea's llava family serves
it and transformers loads it): a small CLIP vision tower (64 px, 16 px patches, 4 layers of
width 192: 16 image tokens), a 2-layer GELU projector, and the real SmolLM2-135M-Instruct,
frozen. Only the tower and projector were trained (bench/demo_vlm_train.py, on the generated
pictures of bench/demo_vlm_data.py); their weights ship in `launcher/data/` (bf16, ~4 MB). On
first use they are assembled with the SmolLM2 alias's converted weights into an ordinary
Hugging Face directory, as builtin_models.py converts the GGUF:

- config.json: LLaVA with the CLIP config below; the text vocabulary grows by one row for the
  added `<image>` token (id 49152, a zero row: its features replace it before the decoder);
- tokenizer: SmolLM2's plus `<image>`, with no BOS token (SmolLM2 adds none; the chatml-llava
  template would otherwise render `<|im_start|>` twice);
- chat_template.jinja: the built-in `chatml-llava` template (tokenizer_service/builtin_templates);
- preprocessor_config.json / processor_config.json: transformers' CLIP-style LLaVA processing
  (shortest edge 64, centre crop 64, OpenAI CLIP mean and std, bicubic).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEMO_VLM = "fovea-demo-vlm"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 64
PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # per image: patches, CLS dropped
VISION_WEIGHTS = Path(__file__).parent / "data" / "demo_vlm_vision.safetensors"

VISION_CONFIG: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 192,
}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_convert_rgb": True,
}

# transformers' LlavaProcessor: the CLS token is counted, then dropped ("default").
PROCESSOR_CONFIG: dict[str, Any] = {
    "processor_class": "LlavaProcessor",
    "patch_size": PATCH_SIZE,
    "vision_feature_select_strategy": "default",
    "num_additional_image_tokens": 1,
    "image_token": IMAGE_TOKEN,
}


def llava_config(text_config: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """config.json of the assembled model around SmolLM2's `text_config`."""
    text = dict(text_config) | {"vocab_size": image_token_id + 1}
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token_id,
        "image_seq_length": IMAGE_TOKENS,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": bool(text_config.get("tie_word_embeddings", True)),
        "text_config": text,
        "vision_config": VISION_CONFIG,
        "dtype": "bfloat16",
    }


def demo_tokenizer(smollm2_dir: Path) -> Any:
    """SmolLM2's tokenizer with `<image>` added (id 49152) and no BOS token, as assembled."""
    from transformers import AutoTokenizer

    from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.bos_token = None
    tok.chat_template = BUILTIN_TEMPLATES["chatml-llava"].source
    return tok


def assemble_demo_vlm(smollm2_dir: Path, out: Path) -> None:
    """Write the demo VLM's Hugging Face directory at `out` from the converted SmolLM2 at
    `smollm2_dir` and the shipped vision weights."""
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from fovea.launcher.model_source import ModelPathError

    if not VISION_WEIGHTS.is_file():
        raise ModelPathError(f"{VISION_WEIGHTS} is missing: reinstall fovea")
    stages = ["tokenizer", "weights", "save"]
    with tqdm(total=len(stages), desc=f"assembling {DEMO_VLM}", file=sys.stderr) as bar:
        bar.set_postfix_str(stages[0])
        tok = demo_tokenizer(smollm2_dir)
        image_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
        text_config = json.loads((smollm2_dir / "config.json").read_text())
        bar.update(1)
        bar.set_postfix_str(stages[1])
        lm = load_file(smollm2_dir / "model.safetensors")
        embed = lm.pop("model.embed_tokens.weight")  # [vocab, hidden]
        if embed.shape[0] != image_id:
            raise ValueError(f"SmolLM2's vocabulary has {embed.shape[0]} rows, not {image_id}")
        # The <image> row is never read (its features replace it) nor, being zero, likely.
        lm["model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
        state = {k.replace("model.", "model.language_model.", 1): v for k, v in lm.items()}
        state |= load_file(VISION_WEIGHTS)
        bar.update(1)
        bar.set_postfix_str(stages[2])
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_json(out / "config.json", llava_config(text_config, image_id))
        generation = json.loads((smollm2_dir / "generation_config.json").read_text())
        _write_json(out / "generation_config.json", generation)
        tok.save_pretrained(out)
        (out / "chat_template.jinja").write_text(str(tok.chat_template))
        _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
        _write_json(out / "processor_config.json", PROCESSOR_CONFIG)
        bar.update(1)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
