"""READ, "Reasoning to Attend: Try to Understand How <SEG> Token Works" (Qian et al., CVPR 2025, arXiv 2412.17741),
built from transformers' `LlavaForConditionalGeneration` and `SamModel`.

A LLaVA LM answers with a `[SEG]` token. Its last-layer state (the one whose next-token prediction is `[SEG]`) is
projected into a SAM prompt token, as in LISA; READ adds Similarity-as-Points (SasP): the dot products of that state
with the image-token states form a similarity map, whose most and least similar cells become positive and negative
point prompts, moved to continuous, differentiable coordinates (Discrete-to-Continuous). SAM's mask decoder then reads
the points and the `[SEG]` token together. Procedure and constants follow the official `model/READ.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel, SamModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_read import READConfig

SEG_TOKEN = "[SEG]"


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0,
              eps: float = 1e-6) -> torch.Tensor:
    """Per-mask DICE loss on sigmoid outputs, (masks, H, W) -> (masks,); the official scale 1000 and eps 1e-6."""
    inputs, targets = mask_logits.sigmoid().flatten(1) / scale, targets.flatten(1)
    return 1 - (2 * (inputs * targets).sum(-1) + eps) / (inputs.sum(-1) + targets.sum(-1) / scale + eps)


def sigmoid_ce_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask mean pixel BCE, (masks, H, W) -> (masks,)."""
    return F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none").flatten(1).mean(-1)


def resize_longest_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """SAM's resized input size: the longer side becomes `long_side` (official `get_preprocess_shape`)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def postprocess_masks(low_res: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """SAM's `postprocess_masks`: low-res logits (n, masks, h, w) to the padded input size, the padding cropped,
    then to the original (height, width)."""
    new_h, new_w = resize_longest_side(height, width, size)
    masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    return F.interpolate(masks[..., :new_h, :new_w], (height, width), mode="bilinear", align_corners=False)


class SimilarityAsPoints(nn.Module):
    """Similarity map -> SAM point prompts (official `similarity_map_to_points`).

    The image tokens of LLaVA-1.5 cover CLIP's centre crop of the image (shorter side resized to `clip_size`), so
    maps are padded back to the image's aspect ratio before they are read in image coordinates.
    """

    def __init__(self, grid: int, clip_size: int, t_pos: float, t_neg: float, num_points: int, down_sample: int):
        super().__init__()
        self.grid, self.clip_size = grid, clip_size
        self.t_pos, self.t_neg, self.num_points, self.down_sample = t_pos, t_neg, num_points, down_sample

    @staticmethod
    def _min_max(values: torch.Tensor) -> torch.Tensor:
        low, high = values.min(), values.max()
        if high == low:  # a flat map says nothing: every cell neutral (the official code divides by zero)
            return torch.full_like(values, 0.5)
        return (values - low) / (high - low)

    @staticmethod
    def _crop_padding(size: int, height: int, width: int) -> tuple[int, int]:
        """(pad_h, pad_w) on each side that turn a `size`-square centre crop back into the image's aspect ratio."""
        scale = size / min(height, width)
        return (int(height * scale) - size) // 2, (int(width * scale) - size) // 2

    def similarity_map(self, similarity: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The min-max normalised map over the whole image, (grid*grid,) -> (height, width); zero outside the crop
        (official `get_similarity_map`). Differentiable: it weighs the Discrete-to-Continuous step."""
        sm = self._min_max(similarity).float().reshape(1, 1, self.grid, self.grid)  # normalised in the input dtype
        sm = F.interpolate(sm, (self.clip_size, self.clip_size), mode="bilinear")
        pad_h, pad_w = self._crop_padding(self.clip_size, height, width)
        sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h))
        return F.interpolate(sm, (height, width), mode="bilinear")[0, 0]

    def select_points(self, similarity: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid-cell centres in image pixels (num, 2) as integer (x, y), and labels (num,): 1 positive, 0 negative,
        -1 neutral. Cells are [positives by descending, negatives by ascending similarity, neutrals in raster
        order], cut to `num_points`; padding cells (outside the crop) are never picked."""
        side = self.grid // self.down_sample
        sm = F.interpolate(similarity.detach().float().reshape(1, 1, self.grid, self.grid), (side, side),
                           mode="bilinear")[0, 0]
        sm = self._min_max(sm)
        pad_h, pad_w = self._crop_padding(side, height, width)
        sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h), value=-1.0)
        rows, cols = sm.shape
        sm = sm.reshape(-1)
        positive = (sm >= self.t_pos).nonzero().flatten()
        negative = ((sm >= 0) & (sm <= self.t_neg)).nonzero().flatten()
        neutral = ((sm > self.t_neg) & (sm < self.t_pos)).nonzero().flatten()
        # torch.argsort's default order, as the official code: ties then order as they do there on the same device
        positive = positive[torch.argsort(sm[positive], descending=True)]
        negative = negative[torch.argsort(sm[negative])]
        cells = torch.cat([positive, negative, neutral])[: self.num_points]
        labels = torch.cat([torch.ones_like(positive), torch.zeros_like(negative), -torch.ones_like(neutral)])
        labels = labels[: self.num_points]
        # Centres scaled to the image, clamped inside it, truncated to whole pixels as the official `int(x)`; in
        # float32 as there (in float64 a centre can land one pixel off when the product is a whole number).
        x = ((cells % cols).float() + 0.5) * (width / cols)
        y = (torch.div(cells, cols, rounding_mode="floor").float() + 0.5) * (height / rows)
        points = torch.stack([x.clamp(max=float(width - 1)), y.clamp(max=float(height - 1))], dim=-1).trunc()
        return points.to(similarity.device, torch.float32), labels

    @staticmethod
    def discrete_to_continuous(sm: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Each point moves to the mean pixel position weighted by exp(-squared pixel distance) x softmax of the
        similarity map over all pixels: (height, width), (num, 2) -> (num, 2), differentiable in `sm`.

        The Gaussian factorises, exp(-dx^2 - dy^2) = exp(-dx^2) exp(-dy^2), so the weighted sums are contracted one
        axis at a time: (num, width) and (num, height) kernels instead of a (num, height x width) weight matrix."""
        height, width = sm.shape
        probs = F.softmax(sm.reshape(-1), dim=0).reshape(height, width)
        xs = torch.arange(width, device=sm.device, dtype=sm.dtype)
        ys = torch.arange(height, device=sm.device, dtype=sm.dtype)
        points = points.to(sm.dtype)
        kernel_x = torch.exp(-(points[:, :1] - xs).square())  # (num, width)
        kernel_y = torch.exp(-(points[:, 1:] - ys).square())  # (num, height)
        along_x = probs @ kernel_x.T  # (height, num): sum over x of p(y, x) exp(-dx^2)
        along_x_times_x = probs @ (kernel_x * xs).T  # the same, each term times x
        total = (kernel_y.T * along_x).sum(0)
        mean_x = (kernel_y.T * along_x_times_x).sum(0) / total
        mean_y = (kernel_y.T * ys[:, None] * along_x).sum(0) / total
        return torch.stack([mean_x, mean_y], dim=-1)

    def forward(self, similarity: torch.Tensor, height: int, width: int):
        """(grid*grid,) similarities of one image -> points (num, 2) as (x, y) pixels, labels (num,), and the
        normalised similarity map (height, width)."""
        if similarity.numel() != self.grid * self.grid:
            raise ValueError(f"expected {self.grid * self.grid} image-token similarities ({self.grid}x{self.grid} "
                             f"grid), got {similarity.numel()}")
        sm = self.similarity_map(similarity, height, width)
        points, labels = self.select_points(similarity, height, width)
        return self.discrete_to_continuous(sm, points), labels, sm


class SegProjection(nn.Sequential):
    """The official `text_hidden_fcs`: LM hidden size -> SAM prompt size."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim),
                         nn.Dropout(0.0))


@dataclass
class READOutput(ModelOutput):
    """Per-example lists hold None where an example has no `[SEG]`.

    loss: ce + bce + dice, weighted (when `labels` and `masks` are given).
    logits: (batch, tokens, vocab) of the LM.
    pred_masks: mask logits at each image's own size (H, W).
    points: SAM point prompts (num, 2) as (x, y) image pixels; point_labels (num,): 1 / 0 / -1.
    similarity_maps: the normalised `[SEG]`-image similarity at image size (H, W).
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mask_bce_loss: torch.Tensor | None = None
    mask_dice_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pred_masks: list | None = None
    points: list | None = None
    point_labels: list | None = None
    similarity_maps: list | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _init_adapters(model: nn.Module) -> None:
    """peft's inits for adapters inside a sub-model, whose own `_init_weights` would redraw them like any Linear:
    LoRA A Kaiming-uniform and B = 0 (the identity at start), trainable-token rows copied from the embedding.
    `init.*` skips weights loaded from a checkpoint."""
    for module in model.modules():
        if isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
            for name in module.lora_B:
                init.kaiming_uniform_(module.lora_A[name].weight, a=math.sqrt(5))
                init.zeros_(module.lora_B[name].weight)
        if isinstance(getattr(module, "trainable_tokens_delta", None), nn.ParameterDict):
            for name, delta in module.trainable_tokens_delta.items():
                init.copy_(delta, module.base_layer.weight[module.token_indices[name]])


class READPreTrainedModel(PreTrainedModel):
    config_class = READConfig
    base_model_prefix = "read"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True  # LLaVA (CLIP + the LM) and SAM take the implementation through their sub-configs

    @classmethod
    def is_custom_code(cls) -> bool:
        # Our inits go through `transformers.initialization` only, so the per-weight "loaded" flags are exact; the
        # guard transformers keeps for custom code skips modules without weights of their own (SegProjection,
        # CLIP's attention), leaving them uninitialised or at the generic N(0, 0.02).
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        # LLaVA and SAM initialise themselves; the projection keeps PyTorch's Linear init (as the official code).
        # Sub-modules come first, so the model itself (last) restores peft's adapter inits.
        if isinstance(module, READForReasoningSegmentation):
            _init_adapters(module.llava)
        elif isinstance(module, SegProjection):
            for linear in (module[0], module[2]):
                init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                bound = 1 / math.sqrt(linear.in_features)
                init.uniform_(linear.bias, -bound, bound)


class READForReasoningSegmentation(READPreTrainedModel):
    """LLaVA + `[SEG]` projection + SasP + SAM.

    Inputs: LLaVA's `input_ids`/`attention_mask`/`pixel_values` (image tokens expanded), SAM's `sam_pixel_values`
    (longest side resized to SAM's size, padded square) or precomputed `image_embeddings`, and `original_sizes`
    (batch, 2) as (height, width).
    """

    def __init__(self, config: READConfig, llava: LlavaForConditionalGeneration | None = None,
                 sam: SamModel | None = None):
        super().__init__(config)
        self.llava = llava if llava is not None else LlavaForConditionalGeneration(config.llava_config)
        self.sam = sam if sam is not None else SamModel(config.sam_config)
        self.text_hidden_fcs = SegProjection(config.llava_config.text_config.hidden_size, config.out_dim)
        self.similarity_as_points = SimilarityAsPoints(
            config.image_grid, config.llava_config.vision_config.image_size, config.t_pos, config.t_neg,
            config.num_points, config.down_sample)
        self.post_init()
        if config.lora_r:
            # After post_init, so that LoRA keeps peft's init (B = 0). The [SEG] row trains alone (peft trainable
            # tokens) instead of the whole embedding matrix of the official code.
            from peft import LoraConfig, inject_adapter_in_model

            trainable = {"embed_tokens": [config.seg_token_index]} if config.seg_token_index is not None else None
            inject_adapter_in_model(
                LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.lora_target_modules), trainable_token_indices=trainable),
                self.llava.model.language_model)
            # A fresh model keeps peft's init through any later initialize_weights() (loading re-inits).
            if getattr(self, "_is_hf_initialized", False):
                for module in self.llava.model.language_model.modules():
                    module._is_hf_initialized = True

    @classmethod
    def from_base_models(cls, base_llava: str, base_sam: str, **config_kwargs) -> READForReasoningSegmentation:
        """READ on a pretrained LLaVA-1.5-style checkpoint and a SAM checkpoint (Hub ids or folders): `[SEG]` is
        added to the base tokenizer's vocabulary and the embeddings; the projection is fresh."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_llava)
        tokenizer.add_tokens([SEG_TOKEN])
        llava = LlavaForConditionalGeneration.from_pretrained(base_llava)
        sam = SamModel.from_pretrained(base_sam)
        if len(tokenizer) > llava.get_input_embeddings().num_embeddings:
            llava.resize_token_embeddings(len(tokenizer))
        config = READConfig(llava_config=llava.config.to_dict(), sam_config=sam.config.to_dict(),
                            base_llava=str(base_llava), base_sam=str(base_sam),
                            seg_token_index=tokenizer.convert_tokens_to_ids(SEG_TOKEN), **config_kwargs)
        return cls(config, llava=llava, sam=sam)

    def get_input_embeddings(self) -> nn.Module:
        return self.llava.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llava.set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """LLaVA's input and output embeddings resized together; existing rows, `[SEG]`'s included, are kept, so the
        vocabulary cannot shrink below `[SEG]`."""
        seg = self.config.seg_token_index
        if new_num_tokens is not None and seg is not None and new_num_tokens <= seg:
            raise ValueError(f"cannot resize to {new_num_tokens} tokens: that drops the {SEG_TOKEN} row ({seg})")
        embeddings = self.llava.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.llava_config.text_config.vocab_size = embeddings.num_embeddings
        return embeddings

    def _image_and_seg_states(self, hidden: torch.Tensor, input_ids: torch.Tensor, row: int, answer_start: int = 0):
        """The image-token states (grid*grid, hidden) and the `[SEG]` state (hidden,) of one row, or None for the
        latter when the row has no `[SEG]` at or after `answer_start`. The `[SEG]` state is the one whose next-token
        prediction is `[SEG]` (LISA's `input_ids[:, 1:] == seg` mask), the first one when there are several."""
        ids = input_ids[row]
        image = (ids == self.config.llava_config.image_token_index).nonzero().flatten()
        seg = (ids[1:] == self.config.seg_token_index).nonzero().flatten()
        seg = seg[seg + 1 >= answer_start]
        return hidden[row, image], (hidden[row, seg[0]] if seg.numel() else None)

    def decode_mask(self, image_embeddings: torch.Tensor, seg_embedding: torch.Tensor, height: int, width: int,
                    points: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """SAM mask logits (height, width) of one image from its embedding (1, C, h, w), the projected `[SEG]`
        (out_dim,) and optional points (num, 2) in image pixels with labels (num,)."""
        sam = self.sam
        size = sam.config.vision_config.image_size
        new_h, new_w = resize_longest_side(height, width, size)
        sam_dtype = sam.prompt_encoder.shared_embedding.positional_embedding.dtype
        seg_token = seg_embedding.to(sam_dtype).reshape(1, 1, 1, -1)
        if points is None:  # LISA: the [SEG] embedding is the only sparse prompt
            sparse = seg_token
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, *sam.prompt_encoder.image_embedding_size)
        else:
            coords = points * points.new_tensor([new_w / width, new_h / height])  # official `apply_coords`
            sparse, dense = sam.prompt_encoder(input_points=coords.to(sam_dtype)[None, None],
                                               input_labels=labels[None, None], input_boxes=None, input_masks=None)
            sparse = torch.cat([sparse, seg_token], dim=2)  # READ's `text_embeds` after the points
        low_res, _ = sam.mask_decoder(image_embeddings=image_embeddings,
                                      image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        return postprocess_masks(low_res[0], size, height, width)[0, 0]

    def segment_from_states(self, hidden: torch.Tensor, input_ids: torch.Tensor, image_embeddings: torch.Tensor,
                            original_sizes: torch.Tensor, answer_start: int = 0) -> dict[str, list]:
        """Masks, points and similarity maps from the LM's last-layer states (batch, tokens, hidden); only a `[SEG]`
        at or after token `answer_start` counts."""
        results = {"pred_masks": [], "points": [], "point_labels": [], "similarity_maps": []}
        for row in range(hidden.shape[0]):
            image_states, seg_state = self._image_and_seg_states(hidden, input_ids, row, answer_start)
            height, width = (int(v) for v in original_sizes[row])
            if seg_state is None:
                for values in results.values():
                    values.append(None)
                continue
            # S = <h_img, h_seg>: the official CLIP-Surgery-style map reduces to this for a single [SEG].
            similarity = (image_states * seg_state).sum(-1)  # the official sum of products, bitwise also in bf16
            points, labels, sm = self.similarity_as_points(similarity, height, width)
            embedding = self.text_hidden_fcs(seg_state)
            mask = self.decode_mask(image_embeddings[row:row + 1], embedding, height, width,
                                    *((points, labels) if self.config.use_sasp else (None, None)))
            for name, value in zip(results, (mask, points, labels, sm)):
                results[name].append(value)
        return results

    def _check_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, new_tokens: int = 0) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError("input_ids must be an integer tensor of token ids (batch, tokens)")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch of input_ids (batch, tokens), got {tuple(input_ids.shape)}")
        size = self.config.llava_config.vision_config.image_size
        expected = (input_ids.shape[0], 3, size, size)
        if not torch.is_tensor(pixel_values) or tuple(pixel_values.shape) != expected:
            raise ValueError(f"expected input_ids (batch, tokens) and pixel_values (batch, 3, {size}, {size}) = "
                             f"{expected}, got {tuple(input_ids.shape)} and {tuple(getattr(pixel_values, 'shape', ()))}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be the processor's normalised floats, got {pixel_values.dtype} "
                             "(raw image bytes?); use READProcessor")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or inf")
        positions = self.config.llava_config.text_config.max_position_embeddings
        if input_ids.shape[1] + new_tokens > positions:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens (+ {new_tokens} to generate), over the "
                             f"language model's {positions} positions")
        counts = (input_ids == self.config.llava_config.image_token_index).sum(-1)
        grid = self.config.image_grid
        if bool((counts != grid * grid).any()):
            raise ValueError(f"each row needs {grid * grid} image tokens ({grid}x{grid} patches of the vision "
                             f"config, one image per row); got {counts.tolist()}")

    def _sam_embeddings(self, sam_pixel_values, image_embeddings):
        if image_embeddings is not None:
            return image_embeddings
        if sam_pixel_values is None:
            raise ValueError("pass sam_pixel_values (SAM-preprocessed images) or precomputed image_embeddings")
        if not sam_pixel_values.is_floating_point() or not torch.isfinite(sam_pixel_values).all():
            raise ValueError(f"sam_pixel_values must be finite floats from READProcessor, got {sam_pixel_values.dtype}"
                             " with non-finite values or raw bytes")
        sam_pixel_values = sam_pixel_values.to(self.sam.dtype)
        with torch.no_grad():  # SAM's image encoder is frozen (official `get_visual_embs`)
            return self.sam.get_image_embeddings(sam_pixel_values)

    def forward(self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor, original_sizes: torch.Tensor,
                attention_mask: torch.Tensor | None = None, sam_pixel_values: torch.FloatTensor | None = None,
                image_embeddings: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                masks: list[torch.Tensor] | None = None, inputs_embeds: torch.FloatTensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> READOutput | tuple:
        """`labels`: LM targets (-100 where ignored); `masks`: one ground-truth (H, W) mask per row, whose answer
        must contain exactly one `[SEG]`. `inputs_embeds` (batch, tokens, hidden) replace the token embeddings;
        `input_ids` are still needed, to find the image and `[SEG]` positions. `output_hidden_states` /
        `output_attentions` return the LM's; `return_dict=False` gives a tuple of the non-None fields."""
        if self.config.seg_token_index is None:
            raise ValueError("config.seg_token_index is unset: add the [SEG] token (see `from_base_models`)")
        self._check_inputs(input_ids, pixel_values)
        pixel_values = pixel_values.to(self.llava.model.vision_tower.dtype)  # any float dtype from the user
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(f"inputs_embeds {tuple(inputs_embeds.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)} in batch and tokens")
        tokens = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        out = self.llava(**tokens, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels,
                         output_hidden_states=True, output_attentions=output_attentions, **kwargs)
        if masks is not None:
            counts = (input_ids[:, 1:] == self.config.seg_token_index).sum(-1)
            if len(masks) != len(input_ids) or bool((counts != 1).any()):
                raise ValueError(f"training needs one mask and exactly one {SEG_TOKEN} per row; got {len(masks)} "
                                 f"masks for {len(input_ids)} rows with {counts.tolist()} {SEG_TOKEN} tokens")
        results = self.segment_from_states(out.hidden_states[-1], input_ids,
                                           self._sam_embeddings(sam_pixel_values, image_embeddings), original_sizes)
        output = READOutput(logits=out.logits, hidden_states=out.hidden_states if output_hidden_states else None,
                            attentions=out.attentions if output_attentions else None, **results)
        if masks is not None:
            targets = [m.to(p.dtype) for m, p in zip(masks, output.pred_masks)]
            output.mask_bce_loss = self.config.bce_loss_weight * torch.stack(
                [sigmoid_ce_loss(p[None], t[None])[0] for p, t in zip(output.pred_masks, targets)]).mean()
            output.mask_dice_loss = self.config.dice_loss_weight * torch.stack(
                [dice_loss(p[None], t[None])[0] for p, t in zip(output.pred_masks, targets)]).mean()
            output.loss = output.mask_bce_loss + output.mask_dice_loss
        if labels is not None:
            output.ce_loss = self.config.ce_loss_weight * out.loss
            output.loss = output.ce_loss if output.loss is None else output.loss + output.ce_loss
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def segment(self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor, original_sizes: torch.Tensor,
                attention_mask: torch.Tensor | None = None, sam_pixel_values: torch.FloatTensor | None = None,
                image_embeddings: torch.FloatTensor | None = None, max_new_tokens: int = 32,
                **generate_kwargs) -> dict:
        """Answer the (left-padded) prompts greedily, then read the masks off the answers' `[SEG]` states.

        Returns `sequences` (batch, tokens) with the prompts, and the lists of `READOutput` (None per row whose
        answer has no `[SEG]`). Only generated `[SEG]` tokens count: one typed into the prompt is ignored."""
        self._check_inputs(input_ids, pixel_values, max_new_tokens)
        pixel_values = pixel_values.to(self.llava.model.vision_tower.dtype)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        sequences = self.llava.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                        max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        # The LM is causal: tokens generated after [SEG] (or padding after an answer's end) leave its state as is.
        full_mask = torch.cat([attention_mask, torch.ones_like(sequences[:, input_ids.shape[1]:])], dim=1)
        out = self.llava(input_ids=sequences, attention_mask=full_mask, pixel_values=pixel_values,
                         position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
        results = self.segment_from_states(out.hidden_states[-1], sequences,
                                           self._sam_embeddings(sam_pixel_values, image_embeddings), original_sizes,
                                           answer_start=input_ids.shape[1])
        return {"sequences": sequences, **results}


__all__ = ["READForReasoningSegmentation", "READOutput", "READPreTrainedModel", "SimilarityAsPoints",
           "SEG_TOKEN", "dice_loss", "postprocess_masks", "sigmoid_ce_loss", "resize_longest_side"]
