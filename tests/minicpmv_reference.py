"""The reference for MiniCPM-V 2.6, whose hub code is remote code that cannot be fetched here:
transformers' SiglipVisionModel and Qwen2ForCausalLM, plus what the remote code adds, written
plainly from its published format (openbmb/MiniCPM-V-2_6: image_processing_minicpmv.py,
processing_minicpmv.py, modeling_navit_siglip.py, resampler.py, modeling_minicpmv.py):
PIL-based slicing, the navit position ids, the padded-batch tower with its attention mask,
the resampler on nn.MultiheadAttention, and chat()'s message rendering. Nothing here comes
from Fovea."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

N_NEW = 32


# ---------------------------------------------------------------- resampler.py


def get_2d_sincos_pos_embed(embed_dim: int, image_size: tuple[int, int]) -> np.ndarray:
    grid_h = np.arange(image_size[0], dtype=np.float32)
    grid_w = np.arange(image_size[1], dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=-1)  # [H, W, D]


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("hw,d->hwd", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = (
            nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        )
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        pos = torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, (70, 70))).float()
        self.register_buffer("pos_embed", pos, persistent=False)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        bs = x.shape[0]
        patch_len = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        key_padding_mask = torch.zeros((bs, int(patch_len.max())), dtype=torch.bool)
        pos_embed = []
        for i in range(bs):
            tgt_h, tgt_w = (int(t) for t in tgt_sizes[i])
            pos_embed.append(self.pos_embed[:tgt_h, :tgt_w, :].reshape(tgt_h * tgt_w, -1))
            key_padding_mask[i, patch_len[i] :] = True
        pos = nn.utils.rnn.pad_sequence(pos_embed, batch_first=True).permute(1, 0, 2)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # L * B * D
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, bs, 1)
        out = self.attn(q, x + pos, x, key_padding_mask=key_padding_mask)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj  # type: ignore[no-any-return]


# ---------------------------------------------------------------- image_processing_minicpmv.py


class ImageProcessor26:
    def __init__(self, pp: dict[str, Any]) -> None:
        self.max_slice_nums = pp["max_slice_nums"]
        self.scale_resolution = pp["scale_resolution"]
        self.patch_size = pp["patch_size"]
        self.image_feature_size = pp["image_feature_size"]
        self.use_image_id = pp["use_image_id"]
        self.mean = np.array(pp["norm_mean"])
        self.std = np.array(pp["norm_std"])

    @staticmethod
    def ensure_divide(length: float, patch_size: int) -> int:
        return max(round(length / patch_size) * patch_size, patch_size)

    def find_best_resize(
        self, original_size: tuple[float, float], allow_upscale: bool = False
    ) -> tuple[int, int]:
        width, height = original_size
        s = self.scale_resolution
        if (width * height > s * s) or allow_upscale:
            r = width / height
            height = int(s / math.sqrt(r))
            width = int(height * r)
        return (
            self.ensure_divide(width, self.patch_size),
            self.ensure_divide(height, self.patch_size),
        )

    def get_refine_size(self, original_size: tuple[int, int], grid: list[int]) -> tuple[int, int]:
        width, height = original_size
        grid_x, grid_y = grid
        refine_width = self.ensure_divide(width, grid_x)
        refine_height = self.ensure_divide(height, grid_y)
        best = self.find_best_resize((refine_width / grid_x, refine_height / grid_y), True)
        return (best[0] * grid_x, best[1] * grid_y)

    def get_sliced_grid(self, image_size: tuple[int, int]) -> list[int] | None:
        original_width, original_height = image_size
        log_ratio = math.log(original_width / original_height)
        ratio = original_width * original_height / (self.scale_resolution**2)
        multiple = min(math.ceil(ratio), self.max_slice_nums)
        if multiple <= 1:
            return None
        candidates = [i for i in (multiple - 1, multiple, multiple + 1)
                      if i != 1 and i <= self.max_slice_nums]  # fmt: skip
        grids = [[m, n // m] for n in candidates for m in range(1, n + 1) if n % m == 0]
        best_grid, min_error = [1, 1], float("inf")
        for grid in grids:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < min_error:
                best_grid, min_error = grid, error
        return best_grid

    def slice_image(self, image: Image.Image) -> tuple[Image.Image, list[list[Image.Image]]]:
        best_grid = self.get_sliced_grid(image.size)
        if best_grid is None:
            size = self.find_best_resize(image.size, allow_upscale=True)
            return image.resize(size, resample=Image.Resampling.BICUBIC), []
        source = image.copy().resize(self.find_best_resize(image.size), Image.Resampling.BICUBIC)
        refine = image.resize(self.get_refine_size(image.size, best_grid), Image.Resampling.BICUBIC)
        width, height = refine.size
        grid_x, grid_y = int(width / best_grid[0]), int(height / best_grid[1])
        patches = [
            [refine.crop((j, i, j + grid_x, i + grid_y)) for j in range(0, width, grid_x)]
            for i in range(0, height, grid_y)
        ]
        return source, patches

    def get_slice_image_placeholder(self, image_size: tuple[int, int], image_idx: int) -> str:
        q = self.image_feature_size
        placeholder = "<image>" + "<unk>" * q + "</image>"
        if self.use_image_id:
            placeholder = f"<image_id>{image_idx}</image_id>" + placeholder
        grid = self.get_sliced_grid(image_size)
        if grid is not None:
            one = "<slice>" + "<unk>" * q + "</slice>"
            placeholder += "\n".join(one * grid[0] for _ in range(grid[1]))
        return placeholder

    def reshape_by_patch(self, image: np.ndarray) -> np.ndarray:
        patches = torch.nn.functional.unfold(
            torch.from_numpy(image), (self.patch_size, self.patch_size), stride=self.patch_size
        )
        p = self.patch_size
        patches = patches.reshape(image.shape[0], p, p, -1).permute(0, 1, 3, 2)
        return patches.reshape(image.shape[0], p, -1).numpy()  # type: ignore[no-any-return]

    def preprocess(self, image: Image.Image) -> tuple[list[np.ndarray], list[list[int]]]:
        """pixel_values of every view and their tgt_sizes [h, w]."""
        from transformers.image_transforms import normalize

        source, patches = self.slice_image(image.convert("RGB"))
        views = [source] + [p for row in patches for p in row]
        out, sizes = [], []
        for view in views:
            arr = np.array(view).astype(np.float32) / 255
            arr = normalize(arr, self.mean, self.std, input_data_format="channels_last")
            arr = arr.transpose(2, 0, 1)  # channels first
            out.append(self.reshape_by_patch(arr))
            sizes.append([arr.shape[1] // self.patch_size, arr.shape[2] // self.patch_size])
        return out, sizes


# ---------------------------------------------------------------- processing + chat()


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as chat() passes them to the tokenizer's template: each message's
    parts joined by "\\n", an image as (<image>./</image>) (callers put images first)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = ["(<image>./</image>)" if p["type"] == "image_url" else p["text"]
                     for p in content]  # fmt: skip
            content = "\n".join(parts)
        out.append({"role": m["role"], "content": content})
    return out


class MiniCPMV26Reference:
    """The 2.6 model on a tiny checkpoint: prompt ids as processing_minicpmv.py builds them,
    embeddings as modeling_minicpmv.py's get_vllm_embedding, greedy generate."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors.torch import load_file
        from transformers import (
            AutoTokenizer,
            Qwen2Config,
            Qwen2ForCausalLM,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

        cfg = json.loads((model_dir / "config.json").read_text())
        pp = json.loads((model_dir / "preprocessor_config.json").read_text())
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.proc = ImageProcessor26(pp)
        weights = load_file(str(model_dir / "model.safetensors"))

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

        text = {
            k: v
            for k, v in cfg.items()
            if k not in ("vision_config", "architectures", "model_type")
        }
        self.llm = Qwen2ForCausalLM(Qwen2Config(**text)).eval()
        self.llm.load_state_dict(part("llm."))
        self.vpm = SiglipVisionModel(SiglipVisionConfig(**cfg["vision_config"])).eval()
        self.vpm.load_state_dict(part("vpm."))
        hidden = cfg["hidden_size"]
        kv_dim = cfg["vision_config"]["hidden_size"]
        self.resampler = Resampler(cfg["query_num"], hidden, hidden // 128, kv_dim).eval()
        self.resampler.load_state_dict(part("resampler."))
        self.im_start, self.im_end, self.slice_start, self.slice_end = (
            self.tok.convert_tokens_to_ids(t)
            for t in ("<image>", "</image>", "<slice>", "</slice>")
        )

    def prompt(
        self, messages: list[dict[str, Any]], images: list[Image.Image]
    ) -> tuple[list[int], list[np.ndarray], list[list[int]]]:
        """(input ids, every view's pixel_values, tgt_sizes), as _convert_images_texts_to_inputs."""
        text = self.tok.apply_chat_template(
            chat_messages(messages), tokenize=False, add_generation_prompt=True
        )
        pattern = "(<image>./</image>)"
        assert len(re.findall(pattern, text)) == len(images)
        chunks = text.split(pattern)
        final = ""
        pixels: list[np.ndarray] = []
        sizes: list[list[int]] = []
        for i, image in enumerate(images):
            final += chunks[i] + self.proc.get_slice_image_placeholder(image.size, i)
            views, tgt = self.proc.preprocess(image)
            pixels += views
            sizes += tgt
        final += chunks[-1]
        return self.tok.encode(final), pixels, sizes

    def image_bound(self, ids: list[int]) -> list[tuple[int, int]]:
        t = torch.tensor(ids)
        starts = torch.where((t == self.im_start) | (t == self.slice_start))[0] + 1
        ends = torch.where((t == self.im_end) | (t == self.slice_end))[0]
        return list(zip(starts.tolist(), ends.tolist(), strict=True))

    def vision(self, pixels: list[np.ndarray], sizes: list[list[int]]) -> torch.Tensor:
        """[views, query_num, hidden]: the navit tower on the padded batch, then the resampler."""
        tgt = torch.tensor(sizes, dtype=torch.int32)
        flat = [torch.from_numpy(p).flatten(end_dim=1).permute(1, 0) for p in pixels]
        batch = nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=0.0)
        b, length, _ = batch.shape
        batch = batch.permute(0, 2, 1).reshape(b, 3, -1, length)
        max_patches = int((tgt[:, 0] * tgt[:, 1]).max())
        mask = torch.zeros((b, max_patches), dtype=torch.bool)
        for i in range(b):
            mask[i, : tgt[i][0] * tgt[i][1]] = True
        vm = self.vpm
        emb = vm.embeddings.patch_embedding(batch).flatten(2).transpose(1, 2)
        per_side = vm.embeddings.config.image_size // vm.embeddings.config.patch_size
        boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
        position_ids = torch.zeros((b, max_patches), dtype=torch.int64)
        for i in range(b):  # modeling_navit_siglip.SiglipVisionEmbeddings.forward
            nb_h, nb_w = tgt[i][0], tgt[i][1]
            frac_h = torch.arange(0, 1 - 1e-6, 1 / nb_h)
            frac_w = torch.arange(0, 1 - 1e-6, 1 / nb_w)
            bh = torch.bucketize(frac_h, boundaries, right=True)
            bw = torch.bucketize(frac_w, boundaries, right=True)
            position_ids[i][mask[i]] = (bh[:, None] * per_side + bw).flatten()
        hidden = emb + vm.embeddings.position_embedding(position_ids)
        attn = torch.zeros((b, 1, max_patches, max_patches))
        attn.masked_fill_(~mask[:, None, None, :], torch.finfo(torch.float32).min)
        for layer in vm.encoder.layers:
            out = layer(hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = vm.post_layernorm(hidden)
        return self.resampler(hidden, tgt)

    def embeds(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> torch.Tensor:
        """[1, L, hidden] input embeddings, image features scattered on their bounds."""
        ids, pixels, sizes = self.prompt(messages, images)
        emb = self.llm.model.embed_tokens(torch.tensor([ids]))
        if images:
            feats = self.vision(pixels, sizes)
            bounds = self.image_bound(ids)
            index = torch.cat([torch.arange(s, e) for s, e in bounds])
            emb[0, index] = feats.reshape(-1, feats.shape[-1])
        return emb

    @torch.no_grad()
    def logits(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> torch.Tensor:
        return self.llm(inputs_embeds=self.embeds(messages, images)).logits[0]  # type: ignore[no-any-return]

    @torch.no_grad()
    def greedy(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> list[int]:
        emb = self.embeds(messages, images)
        out = self.llm.generate(
            inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.int64),
            do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        return [int(t) for t in out[0, -N_NEW:]]


# ---------------------------------------------------------------- 4.6: transformers' classes


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI image_url parts as transformers' {"type": "image"}."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({**m, "content": content})
    return out


class MiniCPMV46Reference:
    """transformers' MiniCPMV4_6ForConditionalGeneration with its processor (PIL image
    processor) and the checkpoint's own chat template."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer, MiniCPMV4_6ForConditionalGeneration
        from transformers.models.minicpmv4_6 import MiniCPMV4_6Processor
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (
            MiniCPMV4_6ImageProcessorPil,
        )
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import (
            MiniCPMV4_6VideoProcessor,
        )

        class Processor(MiniCPMV4_6Processor):  # type: ignore[misc]
            # Construction checks sub-processor classes against transformers' top-level
            # BaseVideoProcessor, which is absent without torchvision; processing is untouched.
            def check_argument_for_proper_class(self, name: str, arg: Any) -> type:
                return type(arg)

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.proc = Processor(
            image_processor=MiniCPMV4_6ImageProcessorPil.from_pretrained(model_dir),
            video_processor=MiniCPMV4_6VideoProcessor(),
            tokenizer=self.tok,
            chat_template=self.tok.chat_template,
        )
        self.model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()

    def prompt(
        self, messages: list[dict[str, Any]], images: list[Image.Image]
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        text = self.proc.apply_chat_template(
            hf_messages(messages), tokenize=False, add_generation_prompt=True
        )
        out = self.proc(text=text, images=images or None, return_tensors="pt")
        kw = {k: out[k] for k in ("pixel_values", "target_sizes")} if images else {}
        return out["input_ids"][0].tolist(), kw

    @torch.no_grad()
    def logits(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> torch.Tensor:
        ids, kw = self.prompt(messages, images)
        return self.model(input_ids=torch.tensor([ids]), **kw).logits[0]  # type: ignore[no-any-return]

    @torch.no_grad()
    def greedy(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> list[int]:
        ids, kw = self.prompt(messages, images)
        out = self.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None,
            pad_token_id=0, **kw,
        )  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]
