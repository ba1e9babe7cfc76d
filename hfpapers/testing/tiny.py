"""Tiny inputs for any registered model, by task: what the common model tester feeds every model class."""

from __future__ import annotations

import torch


def tiny_inputs(task: str, config, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random model inputs of the shape `config` expects for `task`."""
    generator = torch.Generator().manual_seed(seed)
    if task == "image-classification":
        shape = (batch_size, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    if task == "sentence-embedding":  # left-padded token ids ending in EOS, rows of different lengths
        length = min(8, config.max_length)
        input_ids = torch.randint(4, config.decoder_config.vocab_size, (batch_size, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        for row in range(batch_size):
            attention_mask[row, : row % (length - 1)] = 0
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "reasoning-segmentation":  # a prompt with one image's tokens and an answer with one [SEG]
        llava, sam_size = config.llava_config, config.sam_config.vision_config.image_size
        vocab = torch.randint(len(_READ_RESERVED), llava.text_config.vocab_size, (batch_size, 6), generator=generator)
        image = torch.full((batch_size, config.image_grid ** 2), llava.image_token_index)
        seg = torch.full((batch_size, 1), config.seg_token_index)
        size = llava.vision_config.image_size
        return {"input_ids": torch.cat([vocab[:, :2], image, vocab[:, 2:5], seg, vocab[:, 5:]], dim=1),
                "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
                "sam_pixel_values": torch.randn(batch_size, 3, sam_size, sam_size, generator=generator),
                "original_sizes": torch.tensor([[sam_size * 3 // 4, sam_size]] * batch_size)}
    raise ValueError(f"no tiny inputs for task {task!r}; add them to hfpapers.testing.tiny")


_READ_RESERVED = range(6)  # ids of the tiny READ's special tokens (<pad>, <unk>, <s>, </s>, <image>, [SEG])


def wrong_inputs(task: str, config, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of a wrong shape, which a model must reject with an error naming the expected shape."""
    if task == "image-classification":
        return {"pixel_values": torch.randn(batch_size, config.num_channels, config.image_size + 1, config.image_size)}
    if task == "sentence-embedding":
        return {"input_ids": torch.ones(batch_size, config.max_length + 1, dtype=torch.long)}
    if task == "reasoning-segmentation":
        inputs = tiny_inputs(task, config, batch_size)
        size = config.llava_config.vision_config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size + 1, size),
                **{k: v for k, v in inputs.items() if k != "pixel_values"}}
    raise ValueError(f"no wrong inputs for task {task!r}; add them to hfpapers.testing.tiny")
