"""Neural-collapse metrics NC1-NC4 (Papyan et al. 2020; definitions of Dang et al., arXiv 2301.00437) as an
`evaluate` module, on penultimate features and the linear head that reads them.

    import evaluate
    metric = evaluate.load("evaluation/metrics/neural_collapse")
    metric.compute(features=[[...], ...], labels=[...], weight=head.weight.tolist(), bias=head.bias.tolist())
    # {"nc1": ..., "nc1_trace_ratio": ..., "nc2_w": ..., "nc2_h": ..., "nc3": ..., "nc3_wh": ..., "nc4": ...}

NC1 = (1/K) tr(Sigma_W Sigma_B^+) and tr(Sigma_W)/tr(Sigma_B); NC2 / NC3 against the simplex ETF (head with bias,
centred class means), the orthogonal frame (no bias, uncentred means), or the imbalanced general orthogonal frame
(frame="general-orthogonal" with depth, lambda_w, lambda_h: targets from the closed form for the class counts of
the given labels); NC4 = fraction of samples whose argmax(W h + b) differs from the nearest class mean. All are 0
at full collapse. Streams through `hfpapers.analysis.neural_collapse` in float64.
"""

import datasets
import evaluate
import torch

from hfpapers.analysis.neural_collapse import (
    ClassStatistics,
    NearestClassCentre,
    collapse_metrics,
    imbalanced_geometry,
)

_CITATION = """\
@inproceedings{dang2023neural,
  title={Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data},
  author={Dang, Hien and Tran, Tho and Osher, Stanley and Tran-The, Hung and Ho, Nhat and Nguyen, Tan},
  booktitle={International Conference on Machine Learning},
  year={2023}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    features (list of list of float): penultimate features h_i (the input of the head), one row per sample.
    labels (list of int): class ids in [0, K).
    weight (list of list of float): the head's weight W, K rows of the feature dimension.
    bias (list of float, optional): the head's bias; picks the simplex ETF frame when given.
    frame (str, optional): "etf", "orthogonal" or "general-orthogonal" (default: from the bias).
    depth, lambda_w, lambda_h (optional): the deep-linear setting for frame="general-orthogonal".
Returns:
    nc1, nc1_trace_ratio, nc2_w, nc2_h, nc3, nc3_wh, nc4 (float).
"""

_CHUNK = 4096  # rows converted to a tensor at a time


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class NeuralCollapse(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"features": datasets.Sequence(datasets.Value("float64")),
                                        "labels": datasets.Value("int64")}),
            reference_urls=["https://github.com/Fsoft-AIC/Neural-Collapse-in-Deep-Linear-Networks"],
        )

    def _compute(self, features, labels, weight, bias=None, frame=None, depth=1, lambda_w=None, lambda_h=None):
        weight = torch.as_tensor(weight, dtype=torch.float64)
        if weight.ndim != 2:
            raise ValueError(f"weight must be a [K, d] matrix (one row per class), got shape {tuple(weight.shape)}")
        if len(features) != len(labels):
            raise ValueError(f"mismatched counts: {len(features)} feature rows but {len(labels)} labels")

        def chunks():
            for i in range(0, len(labels), _CHUNK):
                rows = slice(i, i + _CHUNK)
                yield torch.as_tensor(features[rows], dtype=torch.float64), torch.as_tensor(labels[rows])

        stats = ClassStatistics(weight.shape[0])
        for h, y in chunks():
            stats.update(h, y)
        geometry = None
        if frame == "general-orthogonal":
            if lambda_w is None or lambda_h is None:
                raise ValueError("frame='general-orthogonal' needs depth, lambda_w and lambda_h")
            geometry = imbalanced_geometry(stats.counts.long().tolist(), depth, lambda_w, lambda_h)
        nc4 = NearestClassCentre(stats.class_means, weight, None if bias is None else torch.as_tensor(bias))
        for h, _ in chunks():
            nc4.update(h)
        return collapse_metrics(stats, weight, None if bias is None else torch.as_tensor(bias), frame=frame,
                                geometry=geometry, nc4=nc4)
