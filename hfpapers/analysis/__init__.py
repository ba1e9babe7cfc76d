"""Analysis toolkits shared by the `analysis`-kind methods (imported, never copied)."""

from .neural_collapse import (
    ClassStatistics,
    ImbalancedGeometry,
    NearestClassCentre,
    NeuralCollapseCallback,
    accumulate,
    classification_head,
    collapse_metrics,
    imbalanced_geometry,
    layer_collapse_metrics,
    measure_classifier,
    nc1,
    nc1_trace_ratio,
    orthogonal_frame,
    partial_products,
    plot_collapse_curves,
    simplex_etf,
)

__all__ = [
    "ClassStatistics",
    "ImbalancedGeometry",
    "NearestClassCentre",
    "NeuralCollapseCallback",
    "accumulate",
    "classification_head",
    "collapse_metrics",
    "imbalanced_geometry",
    "layer_collapse_metrics",
    "measure_classifier",
    "nc1",
    "nc1_trace_ratio",
    "orthogonal_frame",
    "partial_products",
    "plot_collapse_curves",
    "simplex_etf",
]
