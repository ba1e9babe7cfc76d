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
    if task == "cross-view-completion":  # two views of one scene, at the model's image size
        shape = (batch_size, 3, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator),
                "reference_pixel_values": torch.randn(shape, generator=generator)}
    raise ValueError(f"no tiny inputs for task {task!r}; add them to hfpapers.testing.tiny")


_READ_RESERVED = range(6)  # ids of the tiny READ's special tokens (<pad>, <unk>, <s>, </s>, <image>, [SEG])


def wrong_inputs(task: str, config, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of a wrong shape, which a model must reject with an error naming the expected shape."""
    if task == "image-classification":
        # a channel too many: every image classifier refuses it (EfficientViM takes any height and width)
        return {"pixel_values": torch.randn(batch_size, config.num_channels + 1, config.image_size, config.image_size)}
    if task == "sentence-embedding":
        return {"input_ids": torch.ones(batch_size, config.max_length + 1, dtype=torch.long)}
    if task == "reasoning-segmentation":
        inputs = tiny_inputs(task, config, batch_size)
        size = config.llava_config.vision_config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size + 1, size),
                **{k: v for k, v in inputs.items() if k != "pixel_values"}}
    if task == "cross-view-completion":  # a grayscale view
        size = config.image_size
        return {"pixel_values": torch.randn(batch_size, 1, size, size),
                "reference_pixel_values": torch.randn(batch_size, 3, size, size)}
    raise ValueError(f"no wrong inputs for task {task!r}; add them to hfpapers.testing.tiny")


def bad_inputs(task: str, config) -> list[tuple[str, dict, str]]:
    """(case, inputs, regex of the expected message): inputs every model of `task` must refuse with one clear
    ValueError that says what was expected (the contract suite's bad-input table)."""
    if task == "text-to-image":  # a transparent VAE's `encode(rgba)`: straight RGBA in [0, 1], sides multiples of 8
        rgba = torch.rand(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))

        def filled(value):
            return rgba.clone().index_fill_(3, torch.tensor([0]), value)

        return [
            ("60x60", {"rgba": rgba[..., :60, :60]}, r"multiples of 8.*got 60x60.*e\.g\. to 56x56"),
            ("64x60", {"rgba": rgba[..., :60]}, r"multiples of 8.*got 64x60"),
            ("uint8", {"rgba": (rgba * 255).to(torch.uint8)}, r"float RGBA in \[0, 1\], got torch.uint8"),
            ("0-255 floats", {"rgba": rgba * 255}, r"values in \[0, 1\], got values from 0.* to 2\d\d"),
            ("negative", {"rgba": filled(-0.5)}, r"values in \[0, 1\], got values from -0.5"),
            ("nan", {"rgba": filled(float("nan"))}, r"NaN or infinite"),
            ("inf", {"rgba": filled(float("inf"))}, r"NaN or infinite"),
            ("empty batch", {"rgba": rgba[:0]}, r"at least one RGBA image.*\(0, 4, 64, 64\)"),
            ("RGB", {"rgba": rgba[:, :3]}, r"\(batch, 4, height, width\).*got shape \(1, 3, 64, 64\)"),
            ("numpy", {"rgba": rgba.numpy()}, r"got ndarray"),
        ]
    good = tiny_inputs(task, config, batch_size=2)
    if task == "image-classification":
        x = good["pixel_values"]
        c = config.num_channels
        return [
            ("uint8", {"pixel_values": (x * 255).to(torch.uint8)}, r"floating point.*got torch.uint8"),
            ("int64", {"pixel_values": x.long()}, r"floating point.*got torch.int64"),
            ("bool", {"pixel_values": x > 0}, r"floating point.*got torch.bool"),
            ("empty batch", {"pixel_values": x[:0]}, r"empty batch|at least one image"),
            ("nan", {"pixel_values": x.masked_fill(x > 1, float("nan"))}, r"NaN or infinite"),
            ("inf", {"pixel_values": x.masked_fill(x > 1, float("inf"))}, r"NaN or infinite"),
            ("-inf", {"pixel_values": x.masked_fill(x > 1, float("-inf"))}, r"NaN or infinite"),
            ("no batch axis", {"pixel_values": x[0]}, rf"\(batch, {c}, .*got \({c}, "),
            ("channels", {"pixel_values": x[:, :1]}, rf"\(batch, {c}, .*got \(2, 1, "),
            ("five axes", {"pixel_values": x[None]}, rf"\(batch, {c}, .*got \(1, 2, "),
            ("numpy", {"pixel_values": x.numpy()}, r"got ndarray"),
            ("list", {"pixel_values": x.tolist()}, r"got list"),
        ]
    if task == "sentence-embedding":
        vocab, max_length = config.decoder_config.vocab_size, config.max_length
        hidden = config.decoder_config.hidden_size
        ids = good["input_ids"]
        return [
            ("empty batch", {"input_ids": ids[:0]}, "empty batch"),
            ("empty texts", {"input_ids": ids[:, :0]}, "empty batch"),
            ("float ids", {"input_ids": ids.float()}, "integer token ids"),
            ("id over the vocabulary", {"input_ids": ids.clamp(max=vocab - 1).index_fill(1, torch.tensor([0]), vocab)},
             rf"token ids must lie in \[0, {vocab}\)"),
            ("negative id", {"input_ids": ids.index_fill(1, torch.tensor([0]), -2)}, "token ids must lie in"),
            ("too long", {"input_ids": torch.ones(1, max_length + 1, dtype=torch.long)}, f"over max_length={max_length}"),
            ("no batch axis", {"input_ids": ids[0]}, "integer token ids"),
            ("nothing", {}, "exactly one of input_ids"),
            ("ids and embeddings", {"input_ids": ids, "inputs_embeds": torch.zeros(*ids.shape, hidden)}, "exactly one"),
            ("nan embeddings", {"inputs_embeds": torch.full((1, 3, hidden), float("nan"))}, "NaN or inf"),
            ("embedding width", {"inputs_embeds": torch.zeros(1, 3, hidden + 1)},
             rf"inputs_embeds must be float \(batch, sequence, {hidden}\)"),
            ("mask shape", {"input_ids": ids, "attention_mask": torch.ones(ids.shape[0], ids.shape[1] + 1)},
             "attention_mask must"),
        ]
    if task == "reasoning-segmentation":
        ids, pixels, sam = good["input_ids"], good["pixel_values"], good["sam_pixel_values"]
        size = config.llava_config.vision_config.image_size
        return [
            ("empty batch", {**good, "input_ids": ids[:0], "pixel_values": pixels[:0]}, "non-empty batch"),
            ("float ids", {**good, "input_ids": ids.float()}, "integer tensor of token ids"),
            ("uint8 pixels", {**good, "pixel_values": (pixels * 255).to(torch.uint8)}, "normalised floats"),
            ("nan pixels", {**good, "pixel_values": pixels.masked_fill(pixels > 1, float("nan"))}, "NaN or inf"),
            ("inf pixels", {**good, "pixel_values": pixels.masked_fill(pixels > 1, float("inf"))}, "NaN or inf"),
            ("pixel size", {**good, "pixel_values": pixels[:, :, : size // 2]},
             rf"pixel_values \(batch, 3, {size}, {size}\)"),
            ("nan sam pixels", {**good, "sam_pixel_values": torch.full_like(sam, float("nan"))},
             "sam_pixel_values must be finite"),
            ("too long", {**good, "input_ids": torch.cat([ids, ids[:, -1:].repeat(1, 4096)], 1)},
             "over the language model's"),
            ("uint8 sam pixels", {**good, "sam_pixel_values": (sam * 255).to(torch.uint8)}, "sam_pixel_values"),
            ("int64 pixels", {**good, "pixel_values": pixels.long()}, "normalised floats"),
        ]
    if task == "cross-view-completion":
        x, ref = good["pixel_values"], good["reference_pixel_values"]
        size, p = config.image_size, config.patch_size
        return [
            ("uint8", {"pixel_values": (x * 255).to(torch.uint8), "reference_pixel_values": ref},
             r"floating point.*got torch.uint8"),
            ("bool", {"pixel_values": x, "reference_pixel_values": ref > 0}, r"floating point.*got torch.bool"),
            ("empty batch", {"pixel_values": x[:0], "reference_pixel_values": ref[:0]}, r"at least one image"),
            ("nan", {"pixel_values": x.masked_fill(x > 1, float("nan")), "reference_pixel_values": ref},
             r"NaN or infinite"),
            ("inf reference", {"pixel_values": x, "reference_pixel_values": ref.masked_fill(ref > 1, float("inf"))},
             r"reference_pixel_values contain NaN or infinite"),
            ("grayscale", {"pixel_values": x[:, :1], "reference_pixel_values": ref},
             r"RGB images of shape \(batch, 3, height, width\), got \(2, 1, .*grayscale"),
            ("RGBA", {"pixel_values": torch.cat([x, x[:, :1]], 1), "reference_pixel_values": ref},
             r"\(batch, 3, height, width\), got \(2, 4, "),
            ("views of different sizes", {"pixel_values": x, "reference_pixel_values": ref[..., : size - p]},
             rf"the two views must be the same size.*\(2, 3, {size}, {size - p}\)"),
            ("views of different batches", {"pixel_values": x, "reference_pixel_values": ref[:1]},
             r"the two views must be the same size and batch"),
            ("size not a multiple of the patch", {"pixel_values": x[..., : size - 1, : size - 1],
                                                  "reference_pixel_values": ref[..., : size - 1, : size - 1]},
             rf"{size - 1}x{size - 1}; height and width must be multiples of patch_size={p}"),
            ("no batch axis", {"pixel_values": x[0], "reference_pixel_values": ref[0]}, r"\(batch, 3, .*got \(3, "),
            ("numpy", {"pixel_values": x.numpy(), "reference_pixel_values": ref}, r"got ndarray"),
        ]
    raise ValueError(f"no bad inputs for task {task!r}; add them to hfpapers.testing.tiny")


def bad_settings(slug: str) -> list[tuple[str, dict, str]]:
    """(case, settings, regex of the expected message): `hfpapers run <slug> --set ...` values a procedure or
    analysis must refuse with one clear error before anything runs (the contract suite's table for run kinds)."""
    if slug == "gs-lora":
        return [
            ("group type", {"group_type": "layer"}, "group_type must be one of"),
            ("rank", {"rank": 0}, "rank=0"),
            ("full tuning with a penalty", {"tune": "full"}, "set alpha=0"),
            ("tune", {"tune": "all"}, "tune must be 'lora' or 'full'"),
            ("learning rate", {"learning_rate": 0.0}, "learning_rate=0.0"),
            ("negative beta", {"beta": -0.1}, "beta=-0.1"),
            ("empty per-task beta", {"beta": ()}, "beta needs one value, or one per task"),
            ("negative bound", {"bound": -1.0}, "bound=-1.0"),
            ("few-shot", {"few_shot": 0}, "few_shot must be at least 1"),
            ("ema decay", {"ema_decay": 1.5}, "ema_decay must lie in"),
            ("ema start", {"num_epochs": 5, "ema_start_epoch": 5}, "ema_start_epoch must lie in"),
            ("per-task prototype weight", {"prototype_forget_weight": (0.1, -1.0)},
             "prototype_forget_weight=.* out of range"),
            ("unknown setting", {"colour": 1}, r"unknown settings \['colour'\]"),
        ]
    if slug == "nc-deep-linear":
        return [
            ("a class with no samples", {"imbalanced_counts": (200, 0, 50)}, "each with at least one sample"),
            ("one class", {"balanced_counts": (100,)}, "at least two classes"),
            ("K above d", {"hidden": 3}, "K=4 classes but hidden=3"),
            ("no depth", {"depths": ()}, "depths must be"),
            ("depth 0", {"depths": (1, 0)}, "depths must be"),
            ("iterations", {"num_iterations": 0}, "num_iterations=0"),
            ("learning rate", {"learning_rate": 0.0}, "learning_rate=0.0"),
            ("momentum", {"momentum": 1.0}, "momentum=1.0"),
            ("negative decay", {"feature_decay": -1e-4}, "feature_decay=-0.0001"),
            ("loss", {"losses": ("hinge",)}, "losses must be some of mse, ce"),
            ("split", {"split": "validation"}, "split must be one of train, test"),
            ("unknown setting", {"colour": 1}, r"unknown settings \['colour'\]"),
        ]
    if slug == "nc-mixup":
        return [
            ("two classes", {"classes": (0, 1)}, "classes must be three different class indices"),
            ("a repeated class", {"classes": (0, 1, 1)}, "classes must be three different class indices"),
            ("alpha", {"mixup_alpha": 0.0}, "mixup_alpha=0.0"),
            ("no pairs", {"num_pairs": 0}, "num_pairs=0"),
            ("lambda 1", {"lambda_grid": (0.5, 1.0)}, "lambda_grid must hold mixing weights strictly between"),
            ("empty grid", {"lambda_grid": ()}, "lambda_grid must hold"),
            ("K above d", {"feature_dim": 8}, "feature_dim=8 is below the 10 classes"),
            ("momentum", {"momentum": 1.0}, "momentum=1.0"),
            ("optimizer", {"optimizer": "lion"}, "optimizer must be one of sgd, adamw"),
            ("milestones", {"lr_milestones": (0.9, 0.3)}, "lr_milestones must be increasing"),
            ("split", {"split": "validation"}, "split must be one of train, test"),
            ("unknown setting", {"colour": 1}, r"unknown settings \['colour'\]"),
        ]
    if slug == "nc-perturbation":
        return [
            ("beta zero", {"betas": (10.0, 0.0)}, "betas must be one or more positive"),
            ("no beta", {"betas": ()}, "betas must be one or more positive"),
            ("lambda_W zero", {"lambda_W": 0.0}, "lambda_W=0.0"),
            ("lambda_H zero", {"lambda_H": 0.0}, "lambda_H=0.0"),
            ("no collapsed minimiser", {"lambda_W": 2.0, "lambda_H": 0.6}, "lambda_H \\* lambda_W must stay below 1"),
            ("K above d", {"num_classes": 10, "feature_dim": 10}, "feature_dim > K"),
            ("one class", {"num_classes": 1}, "K >= 2 classes"),
            ("no samples per class", {"samples_per_class": 0}, "samples_per_class=0"),
            ("negative noise", {"noise": -0.1}, "noise=-0.1"),
            ("one flow point", {"flow_points": 1}, "flow_points=1"),
            ("layer-wise loss", {"layerwise_loss": "hinge"}, "layerwise_loss must be one of mse, ce"),
            ("split", {"split": "validation"}, "split must be one of train, test"),
            ("unknown setting", {"colour": 1}, r"unknown settings \['colour'\]"),
        ]
    if slug == "tract":
        return [
            ("lambda zero", {"l": 0.0}, r"l \(TrAct's lambda\) must be a finite number above 0"),
            ("negative lambda", {"l": -0.1}, r"l \(TrAct's lambda\) must be a finite number above 0"),
            ("infinite lambda", {"l": float("inf")}, r"l \(TrAct's lambda\) must be a finite number above 0"),
            ("lambda as a flag", {"l": True}, r"l \(TrAct's lambda\) must be a finite number above 0"),
            ("epochs", {"num_epochs": 0}, "num_epochs=0"),
            ("batch size", {"batch_size": 0}, "batch_size=0"),
            ("learning rate", {"learning_rate": 0.0}, "learning_rate=0.0"),
            ("momentum", {"momentum": 1.0}, "momentum=1.0"),
            ("negative decay", {"weight_decay": -1.0}, "weight_decay=-1.0"),
            ("optimizer", {"optimizer": "lion"}, "optimizer must be one of sgd, adamw"),
            ("empty layer name", {"layer": ""}, "layer must be a module name"),
            ("unknown setting", {"colour": 1}, r"unknown settings \['colour'\]"),
        ]
    raise ValueError(f"no bad settings for {slug!r}; add them to hfpapers.testing.tiny")
