"""The processor of READ: LLaVA's inputs (CLIP pixels, text with the image token expanded) and SAM's (pixels at SAM's
input size, original image sizes) from one call."""

from __future__ import annotations

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

# Longest / shortest side: wider images lose nearly everything to CLIP's centre crop, and SAM's shorter side vanishes.
MAX_ASPECT_RATIO = 16


class READProcessor(ProcessorMixin):
    """`image_processor`: the vision tower's (CLIP, centre crop); `sam_image_processor`: SAM's (longest side resized,
    padded square); `tokenizer`: the LM's, with `[SEG]`. Each `image_token` in a text becomes `image_seq_length`
    copies (one per image patch), as LLaVA-1.5 expects. Images of any size and mode are read as RGB."""

    def __init__(self, image_processor=None, tokenizer=None, sam_image_processor=None, chat_template=None,
                 image_seq_length: int = 576, image_token: str = "<image>"):
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, sam_image_processor, chat_template=chat_template)

    def prompt(self, question: str) -> str:
        """The conversation up to the assistant's turn, one image before the question (the chat template). A
        question holding `[SEG]` or the image token is refused: the mask is read off the answer's `[SEG]` only."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be a non-empty string, got {question!r}")
        for token in ("[SEG]", self.image_token):
            if token in question:
                raise ValueError(f"the question contains {token!r}, a token READ reserves (the answer's [SEG] gives "
                                 "the mask, the image token marks the image); rephrase without it")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, images=None, text=None, return_tensors="pt", **tokenizer_kwargs) -> BatchFeature:
        data = {}
        if images is not None:
            images = [image.convert("RGB") for image in (images if isinstance(images, (list, tuple)) else [images])]
            if not images:
                raise ValueError("got an empty list of images; READ reads one image per text")
            for image in images:
                # SAM resizes the longer side to its input size (the shorter must keep pixels), CLIP the shorter one
                # to its own (the longer grows with the ratio, and all but the centre square is cropped away).
                if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
                    raise ValueError(f"image of {image.width}x{image.height} pixels: the aspect ratio must be at "
                                     f"most {MAX_ASPECT_RATIO}:1 (crop it to the region to segment)")
            data["pixel_values"] = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
            sam = self.sam_image_processor(images, return_tensors=return_tensors)
            data["sam_pixel_values"], data["original_sizes"] = sam["pixel_values"], sam["original_sizes"]
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if images is not None and len(texts) != len(images):
                raise ValueError(f"got {len(texts)} texts for {len(images)} images; READ reads one image per text")
            for t in texts:
                if t.count(self.image_token) != 1:
                    raise ValueError(f"each text needs exactly one {self.image_token!r} (where the image goes), got "
                                     f"{t.count(self.image_token)} in {t!r}")
            texts = [t.replace(self.image_token, self.image_token * self.image_seq_length) for t in texts]
            data.update(self.tokenizer(texts, return_tensors=return_tensors, padding=True, **tokenizer_kwargs))
        return BatchFeature(data=data)


__all__ = ["READProcessor"]
