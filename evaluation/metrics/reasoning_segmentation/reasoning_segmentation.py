"""gIoU and cIoU of reasoning segmentation (LISA's `validate`, reused by READ, arXiv 2412.17741) as an `evaluate`
module.

    import evaluate
    metric = evaluate.load("evaluation/metrics/reasoning_segmentation")
    metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 1]]])
    # {"giou": ..., "ciou": ...}

Per mask pair: intersection I and union U of the predicted and reference masks. gIoU: the mean of I / U over
pairs, a pair with both masks empty counting as 1.0; cIoU: sum(I) / sum(U) over the whole set. Fractions in [0, 1].
"""

import datasets
import evaluate

from hfpapers.methods.read.metrics import segmentation_ious

_CITATION = """@inproceedings{qian2025reasoning,
  title={Reasoning to Attend: Try to Understand How <SEG> Token Works},
  author={Qian, Rui and Yin, Xin and Dou, Dejing},
  booktitle={CVPR},
  year={2025}
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of 2-D lists of int): predicted binary masks (0 / 1, non-zero is foreground).
    references (list of 2-D lists of int): reference binary masks, each of its prediction's shape.
Returns:
    giou (float): mean per-mask IoU (1.0 where both masks are empty).
    ciou (float): cumulative IoU, total intersection over total union.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class ReasoningSegmentation(evaluate.Metric):
    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
            reference_urls=["https://github.com/rui-qian/READ", "https://github.com/dvlab-research/LISA"],
        )

    def _compute(self, predictions, references):
        return segmentation_ious(predictions, references)
